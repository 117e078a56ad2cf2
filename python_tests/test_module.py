"""Module behaviour beyond the forward pass: state_dict round trips with torch.nn, pickling,
deepcopy, .to(), train/eval dropout, gradients in eval mode and double backward."""

import copy
import io
import inspect
import pickle

import pytest
import torch
import torch.nn.utils.prune  # noqa: F401 - nn.utils.prune
from torch import nn

import lstm_ext
from conftest import layers_spy, rel_error
from lstm_ext import nn as lstm_nn

CONFIGS = [
    dict(input_size=4, hidden_size=6),
    dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True, proj_size=3),
    dict(input_size=4, hidden_size=6, num_layers=3, bias=False, batch_first=True, dropout=0.2),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_state_dict_moves_both_ways(config):
    torch_module = nn.LSTM(**config)
    ours = lstm_ext.LSTM(**config)
    assert list(ours.state_dict()) == list(torch_module.state_dict())
    for (name, a), (_, b) in zip(ours.named_parameters(), torch_module.named_parameters()):
        assert a.shape == b.shape, name
    ours.load_state_dict(torch_module.state_dict(), strict=True)
    torch_module.load_state_dict(ours.state_dict(), strict=True)
    for name, value in torch_module.state_dict().items():
        assert torch.equal(value, ours.state_dict()[name])
    back = ours.to_torch()
    assert isinstance(back, nn.LSTM) and not isinstance(ours, nn.LSTM)
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(ours.eval()(x)[0], back.eval()(x)[0], rtol=1e-5, atol=1e-6)


def test_same_initialisation_as_nn_lstm():
    config = CONFIGS[1]
    torch.manual_seed(11)
    torch_module = nn.LSTM(**config)
    torch.manual_seed(11)
    ours = lstm_ext.LSTM(**config)
    for name, value in torch_module.state_dict().items():
        assert torch.equal(value, ours.state_dict()[name]), name


def test_repr_and_config_like_nn_lstm():
    config = CONFIGS[1]
    assert repr(lstm_ext.LSTM(**config)) == repr(nn.LSTM(**config))
    assert repr(lstm_ext.LSTMCell(4, 6)) == repr(nn.LSTMCell(4, 6))


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_pickle_deepcopy_and_torch_save(config):
    module = lstm_ext.LSTM(**config).eval()
    x = torch.randn(3, 2, 4)
    expected = module(x)[0]
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    copies = [
        pickle.loads(pickle.dumps(module)),
        copy.deepcopy(module),
        torch.load(buffer, weights_only=False),
    ]
    for clone in copies:
        assert type(clone) is lstm_ext.LSTM
        torch.testing.assert_close(clone(x)[0], expected, rtol=0, atol=0)
    cell = lstm_ext.LSTMCell(4, 6)
    torch.testing.assert_close(pickle.loads(pickle.dumps(cell))(x[0])[0], cell(x[0])[0])


