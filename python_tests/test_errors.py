"""Bad input gets the exception type torch.nn.LSTM raises, with a message that says what to fix;
where nn.LSTM itself fails obscurely we keep its type and say more."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import lstm_ext


def both(*args, **kwargs):
    torch.manual_seed(0)
    reference = nn.LSTM(*args, **kwargs)
    return reference, lstm_ext.LSTM.from_torch(reference)


def raised(function):
    try:
        function()
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return error
    return None


CALLS = {
    "4-D input": (lambda m: m(torch.randn(1, 2, 3, 4)), "Expected input to be 2D or 3D"),
    "1-D input": (lambda m: m(torch.randn(4)), "Expected input to be 2D or 3D"),
    "wrong feature size": (lambda m: m(torch.randn(3, 2, 5)), "input_size. Expected 4, got 5"),
    "wrong h0 shape": (
        lambda m: m(torch.randn(3, 2, 4), (torch.randn(2, 3, 6), torch.randn(2, 2, 6))),
        r"Expected hidden\[0\] size \(2, 2, 6\), got \[2, 3, 6\]",
    ),
    "wrong c0 shape": (
        lambda m: m(torch.randn(3, 2, 4), (torch.randn(2, 2, 6), torch.randn(2, 2, 5))),
        r"Expected hidden\[1\] size \(2, 2, 6\), got \[2, 2, 5\]",
    ),
    "2-D state for batched input": (
        lambda m: m(torch.randn(3, 2, 4), (torch.randn(2, 6), torch.randn(2, 2, 6))),
        "should also be 3-D",
    ),
    "3-D state for unbatched input": (
        lambda m: m(torch.randn(3, 4), (torch.randn(2, 1, 6), torch.randn(2, 1, 6))),
        "should also be 2-D",
    ),
    "input dtype": (lambda m: m(torch.randn(3, 2, 4, dtype=torch.float64)),
                    r"Convert input: input.to\(torch.float32\)"),
    "integer input": (lambda m: m(torch.ones(3, 2, 4, dtype=torch.long)), "does not match weight"),
    "h0 dtype": (
        lambda m: m(torch.randn(3, 2, 4),
                    (torch.randn(2, 2, 6, dtype=torch.float64), torch.randn(2, 2, 6))),
        r"hx\[0\] has dtype torch.float64 but input has dtype torch.float32",
    ),
    "c0 dtype": (
        lambda m: m(torch.randn(3, 2, 4),
                    (torch.randn(2, 2, 6), torch.randn(2, 2, 6, dtype=torch.float64))),
        r"hx\[1\] has dtype torch.float64",
    ),
    "zero-length sequence": (lambda m: m(torch.randn(0, 2, 4)), "larger than 0"),
    "zero-length unbatched": (lambda m: m(torch.randn(0, 4)), "larger than 0"),
    "packed with wrong state batch": (
        lambda m: m(pack_sequence([torch.randn(3, 4), torch.randn(2, 4)]),
                    (torch.randn(2, 3, 6), torch.randn(2, 3, 6))),
        r"Expected hidden\[0\] size \(2, 2, 6\)",
    ),
    "packed with wrong feature size": (
        lambda m: m(pack_sequence([torch.randn(3, 5), torch.randn(2, 5)])),
        "input_size. Expected 4, got 5",
    ),
    "three states": (
        lambda m: m(torch.randn(3, 2, 4), (torch.randn(2, 2, 6),) * 3), "two hidden states",
    ),
    "packed with three states": (
        lambda m: m(pack_sequence([torch.randn(3, 4), torch.randn(2, 4)]),
                    (torch.randn(2, 2, 6),) * 3),
        "two hidden states",
    ),
    "packed with one state": (
        lambda m: m(pack_sequence([torch.randn(3, 4), torch.randn(2, 4)]),
                    (torch.randn(2, 2, 6),)),
        "two hidden states",
    ),
}


@pytest.mark.parametrize("name", CALLS)
def test_forward_errors_match_nn_lstm(name):
    call, message = CALLS[name]
    reference, ours = both(4, 6, 2)
    expected = raised(lambda: call(reference))
    assert expected is not None, "nn.LSTM accepts this input; the case is wrong"
    with pytest.raises(type(expected), match=message):
        call(ours)


def test_empty_batch_like_nn_lstm():
    reference, ours = both(4, 6, 2)
    x = torch.randn(3, 0, 4)
    expected, (expected_h, _) = reference(x)
    output, (h, c) = ours(x)
    assert output.shape == expected.shape == (3, 0, 6)
    assert h.shape == expected_h.shape == c.shape == (2, 0, 6)


CONSTRUCTORS = [
    ((4, 0), {}), ((0, 5), {}), ((-1, 5), {}), ((4, 5, 0), {}), ((4, 5), {"dropout": 1.5}),
    ((4, 5), {"dropout": True}), ((4, 5), {"proj_size": 5}), ((4, 5), {"proj_size": -1}),
    ((4.0, 5), {}), ((4, 5), {"num_layers": 1.5}),
]


@pytest.mark.parametrize("args,kwargs", CONSTRUCTORS, ids=str)
def test_constructor_errors_match_nn_lstm(args, kwargs):
    expected = raised(lambda: nn.LSTM(*args, **kwargs))
    assert expected is not None
    with pytest.raises(type(expected)) as error:
        lstm_ext.LSTM(*args, **kwargs)
    assert str(error.value) == str(expected)


def test_constructor_warning_matches_nn_lstm():
    with warnings.catch_warnings(record=True) as expected:
        warnings.simplefilter("always")
        nn.LSTM(4, 5, 1, dropout=0.5)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        lstm_ext.LSTM(4, 5, 1, dropout=0.5)
    assert [str(w.message) for w in ours] == [str(w.message) for w in expected]
    assert "num_layers greater than 1" in str(ours[0].message)


@pytest.mark.parametrize("batch_sizes,rows,message", [
    ([2, 3], 5, "positive and non-increasing"),
    ([2, 0], 2, "positive and non-increasing"),
    ([2, 1], 4, "packed input has 4 rows but batch_sizes sum to 3"),
], ids=["growing", "zero", "rows"])
def test_a_malformed_packed_sequence_is_refused_with_what_is_wrong(batch_sizes, rows, message):
    """torch's pack_* functions never make these, but a PackedSequence can be built by hand:
    we refuse each with a RuntimeError saying what is wrong (nn.LSTM fails on the first with a
    shape error and runs the other two on whatever memory they describe)."""
    sequence = PackedSequence(torch.randn(rows, 4), torch.tensor(batch_sizes))
    with pytest.raises(RuntimeError, match=message):
        lstm_ext.LSTM(4, 5)(sequence)


CELL_CALLS = {
    "3-D input": (lambda m: m(torch.randn(1, 2, 4)), "Expected input to be 1D or 2D"),
    "3-D state": (lambda m: m(torch.randn(2, 4), (torch.randn(1, 2, 6), torch.randn(2, 6))),
                  r"Expected hx\[0\] to be 1D or 2D"),
    "feature size": (lambda m: m(torch.randn(2, 3)), "inconsistent input_size: got 3 expected 4"),
    "state batch": (lambda m: m(torch.randn(2, 4), (torch.randn(3, 6), torch.randn(2, 6))),
                    "Input batch size 2 doesn't match hidden0 batch size 3"),
    "cell batch": (lambda m: m(torch.randn(2, 4), (torch.randn(2, 6), torch.randn(3, 6))),
                   "Input batch size 2 doesn't match hidden1 batch size 3"),
    "input dtype": (lambda m: m(torch.randn(2, 4, dtype=torch.float64)), "dtype"),
    "state dtype": (lambda m: m(torch.randn(2, 4), (torch.randn(2, 6).double(), torch.randn(2, 6))),
                    r"hx\[0\] has dtype torch.float64"),
    "three states": (lambda m: m(torch.randn(2, 4), (torch.randn(2, 6),) * 3),
                     "two hidden states"),
    "one state": (lambda m: m(torch.randn(2, 4), (torch.randn(2, 6),)), "two hidden states"),
    # A tensor where the (h, c) pair belongs: also one whose two rows would pass for h and c.
    **{f"state as one tensor of {rows} rows": (
        lambda m, rows=rows: m(torch.randn(rows, 4), torch.randn(rows, 6)),
        "must be tuple of Tensors, not Tensor") for rows in (2, 3)},
}


@pytest.mark.parametrize("name", CELL_CALLS)
def test_cell_errors_match_nn_lstmcell(name):
    call, message = CELL_CALLS[name]
    torch.manual_seed(0)
    reference = nn.LSTMCell(4, 6)
    expected = raised(lambda: call(reference))
    assert expected is not None
    with pytest.raises(type(expected), match=message):
        call(lstm_ext.LSTMCell.from_torch(reference))
