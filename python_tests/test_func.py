"""torch.func transforms (grad, jacrev, jacfwd, vmap) over LSTM and LSTMCell: the layers run
as the differentiable reference there (ops.under_functorch), with nn.LSTM's gradients, the
fused kernels' gradients and masks for the variants, and vmap, which nn.LSTM has no batching
rule for."""

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, vmap

import lstm_ext
from lstm_ext import ops
from conftest import rel_error

TOL = {"rtol": 1e-10, "atol": 1e-12}
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}


def _params(module):
    return {name: p.detach() for name, p in module.named_parameters()}


def _loss(module, params, x):
    output, (h, c) = functional_call(module, params, (x,))
    return output.pow(2).sum() + h.sum() + c.pow(2).sum()


@pytest.mark.parametrize("config", [
    {},
    {"num_layers": 2, "bidirectional": True, "proj_size": 3, "batch_first": True},
], ids=["plain", "2-layer-bidirectional-projected"])
@pytest.mark.parametrize("unbatched", [False, True])
def test_grad_and_jacobians_match_nn_lstm(config, unbatched):
    torch.manual_seed(0)
    reference = nn.LSTM(4, 6, **config).double()
    ours = lstm_ext.LSTM.from_torch(reference)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    x = x[:, 0] if unbatched else x
    expected_params = {k: v.requires_grad_() for k, v in _params(reference).items()}
    x_leaf = x.clone().requires_grad_()
    expected = torch.autograd.grad(_loss(reference, expected_params, x_leaf),
                                   [*expected_params.values(), x_leaf])

    got_params, got_x = grad(lambda p, x: _loss(ours, p, x), argnums=(0, 1))(_params(ours), x)
    for want, name in zip(expected, expected_params):
        torch.testing.assert_close(got_params[name], want, **TOL, msg=name)
    torch.testing.assert_close(got_x, expected[-1], **TOL)

    def output(x):
        return ours(x)[0]
    jacobian = torch.autograd.functional.jacobian(lambda x: reference(x)[0], x)
    torch.testing.assert_close(jacrev(output)(x), jacobian, **TOL)
    torch.testing.assert_close(jacfwd(output)(x), jacobian, **TOL)


@pytest.mark.parametrize("module_type", [nn.LSTM, nn.LSTMCell])
def test_forward_mode_ad_matches_nn_lstm(module_type):
    """Dual tensors (torch.autograd.forward_ad) in the input and in every weight: the tangent
    of the output is nn.LSTM's."""
    torch.manual_seed(6)
    config = {"num_layers": 2, "bidirectional": True} if module_type is nn.LSTM else {}
    reference = module_type(4, 6, **config).double()
    ours = (lstm_ext.LSTM if module_type is nn.LSTM else lstm_ext.LSTMCell).from_torch(reference)
    x = torch.randn(*((5, 3, 4) if module_type is nn.LSTM else (3, 4)), dtype=torch.float64)
    x_tangent = torch.randn_like(x)
    tangents = {name: torch.randn_like(p) for name, p in reference.named_parameters()}

    def tangent_of_output(module):
        with forward_ad.dual_level():
            params = {name: forward_ad.make_dual(p.detach(), tangents[name])
                      for name, p in module.named_parameters()}
            output = functional_call(module, params, (forward_ad.make_dual(x, x_tangent),))
            return forward_ad.unpack_dual(output[0]).tangent
    torch.testing.assert_close(tangent_of_output(ours), tangent_of_output(reference), **TOL)


def test_cell_grad_matches_nn_lstmcell():
    torch.manual_seed(1)
    reference = nn.LSTMCell(4, 6).double()
    ours = lstm_ext.LSTMCell.from_torch(reference)
    x = torch.randn(3, 4, dtype=torch.float64)

    def loss(module, params, x):
        h, c = functional_call(module, params, (x,))
        return h.pow(2).sum() + c.sum()
    expected_params = {k: v.requires_grad_() for k, v in _params(reference).items()}
    expected = torch.autograd.grad(loss(reference, expected_params, x),
                                   list(expected_params.values()))
    got = grad(lambda p: loss(ours, p, x))(_params(ours))
    for want, name in zip(expected, expected_params):
        torch.testing.assert_close(got[name], want, **TOL, msg=name)