def test_a_whole_saved_model_loads_with_weights_only_where_nn_lstm_would(tmp_path):
    """torch.save(model) then torch.load(path) with the default weights_only=True, as
    pytorch/examples' word_language_model does with nn.LSTM allow-listed: with ours swapped in,
    the same allow-list (minus the LSTM classes, which `import lstm_ext` registers) suffices,
    and nothing else is needed to unpickle them."""
    torch.manual_seed(0)
    models = {}
    for name, lstm, cell in (("torch", nn.LSTM, nn.LSTMCell),
                             ("ours", lstm_ext.LSTM, lstm_ext.LSTMCell)):
        torch.manual_seed(0)
        models[name] = nn.ModuleDict({"lstm": lstm(4, 6, num_layers=2, proj_size=3),
                                      "cell": cell(4, 5), "head": nn.Linear(3, 2)}).eval()
        torch.save(models[name], tmp_path / f"{name}.pt")
    containers = [nn.ModuleDict, nn.Linear]
    needed = {name: set(torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / f"{name}.pt"))
              for name in models}
    assert needed["ours"] == needed["torch"] - {"torch.nn.modules.rnn.LSTM",
                                                "torch.nn.modules.rnn.LSTMCell"}
    x = torch.randn(3, 2, 4)
    with torch.serialization.safe_globals([*containers, nn.LSTM, nn.LSTMCell]):
        reference = torch.load(tmp_path / "torch.pt")
    with torch.serialization.safe_globals(containers):
        loaded = torch.load(tmp_path / "ours.pt")
    assert type(loaded["lstm"]) is lstm_ext.LSTM and type(loaded["cell"]) is lstm_ext.LSTMCell
    torch.testing.assert_close(loaded["lstm"](x), reference["lstm"](x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loaded["cell"](x[0]), reference["cell"](x[0]), rtol=1e-6,
                               atol=1e-6)
    # Registering ours opens nothing else: a file that needs another global is still refused.
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        torch.load(tmp_path / "ours.pt")


def test_to_dtype_and_double():
    module = lstm_ext.LSTM(4, 6, 2)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    reference = module.to_torch().double()
    output, _ = module.double()(x)
    assert output.dtype == torch.float64
    torch.testing.assert_close(output, reference(x)[0], rtol=1e-12, atol=1e-12)
    output, (h, c) = module.to(torch.bfloat16)(x.bfloat16())
    assert output.dtype == h.dtype == c.dtype == torch.bfloat16
    # ...and computes what fp64 does on the same rounded values, to bf16's own accuracy.
    reference.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
    expected, (expected_h, expected_c) = reference(x.bfloat16().double())
    for got, want in ((output, expected), (h, expected_h), (c, expected_c)):
        assert rel_error(got, want) <= 2 * 2**-8


def test_gradients_in_eval_mode():
    torch.manual_seed(1)
    module = lstm_ext.LSTM(4, 6, 2, dropout=0.5).double().eval()
    reference = module.to_torch().eval()
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    (grad_ours,) = torch.autograd.grad(module(x)[0].sum(), x)
    (grad_torch,) = torch.autograd.grad(reference(x)[0].sum(), x)
    torch.testing.assert_close(grad_ours, grad_torch, rtol=1e-10, atol=1e-12)


def _weight_norm(module, name):
    nn.utils.parametrizations.weight_norm(module, name)


def _spectral_norm(module, name):
    nn.utils.parametrizations.spectral_norm(module, name)


def _pruned(module, name):
    nn.utils.prune.l1_unstructured(module, name, amount=0.5)


@pytest.mark.parametrize("reweight", [_weight_norm, _spectral_norm, _pruned],
                         ids=["weight_norm", "spectral_norm", "prune"])
@pytest.mark.parametrize("packed", [False, True])
def test_weights_reparametrized_or_pruned_as_in_nn_lstm(reweight, packed):
    """torch.nn.utils' weight_norm, spectral_norm and pruning take a weight out of
    _parameters and compute it on access: the layers read that computed weight, as nn.LSTM's
    do, with the same outputs and gradients of what the user trains. (spectral_norm in eval
    mode: in training each access runs a power iteration, and nn.LSTM reads its weights twice a
    call where we read them once.)"""
    results = []
    for module_type in (nn.LSTM, lstm_ext.LSTM):
        torch.manual_seed(3)
        module = module_type(4, 6, 2, bidirectional=True, proj_size=3).double()
        for name in ("weight_ih_l0", "weight_hh_l1_reverse", "weight_hr_l0"):
            reweight(module, name)
        module.train(reweight is not _spectral_norm)
        torch.manual_seed(4)
        x = torch.randn(5, 3, 4, dtype=torch.float64)
        if packed:
            x = nn.utils.rnn.pack_padded_sequence(x, [5, 4, 2])
        output, (h, c) = module(x)
        output = output.data if packed else output
        (output.pow(2).sum() + h.sum() + c.pow(2).sum()).backward()
        results.append((output, h, c, dict(module.named_parameters())))
    (*expected, expected_params), (*got, params) = results
    assert params.keys() == expected_params.keys()
    for ours, reference in zip(got, expected):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    for name, parameter in params.items():
        torch.testing.assert_close(parameter.grad, expected_params[name].grad, rtol=1e-10,
                                   atol=1e-12, msg=name)


def test_module_double_backward():
    torch.manual_seed(2)
    module = lstm_ext.LSTM(3, 4, 2, bidirectional=True, proj_size=2).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, h, c: module(x, (h, c))[0], (x, h0, c0))


