"""The forget-gate initialisations nn.LSTM lacks (lstm_ext.initialize_gates and the LSTM /
LSTMCell keyword options): exactly the documented biases, everything else as nn.LSTM draws it,
nothing changed when they are off, and the driver's --forget-bias for either implementation."""

import math

import pytest
import torch
from torch import nn

import lstm_ext
from lstm_ext.lm.config import TrainConfig
from lstm_ext.lm.model import build_model

H = 6


def drawn(module_type, seed=0, **options):
    torch.manual_seed(seed)
    if module_type in (nn.LSTMCell, lstm_ext.LSTMCell):
        return module_type(4, H, **options)
    return module_type(4, H, num_layers=2, bidirectional=True, **options)


@pytest.mark.parametrize("kind", ["LSTM", "LSTMCell"])
def test_off_by_default_the_weights_are_nn_lstms(kind):
    ours, theirs = drawn(getattr(lstm_ext, kind)), drawn(getattr(nn, kind))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    assert repr(ours).replace("lstm_ext.nn.", "") == repr(theirs)


@pytest.mark.parametrize("kind", ["LSTM", "LSTMCell"])
def test_forget_bias_adds_to_the_forget_gates_input_bias_only(kind):
    ours = drawn(getattr(lstm_ext, kind), forget_bias=1.5)
    theirs = drawn(getattr(nn, kind))
    for name, value in theirs.state_dict().items():
        expected = value.clone()
        if name.startswith("bias_ih"):
            expected[H:2 * H] += 1.5
        assert torch.equal(ours.state_dict()[name], expected), name
    assert "forget_bias=1.5" in repr(ours)
    # The same function on torch's own module gives the same weights.
    torch_module = drawn(getattr(nn, kind))
    lstm_ext.initialize_gates(torch_module, forget_bias=1.5)
    for name, value in torch_module.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name


def test_chrono_initialisation():
    """b_f = log(u), u ~ U(1, T_max - 1), b_i = -b_f, recurrent b_hf = b_hi = 0, the other
    gates and all weights as drawn by default."""
    ours = drawn(lstm_ext.LSTM, init="chrono", chrono_max_len=100)
    theirs = drawn(nn.LSTM)
    for name, value in theirs.state_dict().items():
        got = ours.state_dict()[name]
        if name.startswith("bias_ih"):
            forget, input_gate = got[H:2 * H], got[:H]
            assert (forget >= 0).all() and (forget <= math.log(99)).all()
            assert forget.std() > 0.3  # drawn per unit, not one constant
            assert torch.equal(input_gate, -forget)
            assert torch.equal(got[2 * H:], value[2 * H:])
        elif name.startswith("bias_hh"):
            assert not got[:2 * H].any() and torch.equal(got[2 * H:], value[2 * H:])
        else:
            assert torch.equal(got, value), name
    # Under a seed, the draw is repeatable; reset_parameters applies it again.
    again = drawn(lstm_ext.LSTM, init="chrono", chrono_max_len=100)
    assert torch.equal(again.bias_ih_l1, ours.bias_ih_l1)
    ours.reset_parameters()
    assert torch.equal(ours.bias_ih_l0[:H], -ours.bias_ih_l0[H:2 * H])
    assert "init='chrono', chrono_max_len=100" in repr(ours)


def test_state_dicts_still_move_both_ways_and_options_survive_copies():
    import copy
    import pickle

    ours = drawn(lstm_ext.LSTM, forget_bias=1.0)
    torch_copy = ours.to_torch()
    for name, value in ours.state_dict().items():
        assert torch.equal(torch_copy.state_dict()[name], value)
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert clone.forget_bias == 1.0


@pytest.mark.parametrize("options,message", [
    ({"init": "glorot"}, "init must be one of"),
    ({"init": "chrono"}, "needs chrono_max_len"),
    ({"init": "chrono", "chrono_max_len": 1}, "needs chrono_max_len"),
    ({"chrono_max_len": 50}, "used by init='chrono' only"),
    ({"forget_bias": 1.0, "bias": False}, "need bias=True"),
])
def test_bad_gate_options_are_refused_with_what_to_fix(options, message):
    with pytest.raises(ValueError, match=message):
        lstm_ext.LSTM(4, H, **options)


@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_the_drivers_forget_bias_for_either_implementation(impl):
    plain = build_model(TrainConfig(impl=impl, hidden=H, emb=4), 10)
    raised = build_model(TrainConfig(impl=impl, hidden=H, emb=4, forget_bias=1.0), 10)
    for name, value in plain.state_dict().items():
        expected = value.clone()
        if name.startswith("lstm.bias_ih"):
            expected[H:2 * H] += 1.0
        assert torch.equal(raised.state_dict()[name], expected), name
