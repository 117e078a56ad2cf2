"""The LSTM variants nn.LSTM lacks, each against a pure-PyTorch reference of its paper's
equations. Weight drop (DropConnect on W_hh, AWD-LSTM): nn.LSTM run with W_hh * M / (1 - p)
for the masks the module drew, outputs and every gradient in fp64; the masks' rate, freshness
and repeatability; eval mode; torch.compile; errors; state_dict; the driver's option."""

import copy

import pytest
import torch
from torch import nn

import lstm_ext
from conftest import Case, compare
from lstm_ext.lm.config import TrainConfig
from lstm_ext.lm.model import build_model

CONFIGS = [
    dict(input_size=5, hidden_size=7, num_layers=2, bidirectional=True),
    dict(input_size=4, hidden_size=9, num_layers=1, proj_size=3),
    dict(input_size=3, hidden_size=6, num_layers=2, batch_first=True),
]


def drawn_masks(reference, p, seed):
    """The masks (already divided by 1 - p) a module seeded with `seed` draws, in its order:
    layer by layer, direction by direction, one per W_hh, each entry kept where a uniform draw
    is at least p (the documented draw, so that torch.manual_seed repeats it)."""
    torch.manual_seed(seed)
    suffixes = ["", "_reverse"] if reference.bidirectional else [""]
    masks = {}
    for layer in range(reference.num_layers):
        for suffix in suffixes:
            weight = getattr(reference, f"weight_hh_l{layer}{suffix}")
            masks[f"weight_hh_l{layer}{suffix}"] = (torch.rand_like(weight) >= p) / (1 - p)
    return masks


class MaskedReference(nn.Module):
    """nn.LSTM computing with W_hh * mask, the masked weight made from the raw parameter so that
    gradients reach the parameter through the mask; parameters named as nn.LSTM's."""

    def __init__(self, lstm, masks):
        super().__init__()
        self.lstm, self.masks = lstm, masks

    def named_parameters(self, *args, **kwargs):
        return self.lstm.named_parameters(*args, **kwargs)

    def forward(self, input, hx=None):
        weights = {name: value * self.masks[name] if name in self.masks else value
                   for name, value in self.lstm.named_parameters()}
        return torch.func.functional_call(self.lstm, weights, (input, hx))


@pytest.mark.parametrize("kind", ["padded", "packed_unsorted"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_weight_drop_is_nn_lstm_with_the_masked_recurrent_weights(config, kind):
    torch.manual_seed(0)
    reference = nn.LSTM(**config, dtype=torch.float64)
    ours = lstm_ext.LSTM(**config, weight_drop=0.4, dtype=torch.float64)
    ours.load_state_dict(reference.state_dict())
    case = Case(reference, kind, steps=6, batch=4)
    torch.manual_seed(7)
    actual = case.run(ours)
    expected = case.run(MaskedReference(reference, drawn_masks(reference, 0.4, seed=7)))
    compare(actual, expected, 1e-10)
    # A wrong mask would not show if the masks dropped nothing.
    assert all(bool((m == 0).any()) for m in drawn_masks(reference, 0.4, seed=7).values())


def test_weight_drop_masks_drop_at_the_rate_asked_afresh_each_forward_and_repeat_by_seed():
    """A dropped weight gets no gradient: the zeros of W_hh's gradient are the mask's."""
    module = lstm_ext.LSTM(16, 64, num_layers=2, bidirectional=True, weight_drop=0.3)
    x = torch.randn(8, 5, 16)

    def zero_pattern(seed):
        torch.manual_seed(seed)
        module.zero_grad()
        module(x)[0].sum().backward()
        return {name: p.grad == 0 for name, p in module.named_parameters()}

    first, second, repeat = zero_pattern(1), zero_pattern(2), zero_pattern(1)
    for name, dropped in first.items():
        if not name.startswith("weight_hh"):
            assert not dropped.any(), name  # nothing else is dropped
            continue
        assert abs(dropped.double().mean().item() - 0.3) < 0.02, name
        assert not torch.equal(dropped, second[name]), name  # a new mask per forward
        assert torch.equal(dropped, repeat[name]), name  # torch.manual_seed repeats it
    # Each layer and direction draws its own mask.
    assert not torch.equal(first["weight_hh_l0"], first["weight_hh_l0_reverse"])


def test_weight_drop_in_eval_mode_uses_the_weights_as_they_are():
    torch.manual_seed(0)
    dropping = lstm_ext.LSTM(5, 8, num_layers=2, weight_drop=0.5).eval()
    plain = lstm_ext.LSTM(5, 8, num_layers=2)
    plain.load_state_dict(dropping.state_dict())
    x = torch.randn(6, 3, 5)
    assert torch.equal(dropping(x)[0], plain(x)[0])
    assert not torch.equal(dropping.train()(x)[0], plain(x)[0])


def test_weight_drop_gradcheck():
    module = lstm_ext.LSTM(3, 4, weight_drop=0.5, dtype=torch.float64)
    weight = module.weight_hh_l0.detach().clone().requires_grad_()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)

    def run(x, weight):
        torch.manual_seed(3)  # the same mask for every evaluation
        return torch.func.functional_call(module, {"weight_hh_l0": weight}, (x,))[0]

    assert torch.autograd.gradcheck(run, (x, weight))


def test_weight_drop_compiles_and_keeps_its_state_dict():
    torch.manual_seed(0)
    module = lstm_ext.LSTM(4, 32, weight_drop=0.25)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(5, 3, 4)
    compiled(x)[0].sum().backward()
    dropped = (module.weight_hh_l0.grad == 0).double().mean().item()
    assert 0.15 < dropped < 0.35
    assert module.weight_ih_l0.grad.ne(0).all()
    compiled.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(x)[0], module.eval()(x)[0], atol=1e-6)
    assert module.state_dict().keys() == nn.LSTM(4, 32).state_dict().keys()
    assert "weight_drop=0.25" in repr(module)
    assert copy.deepcopy(module).weight_drop == 0.25


def test_weight_drop_of_one_drops_every_recurrent_weight():
    module = lstm_ext.LSTM(3, 5, weight_drop=1.0)
    without_recurrence = lstm_ext.LSTM(3, 5)
    without_recurrence.load_state_dict(module.state_dict())
    with torch.no_grad():
        without_recurrence.weight_hh_l0.zero_()
    x = torch.randn(4, 2, 3)
    assert torch.equal(module(x)[0], without_recurrence(x)[0])


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.5", True])
def test_bad_weight_drop_is_refused_with_what_to_fix(value):
    with pytest.raises(ValueError, match="weight_drop is the probability"):
        lstm_ext.LSTM(4, 8, weight_drop=value)


def test_the_drivers_weight_drop():
    model = build_model(TrainConfig(hidden=8, emb=4, weight_drop=0.3), 10)
    assert model.lstm.weight_drop == 0.3
    with pytest.raises(ValueError, match="--weight-drop"):
        build_model(TrainConfig(impl="torch", hidden=8, emb=4, weight_drop=0.3), 10)