def test_gradient_penalty_matches_nn_lstm():
    """A second-order use (gradient penalty) gives nn.LSTM's parameter gradients."""
    torch.manual_seed(3)
    ours = lstm_ext.LSTM(3, 5, 2).double()
    reference = ours.to_torch()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)

    def penalty_grads(module):
        (grad_x,) = torch.autograd.grad(module(x)[0].pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.pow(2).sum(), list(module.parameters()))

    for a, b in zip(penalty_grads(ours), penalty_grads(reference)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


class DropoutSpy:
    """Records the masks the module's dropout applies inside it."""

    def __init__(self, monkeypatch):
        self.zero_fractions = []
        original = lstm_nn.dropout

        def spy(input, p, training=True, inplace=False):
            output = original(input, p, training, inplace)
            self.zero_fractions.append((output == 0).double().mean().item())
            return output

        monkeypatch.setattr(lstm_nn, "dropout", spy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_is_f_dropouts_function(p, dtype):
    """Zeros at the rate asked, every other entry x times 1 / (1 - p) (in fp32 for bf16),
    gradients through the same mask, on a non-contiguous input too; masks that follow the
    seed; the input itself in eval mode and with p 0, zeros with p 1."""
    torch.manual_seed(0)
    x = torch.randn(300, 700, dtype=torch.float64).to(dtype).t().requires_grad_()
    torch.manual_seed(1)
    y = lstm_nn.dropout(x, p)
    assert y.shape == x.shape and y.dtype == dtype
    kept = y != 0
    fraction = 1 - kept.double().mean().item()
    assert abs(fraction - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    math = torch.float32 if dtype == torch.bfloat16 else dtype
    expected = (x.detach().to(math) * torch.tensor(1 / (1 - p), dtype=math)).to(dtype)
    assert torch.equal(y[kept], expected[kept])
    weights = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    (grad,) = torch.autograd.grad((y * weights).sum(), x)
    assert torch.equal(grad != 0, kept)
    assert rel_error(grad[kept], weights[kept].double() / (1 - p)) < 2**-7
    torch.manual_seed(1)
    assert torch.equal(lstm_nn.dropout(x, p), y)
    assert not torch.equal(lstm_nn.dropout(x, p), y)
    assert lstm_nn.dropout(x, p, training=False) is x
    assert torch.equal(lstm_nn.dropout(x, 0.0), x)
    assert torch.equal(lstm_nn.dropout(x, 1.0), torch.zeros_like(x))
    inplace = x.detach().clone()
    torch.manual_seed(1)
    assert lstm_nn.dropout(inplace, p, inplace=True) is inplace
    assert torch.equal(inplace, y.detach())


def test_dropout_module_is_a_drop_in_for_nn_dropout():
    ours, reference = lstm_ext.Dropout(0.3), nn.Dropout(0.3)
    assert isinstance(ours, nn.Dropout) and repr(ours) == repr(reference)
    assert ours.state_dict() == reference.state_dict() == {}
    x = torch.randn(64, 1000)
    fraction = (ours(x) == 0).double().mean().item()
    assert abs(fraction - 0.3) < 0.01
    assert torch.equal(ours.eval()(x), x)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
            lstm_ext.Dropout(bad)
        with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
            lstm_nn.dropout(x, bad)


def test_dropout_between_layers_in_training_only(monkeypatch):
    spy = DropoutSpy(monkeypatch)
    module = lstm_ext.LSTM(16, 256, num_layers=3, dropout=0.3).double()
    x = torch.randn(20, 8, 16, dtype=torch.float64)
    module.train()
    module(x)
    # applied between layers only: 3 layers, 2 masks, each zeroing about 30 % of 40960 values
    assert len(spy.zero_fractions) == 2
    for fraction in spy.zero_fractions:
        assert abs(fraction - 0.3) < 0.02
    module.eval()
    spy.zero_fractions.clear()
    module(x)
    assert spy.zero_fractions == []


def test_dropout_reproducible_under_seed():
    module = lstm_ext.LSTM(4, 32, num_layers=2, dropout=0.5).double().train()
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    torch.manual_seed(21)
    first = module(x)[0]
    torch.manual_seed(21)
    again = module(x)[0]
    torch.manual_seed(22)
    other = module(x)[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    eval_output = module.eval()(x)[0]
    assert not torch.equal(first, eval_output)


def test_dropout_probability_one_matches_nn_lstm():
    """p = 1 zeroes layer 2's whole input in both implementations: outputs must agree."""
    torch.manual_seed(5)
    reference = nn.LSTM(4, 6, 2, dropout=1.0).double().train()
    ours = lstm_ext.LSTM.from_torch(reference)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], reference(x)[0], rtol=1e-10, atol=1e-12)


def test_no_state_saved_without_grad(monkeypatch):
    calls = []
    original = lstm_ext.ops.layer_forward

    def record(*args, **kwargs):
        calls.append(inspect.signature(original).bind(*args, **kwargs).arguments["training"])
        return original(*args, **kwargs)

    monkeypatch.setattr(lstm_nn.ops, "layer_forward", record)
    # With the layers composed in C++ too (lstm_layers, which passes training=False), as a
    # variant that acting in eval mode keeps the per-layer ops.
    for module in (lstm_ext.LSTM(4, 6), lstm_ext.LSTM(4, 6, zoneout=0.1).eval()):
        plain = not any(module.zoneout)
        monkeypatch.setattr(module, "_plain_in_inference", lambda: False)
        with torch.no_grad():
            module(torch.randn(3, 2, 4))
        module(torch.randn(3, 2, 4))
        assert calls == [False, True], module
        calls.clear()
        if plain:
            monkeypatch.undo()
            monkeypatch.setattr(lstm_nn.ops, "layer_forward", record)


@pytest.mark.parametrize("config", [
    dict(num_layers=3, proj_size=3),
    dict(num_layers=2, bidirectional=True, bias=False, batch_first=True),
    dict(num_layers=2, bidirectional=True, proj_size=2),
], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_inference_runs_every_layer_in_one_call_with_the_same_bits(monkeypatch, config, packed):
    """Without gradients a plain LSTM is one lstm_layers call (the layers composed in C++):
    the same bits as the layer ops called one by one from Python, in fp32 and fp64."""
    torch.manual_seed(len(config) + packed)
    calls = layers_spy(monkeypatch)
    for dtype in (torch.float32, torch.float64):
        module = lstm_ext.LSTM(5, 7, **config, dtype=dtype).eval()
        states = config["num_layers"] * (2 if config.get("bidirectional") else 1)
        x = torch.randn(6, 4, 5, dtype=dtype)
        if packed:
            x = nn.utils.rnn.pack_padded_sequence(x, [6, 5, 3, 1], enforce_sorted=False)
        elif config.get("batch_first"):
            x = x.transpose(0, 1)
        state = (torch.randn(states, 4, config.get("proj_size") or 7, dtype=dtype),
                 torch.randn(states, 4, 7, dtype=dtype))
        with torch.no_grad():
            fused, (h_fused, c_fused) = module(x, state)
            assert len(calls) == 1
            calls.clear()
            with monkeypatch.context() as patch:
                patch.setattr(module, "_plain_in_inference", lambda: False)
                layered, (h_layered, c_layered) = module(x, state)
            assert calls == []
        if packed:
            fused, layered = fused.data, layered.data
        for a, b in ((fused, layered), (h_fused, h_layered), (c_fused, c_layered)):
            assert torch.equal(a, b), dtype


@pytest.mark.parametrize("kwargs,train,fused", [
    (dict(num_layers=2, dropout=0.5), True, False),
    (dict(num_layers=2, dropout=0.5), False, True),
    (dict(recurrent_dropout=0.3), True, False),
    (dict(recurrent_dropout=0.3), False, True),
    (dict(weight_drop=0.3), True, False),
    (dict(weight_drop=0.3), False, True),
    (dict(zoneout=0.2), False, False),
    (dict(layer_norm=True), False, False),
    (dict(return_cell_sequence=True), False, False),
], ids=str)
def test_inference_in_one_call_only_where_nothing_else_acts(monkeypatch, kwargs, train, fused):
    """lstm_layers runs plain layers only: dropout between layers in training, recurrent
    dropout and weight drop in training, zoneout (its expectation in eval), LayerNorm and the
    cell sequence keep the per-layer ops; in eval the dropouts are off and it runs."""
    calls = layers_spy(monkeypatch)
    module = lstm_ext.LSTM(4, 6, **kwargs).train(train)
    with torch.no_grad():
        module(torch.randn(3, 2, 4))
    assert len(calls) == (1 if fused else 0)
    calls.clear()
    module(torch.randn(3, 2, 4))  # recording gradients: never
    assert calls == []
