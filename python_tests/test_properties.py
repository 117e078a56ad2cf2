"""Property tests: random sizes, lengths and flags, fresh random inputs each example; ours must
equal nn.LSTM in fp64 (outputs, states and every gradient)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lstm_ext
from conftest import Case, compare


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


@settings(max_examples=40, deadline=None)
@given(
    config=configurations(),
    kind=st.sampled_from(["padded", "unbatched", "packed_sorted", "packed_unsorted"]),
    steps=st.integers(1, 9),
    batch=st.integers(1, 6),
    with_state=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_configurations_match_nn_lstm(config, kind, steps, batch, with_state, seed):
    torch.manual_seed(seed)
    reference = nn.LSTM(**config, dtype=torch.float64)
    ours = lstm_ext.LSTM.from_torch(reference)
    lengths = None
    if kind.startswith("packed"):
        lengths = torch.randint(1, steps + 1, (batch,)).tolist()
    case = Case(reference, kind, steps=steps, batch=batch, with_state=with_state,
                lengths=lengths)
    compare(case.run(ours), case.run(reference), 1e-10)


@settings(max_examples=25, deadline=None)
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
