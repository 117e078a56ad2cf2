"""Property tests: random sizes, lengths and flags, fresh random inputs each example; ours must
equal nn.LSTM in fp64 (outputs, states and every gradient)."""

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import lstm_ext
from conftest import LAYOUTS, Case, compare, relayout, values_for


@st.composite
def configurations(draw):
    hidden = draw(st.integers(1, 12))
    return dict(
        input_size=draw(st.integers(1, 9)),
        hidden_size=hidden,
        num_layers=draw(st.integers(1, 3)),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bidirectional=draw(st.booleans()),
        proj_size=draw(st.integers(0, hidden - 1)),
    )


@given(
    config=configurations(),
    kind=st.sampled_from(["padded", "unbatched", "packed_sorted", "packed_unsorted"]),
    steps=st.integers(1, 9),
    batch=st.integers(1, 6),
    with_state=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    layouts=st.lists(st.sampled_from(LAYOUTS), min_size=3, max_size=3),
)
def test_random_configurations_match_nn_lstm(config, kind, steps, batch, with_state, seed,
                                             layouts):
    """...with the input and the initial state in any memory layout (padded and unbatched
    input, h0 and c0; both modules get the same tensors)."""
    torch.manual_seed(seed)
    reference = nn.LSTM(**config, dtype=torch.float64)
    ours = lstm_ext.LSTM.from_torch(reference)
    lengths = None
    if kind.startswith("packed"):
        lengths = torch.randint(1, steps + 1, (batch,)).tolist()
    case = Case(reference, kind, steps=steps, batch=batch, with_state=with_state,
                lengths=lengths)
    if not kind.startswith("packed"):
        case.leaves = [relayout(values_for(case.leaves[0], layouts[0]), layouts[0])]
    if with_state:
        case.state = [relayout(values_for(t, layout), layout)
                      for t, layout in zip(case.state, layouts[1:])]
    compare(case.run(ours), case.run(reference), 1e-10)


@given(
    batch=st.integers(1, 5),
    input_size=st.integers(1, 7),
    hidden=st.integers(1, 9),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_cells_match_nn_lstmcell(batch, input_size, hidden, bias, seed):
    torch.manual_seed(seed)
    reference = nn.LSTMCell(input_size, hidden, bias=bias, dtype=torch.float64)
    ours = lstm_ext.LSTMCell.from_torch(reference)
    x = torch.randn(batch, input_size, dtype=torch.float64)
    state = (torch.randn(batch, hidden, dtype=torch.float64),
             torch.randn(batch, hidden, dtype=torch.float64))
    for a, b in zip(ours(x, state), reference(x, state)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