VARIANTS = {
    "layer_norm": {"layer_norm": True},
    "zoneout": {"zoneout": (0.2, 0.1)},
    "recurrent_dropout": {"recurrent_dropout": 0.3},
    "weight_drop": {"weight_drop": 0.4},
    "layer_norm_zoneout_cells": {"layer_norm": True, "zoneout": 0.1,
                                 "return_cell_sequence": True},
    "projected_bidirectional": {"proj_size": 3, "bidirectional": True, "num_layers": 2,
                                "dropout": 0.3},
}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("name", VARIANTS)
def test_variants_under_grad_match_the_fused_kernels(name, packed):
    """Under torch.func.grad the reference draws the same masks from the same seed as the fused
    kernels do under autograd, and gives their gradients."""
    torch.manual_seed(2)
    module = lstm_ext.LSTM(4, 6, **VARIANTS[name]).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    if packed:
        x = nn.utils.rnn.pack_padded_sequence(x, [5, 3, 2])

    def loss(params):
        output, (h, c), *cells = functional_call(module, params, (x,))
        output = output.data if packed else output
        extra = cells[0].data.pow(2).sum() if cells else 0
        return output.pow(2).sum() + h.sum() + c.pow(2).sum() + extra
    params = {k: v.requires_grad_() for k, v in _params(module).items()}
    torch.manual_seed(3)
    expected = torch.autograd.grad(loss(params), list(params.values()))
    torch.manual_seed(3)
    got = grad(loss)(_params(module))
    for want, key in zip(expected, params):
        torch.testing.assert_close(got[key], want, **TOL, msg=key)


def test_vmap_and_per_sample_gradients():
    torch.manual_seed(4)
    module = lstm_ext.LSTM(4, 6, 2).double()
    batches = torch.randn(7, 5, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(vmap(lambda x: module(x)[0])(batches),
                               torch.stack([module(x)[0] for x in batches]), **TOL)
    # Per-sample gradients, the use vmap(grad) is for: one sequence of the batch at a time.
    sequences = batches[0]

    def loss(params, sequence):
        return functional_call(module, params, (sequence.unsqueeze(1),))[0].pow(2).sum()
    per_sample = vmap(grad(loss), in_dims=(None, 1))(_params(module), sequences)
    for i in range(sequences.shape[1]):
        module.zero_grad()
        module(sequences[:, i:i + 1])[0].pow(2).sum().backward()
        for name, parameter in module.named_parameters():
            torch.testing.assert_close(per_sample[name][i], parameter.grad, **TOL, msg=name)
    # Inference (nothing needs a gradient) under vmap too: not the C++ call of every layer.
    with torch.no_grad():
        torch.testing.assert_close(vmap(lambda x: module(x)[0])(batches),
                                   torch.stack([module(x)[0] for x in batches]), **TOL)
    cell = lstm_ext.LSTMCell(4, 6).double()
    steps = torch.randn(7, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(vmap(lambda x: cell(x)[0])(steps),
                               torch.stack([cell(x)[0] for x in steps]), **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_under_grad_does_the_math_in_fp32(dtype):
    """bf16/fp16 storage: the reference runs in fp32 as the kernels' gate math does, so its
    gradients are the fp32 gradients of the rounded inputs, rounded once (within 1.5 unit
    roundoffs; the math in the storage dtype is several times further off)."""
    torch.manual_seed(5)
    module = lstm_ext.LSTM(4, 6).to(dtype)
    x = torch.randn(5, 3, 4).to(dtype)
    fp32 = lstm_ext.LSTM(4, 6)
    fp32.load_state_dict({k: v.float() for k, v in module.state_dict().items()})

    def loss(module, params, x):
        return functional_call(module, params, (x,))[0].float().pow(2).sum()
    got = grad(lambda p: loss(module, p, x))(_params(module))
    params = {k: v.requires_grad_() for k, v in _params(fp32).items()}
    expected = torch.autograd.grad(loss(fp32, params, x.float()), list(params.values()))
    for want, name in zip(expected, params):
        assert got[name].dtype == dtype
        assert rel_error(got[name], want) <= 1.5 * UNIT_ROUNDOFF[dtype], name


def test_outside_a_transform_the_fused_ops_run():
    assert not ops.under_transform()
    seen = []
    grad(lambda x: seen.append(ops.under_transform()) or x.sum())(torch.ones(2))
    assert seen == [True]


@pytest.mark.parametrize("module_type", [lstm_ext.LSTM, lstm_ext.LSTMCell])
def test_int8_modules_refuse_transforms_rather_than_answer_zeros(module_type):
    """The int8 ops have no derivative: without the refusal jacrev returned zeros."""
    torch.manual_seed(7)
    quantized = lstm_ext.quantize_dynamic(module_type(4, 6))
    x = torch.randn(*((5, 3, 4) if module_type is lstm_ext.LSTM else (3, 4)))
    with pytest.raises(RuntimeError, match="inference only"):
        jacrev(lambda x: quantized(x)[0])(x)
    with pytest.raises(RuntimeError, match="inference only"):
        with forward_ad.dual_level():
            quantized(forward_ad.make_dual(x, torch.ones_like(x)))
    quantized(x)  # and outside them it runs
