"""The LSTM variants nn.LSTM lacks, each against a pure-PyTorch reference of its paper's
equations. Weight drop (DropConnect on W_hh, AWD-LSTM): nn.LSTM run with W_hh * M / (1 - p)
for the masks the module drew. Recurrent dropout (Gal & Ghahramani) and zoneout (Krueger et
al.): a cell loop written here, with m * h_{t-1} entering every W_hh product and
c_t = d c_{t-1} + (1 - d) c~_t (h likewise). For each: outputs and every gradient in fp64, on
the fused recurrence and on the step loop; the masks' rate, freshness and repeatability; eval
mode; torch.compile; errors; state_dict; the driver's option."""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import lstm_ext
from conftest import Case, compare, rel_error
from lstm_ext import ops
from lstm_ext.lm.config import TrainConfig
from lstm_ext.lm.model import build_model

CONFIGS = [
    dict(input_size=5, hidden_size=7, num_layers=2, bidirectional=True),
    dict(input_size=4, hidden_size=9, num_layers=1, proj_size=3),
    # More than one block of projected units in the CPU's fused recurrence (32 in fp64).
    dict(input_size=4, hidden_size=40, num_layers=1, proj_size=35),
    dict(input_size=3, hidden_size=6, num_layers=2, batch_first=True),
]


def drawn_masks(reference, p, seed):
    """The masks (already divided by 1 - p) a module seeded with `seed` draws, in its order:
    layer by layer, direction by direction, one per W_hh, each entry kept with probability
    1 - p (the library's bernoulli_mask, tested on its own below, so that torch.manual_seed
    repeats it)."""
    torch.manual_seed(seed)
    suffixes = ["", "_reverse"] if reference.bidirectional else [""]
    masks = {}
    for layer in range(reference.num_layers):
        for suffix in suffixes:
            weight = getattr(reference, f"weight_hh_l{layer}{suffix}")
            masks[f"weight_hh_l{layer}{suffix}"] = ops.bernoulli_mask(
                weight.shape, 1 - p, 1 / (1 - p), weight.dtype, weight.device)
    return masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.03, 0.3, 0.5, 0.9])
def test_bernoulli_mask_keeps_each_entry_at_the_rate_asked_and_independently(p, dtype):
    """Every entry position of the generator's chunks (128 entries: four words of 32
    counters) at the rate, pairs within a chunk and across chunks at p^2, and the tail of a
    size that is no multiple of a chunk; each within 5 standard deviations."""
    torch.manual_seed(0)
    value = 1 / (1 - p)
    mask = ops.bernoulli_mask((1000, 1283), p, value, dtype, "cpu")
    assert mask.shape == (1000, 1283) and mask.dtype == dtype and mask.is_contiguous()
    kept = mask == torch.tensor(value, dtype=dtype)
    assert bool((kept | (mask == 0)).all())  # value or 0, nothing else

    def near(observed, rate, count):
        return abs(observed - rate) < 5 * (rate * (1 - rate) / count) ** 0.5

    flat = kept.flatten().double()
    assert near(flat.mean().item(), p, flat.numel())
    chunks = flat[:flat.numel() // 128 * 128].view(-1, 128)
    for position, rate in enumerate(chunks.mean(0).tolist()):
        assert near(rate, p, chunks.shape[0]), position
    for offset in [*range(1, 129), 256, 4096]:  # lanes, vectors, words, chunks
        both = (flat[:-offset] * flat[offset:]).mean().item()
        assert near(both, p * p, flat.numel() - offset), offset
    tail = flat[-(flat.numel() % 128 or 128):]
    assert tail.numel() < 128 and near(tail.mean().item(), p, tail.numel())


def test_bernoulli_mask_repeats_by_seed_whatever_the_threads_and_draws_afresh_otherwise():
    def draw(seed, threads, p=0.4):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(seed)
            return ops.bernoulli_mask((7, 30011), p, 1.0, torch.float32, "cpu")
        finally:
            torch.set_num_threads(before)

    first = draw(1, 2)
    assert torch.equal(first, draw(1, 1))  # tasks split by entries, not by threads
    assert torch.equal(first, draw(1, 2))
    assert not torch.equal(first, draw(2, 2))
    torch.manual_seed(1)
    one, two = (ops.bernoulli_mask((7, 30011), 0.4, 1.0, torch.float32, "cpu")
                for _ in range(2))
    assert torch.equal(one, first) and not torch.equal(one, two)  # each call draws anew
    # The generator moves on as torch's own draws do, so later draws differ too.
    torch.manual_seed(1)
    ops.bernoulli_mask((5,), 0.4, 1.0, torch.float32, "cpu")
    after_mask = torch.rand(3)
    torch.manual_seed(1)
    assert not torch.equal(after_mask, torch.rand(3))


def test_bernoulli_mask_edges_and_refusals():
    assert torch.equal(ops.bernoulli_mask((3, 5), 0.0, 2.0, torch.float64, "cpu"),
                       torch.zeros(3, 5, dtype=torch.float64))
    assert torch.equal(ops.bernoulli_mask((3, 5), 1.0, 2.0, torch.float32, "cpu"),
                       torch.full((3, 5), 2.0))
    assert ops.bernoulli_mask((0, 5), 0.5, 1.0, torch.float32, "cpu").shape == (0, 5)
    with pytest.raises(RuntimeError, match="probability must be between 0 and 1"):
        ops.bernoulli_mask((3,), 1.5, 1.0, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="dtype must be float32 or float64"):
        ops.bernoulli_mask((3,), 0.5, 1.0, torch.int32, "cpu")


def test_bernoulli_mask_under_compile_is_eagers_draw_and_never_merged():
    """Two equal calls in one training graph stay two draws (the op is tagged as random, so
    the joint graph's common-subexpression pass keeps both), and the compiled function draws
    what eager mode draws for the same seed, gradients included."""
    def two(x):
        first = ops.bernoulli_mask(x.shape, 0.5, 1.0, torch.float32, "cpu")
        second = ops.bernoulli_mask(x.shape, 0.5, 1.0, torch.float32, "cpu")
        return x * first + 2 * x * second

    x = torch.randn(64, 65, requires_grad=True)
    torch.manual_seed(5)
    (eager,) = torch.autograd.grad(two(x).sum(), x)
    compiled = torch.compile(two, fullgraph=True)
    torch.manual_seed(5)
    (grad,) = torch.autograd.grad(compiled(x).sum(), x)
    # One draw reused for both would leave only the gradients 0 and 3.
    assert {0.0, 1.0, 2.0, 3.0} == set(grad.unique().tolist())
    assert torch.equal(grad, eager)


def _weight_like(shape, dtype, layout):
    """A random weight of `shape`, contiguous or as the transpose of a contiguous tensor."""
    if layout == "transposed":
        return torch.randn(shape[::-1], dtype=dtype).t()
    return torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("shape", [(256, 64), (4 * 37, 37), (5, 3), (0, 4)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_drop_connect_is_the_weight_times_bernoulli_masks_draw_and_so_is_its_gradient(
        dtype, shape, layout):
    """The fused op (product and kept bits in one pass; the gradient from the bits) gives
    exactly weight * M and grad * M for the M bernoulli_mask draws from the same seed: whole
    chunks of 128 entries, a tail, a weight shorter than a chunk; inf and NaN entries as the
    product gives them; and double backward, whose gradient of the gradient is M too."""
    torch.manual_seed(0)
    p = 0.3
    weight = _weight_like(shape, dtype, layout)
    if weight.numel() > 2:
        weight[0, 0], weight[-1, -1] = float("inf"), float("nan")
    weight.requires_grad_()
    torch.manual_seed(11)
    mask = ops.bernoulli_mask(shape, 1 - p, 1 / (1 - p), dtype, "cpu")
    torch.manual_seed(11)
    output = ops.drop_connect(weight, p)
    assert output.dtype == dtype and output.shape == shape
    assert torch.equal(output.isnan(), (weight * mask).isnan())
    assert torch.equal(output.nan_to_num(), (weight * mask).nan_to_num())
    grad = _weight_like(shape, dtype, layout)
    (actual,) = torch.autograd.grad(output, weight, grad, create_graph=True)
    assert torch.equal(actual, grad * mask)
    if weight.numel():
        assert mask.unique().numel() == 2  # a mask with both values
        grad.requires_grad_()
        (again,) = torch.autograd.grad(output, weight, grad, create_graph=True)
        (second,) = torch.autograd.grad(again, grad, torch.ones_like(again))
        assert torch.equal(second, mask)
    torch.manual_seed(11)
    (plain,) = torch.autograd.grad(ops.drop_connect(weight, p), weight, grad)
    assert torch.equal(plain, grad.detach() * mask)


def test_drop_connect_elsewhere_and_its_refusals():
    """Other dtypes and p = 1 take torch ops (the mask in fp32 for bf16); the op itself refuses
    what it cannot do, with what to fix."""
    torch.manual_seed(0)
    weight = torch.randn(40, 7)
    torch.manual_seed(3)
    half = ops.drop_connect(weight.bfloat16(), 0.5)
    torch.manual_seed(3)
    mask = ops.bernoulli_mask(weight.shape, 0.5, 2.0, torch.float32, "cpu")
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, (weight.bfloat16() * mask).bfloat16())
    assert torch.equal(ops.drop_connect(weight, 1.0), torch.zeros_like(weight))
    with pytest.raises(RuntimeError, match="p must be at least 0 and below 1"):
        torch.ops.lstm_ext.drop_connect(weight, 1.0)
    with pytest.raises(RuntimeError, match="expected a float32 or float64 tensor"):
        torch.ops.lstm_ext.drop_connect(weight.bfloat16(), 0.5)
    _, kept = torch.ops.lstm_ext.drop_connect(weight, 0.5)
    with pytest.raises(RuntimeError, match="expected kept as drop_connect returned it"):
        torch.ops.lstm_ext.drop_connect_backward(torch.randn(60, 7), kept, 0.5)


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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts Linux page faults")
def test_weight_drop_training_steps_fault_in_no_fresh_pages_for_the_dropped_weight():
    """The dropped W_hh, its kept bits and W_hh's gradient come in memory kept across calls
    (workspace.h's saved buffers): 32 MiB each here in fp64, over glibc's largest mmap
    threshold, so a fresh one every step would fault in 8192 pages, each of them three times
    (the mask, the product, the gradient's product) as weight * mask did."""
    import resource

    torch.manual_seed(0)
    model = lstm_ext.LSTM(8, 1024, weight_drop=0.3, dtype=torch.float64)
    x = torch.randn(2, 1, 8, dtype=torch.float64)
    pages = 4 * 1024 * 1024 * 8 // 4096

    def step():
        model.zero_grad(set_to_none=True)
        model(x)[0].sum().backward()

    for _ in range(2):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
    assert faults < pages / 2, (faults, pages)
    assert abs((model.weight_hh_l0.grad == 0).double().mean().item() - 0.3) < 0.01


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


@pytest.mark.parametrize("option", ["weight_drop", "recurrent_dropout"])
def test_a_dropout_of_one_cuts_the_recurrence(option):
    """p = 1 drops every recurrent weight, or every unit of h_{t-1}: each step sees only its
    input (and c), as with W_hh = 0."""
    module = lstm_ext.LSTM(3, 5, **{option: 1.0})
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


@pytest.mark.parametrize("option, value", [
    ("weight_drop", 0.3), ("recurrent_dropout", 0.3), ("zoneout", (0.1, 0.05))])
def test_the_drivers_variant_options(option, value):
    model = build_model(TrainConfig(hidden=8, emb=4, **{option: value}), 10)
    assert getattr(model.lstm, option) == value
    with pytest.raises(ValueError, match="--" + option.replace("_", "-")):
        build_model(TrainConfig(impl="torch", hidden=8, emb=4, **{option: value}), 10)


def recurrent_masks(module, batch, p, seed, dtype=torch.float64):
    """The recurrent-dropout masks a module seeded with `seed` draws, in its order (layer by
    layer, direction by direction), each (batch, proj_size or hidden), 1 / (1 - p) with
    probability 1 - p, else 0."""
    return [masks[0] for masks in variant_masks(module, batch, 0, seed, dtype,
                                                recurrent_dropout=p)]


def variant_masks(module, batch, rows, seed, dtype=torch.float64, recurrent_dropout=0.0,
                  zoneout=(0.0, 0.0)):
    """Per layer-direction, in the module's order, the masks it draws when seeded with `seed`:
    (recurrent mask or None, zoneout d of c or None, d of h or None); d is (rows, size), 1
    with probability z."""
    torch.manual_seed(seed)
    directions = 2 if module.bidirectional else 1
    size = module.proj_size or module.hidden_size
    drawn = []
    for _ in range(module.num_layers * directions):
        mask = None
        if recurrent_dropout:
            mask = ops.bernoulli_mask((batch, size), 1 - recurrent_dropout,
                                      1 / (1 - recurrent_dropout), dtype, "cpu")
        zones = [ops.bernoulli_mask((rows, columns), z, 1.0, dtype, "cpu") if z else None
                 for z, columns in zip(zoneout, (module.hidden_size, size))]
        drawn.append((mask, *zones))
    return drawn


class CellLoopReference(nn.Module):
    """An LSTM with recurrent dropout and zoneout as a plain cell loop over nn.LSTM's
    parameters. Per layer-direction `masks` holds (m, d_c, d_h), any of them None: every step
    computes i, f, g, o = W_ih x_t + b_ih + W_hh (m * h_{t-1}) + b_hh (Gal & Ghahramani), then
    c_t = d_c c_{t-1} + (1 - d_c) c~_t and h_t = d_h h_{t-1} + (1 - d_h) h~_t (Krueger et
    al.), h~_t = o tanh(c~_t) (projected where proj_size is set). m has a row per sequence and
    d a row per row of data, both in the order the LSTM runs them (time-major, sorted by
    length for packed input); a d of one row serves every step (eval mode). With
    return_cells, the last layer's c_t of every step comes third, laid out as the output."""

    def __init__(self, lstm, masks=None, return_cells=False):
        super().__init__()
        directions = 2 if lstm.bidirectional else 1
        self.lstm, self.return_cells = lstm, return_cells
        self.masks = masks or [(None, None, None)] * (lstm.num_layers * directions)

    def named_parameters(self, *args, **kwargs):
        return self.lstm.named_parameters(*args, **kwargs)

    def forward(self, input, hx):
        lstm = self.lstm
        directions = 2 if lstm.bidirectional else 1
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            sizes = batch_sizes.tolist()
            h0, c0 = (state.index_select(1, sorted_indices) for state in hx)
        else:
            unbatched = input.dim() == 2
            x = input.unsqueeze(0 if lstm.batch_first else 1) if unbatched else input
            x = x.transpose(0, 1) if lstm.batch_first else x
            sizes = [x.shape[1]] * x.shape[0]
            data = x.reshape(-1, x.shape[-1])
            h0, c0 = (state.unsqueeze(1) if unbatched else state for state in hx)
        offsets = [sum(sizes[:t]) for t in range(len(sizes))]
        params = dict(lstm.named_parameters())
        layer_input, h_n, c_n = data, [], []
        for layer in range(lstm.num_layers):
            outputs, cell_sequences = [], []
            for direction in range(directions):
                index = layer * directions + direction
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                w_ih, w_hh = params["weight_ih" + suffix], params["weight_hh" + suffix]
                bias = params["bias_ih" + suffix] + params["bias_hh" + suffix]
                w_hr = params.get("weight_hr" + suffix)
                h, c = h0[index], c0[index]
                mask, d_c, d_h = self.masks[index]
                steps = range(len(sizes) - 1, -1, -1) if direction else range(len(sizes))
                out, cells = [None] * len(sizes), [None] * len(sizes)
                for t in steps:
                    n, rows = sizes[t], slice(offsets[t], offsets[t] + sizes[t])
                    x_t = layer_input[rows]
                    h_in = h[:n] if mask is None else mask[:n] * h[:n]
                    gates = x_t @ w_ih.t() + h_in @ w_hh.t() + bias
                    i, f, g, o = gates.chunk(4, 1)
                    c_t = torch.sigmoid(f) * c[:n] + torch.sigmoid(i) * torch.tanh(g)
                    h_t = torch.sigmoid(o) * torch.tanh(c_t)
                    if w_hr is not None:
                        h_t = h_t @ w_hr.t()
                    if d_c is not None:
                        d = d_c[rows] if len(d_c) > 1 else d_c
                        c_t = d * c[:n] + (1 - d) * c_t
                    if d_h is not None:
                        d = d_h[rows] if len(d_h) > 1 else d_h
                        h_t = d * h[:n] + (1 - d) * h_t
                    out[t], cells[t] = h_t, c_t
                    h, c = torch.cat([h_t, h[n:]]), torch.cat([c_t, c[n:]])
                outputs.append(torch.cat(out))
                cell_sequences.append(torch.cat(cells))
                h_n.append(h)
                c_n.append(c)
            layer_input = torch.cat(outputs, dim=-1)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        sequences = [layer_input] + [torch.cat(cell_sequences, dim=-1)] * self.return_cells
        if packed:
            sequences = [PackedSequence(t, batch_sizes, sorted_indices, unsorted_indices)
                         for t in sequences]
            return sequences[0], (h_n.index_select(1, unsorted_indices),
                                  c_n.index_select(1, unsorted_indices)), *sequences[1:]
        sequences = [t.view(len(sizes), sizes[0], -1) for t in sequences]
        if lstm.batch_first:
            sequences = [t.transpose(0, 1) for t in sequences]
        if unbatched:
            sequences = [t.squeeze(0 if lstm.batch_first else 1) for t in sequences]
            return sequences[0], (h_n[:, 0], c_n[:, 0]), *sequences[1:]
        return sequences[0], (h_n, c_n), *sequences[1:]


@pytest.mark.parametrize("path", ["recurrence", "step_loop"])
@pytest.mark.parametrize("kind", ["padded", "packed_unsorted", "unbatched"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_recurrent_dropout_is_the_cell_loop_with_the_masks_drawn(config, kind, path,
                                                                  monkeypatch):
    """fp64, outputs and every gradient, on the fused CPU recurrence and on the step loop
    (the CPU's path for a bf16 or fp16 projection, and the CUDA path)."""
    monkeypatch.setenv("LSTM_EXT_CPU_RECURRENCE", "1" if path == "recurrence" else "0")
    torch.manual_seed(0)
    reference = nn.LSTM(**config, dtype=torch.float64)
    ours = lstm_ext.LSTM(**config, recurrent_dropout=0.4, dtype=torch.float64)
    ours.load_state_dict(reference.state_dict())
    case = Case(reference, kind, steps=6, batch=4)
    batch = 1 if kind == "unbatched" else 4
    masks = recurrent_masks(reference, batch, 0.4, seed=3)
    torch.manual_seed(3)
    actual = case.run(ours)
    expected = case.run(CellLoopReference(reference, [(m, None, None) for m in masks]))
    compare(actual, expected, 1e-10)
    # A wrong mask would not show if the masks dropped nothing (or everything).
    assert all(bool((m == 0).any()) and bool((m != 0).any()) for m in masks)


def test_the_cell_loop_reference_is_nn_lstm_without_masks_and_frozen_with_full_zoneout():
    """The reference cell loop itself, checked where its answer is known."""
    torch.manual_seed(0)
    reference = nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=3,
                        dtype=torch.float64)
    case = Case(reference, "packed_unsorted", steps=6, batch=4)
    ones = [(torch.ones(4, 3, dtype=torch.float64), torch.zeros(1, 7, dtype=torch.float64),
             torch.zeros(1, 3, dtype=torch.float64))] * 4
    compare(case.run(CellLoopReference(reference, ones)), case.run(reference), 1e-12)
    frozen = [(None, torch.ones(1, 7, dtype=torch.float64),
               torch.ones(1, 3, dtype=torch.float64))] * 4
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    h0, c0 = torch.randn(4, 4, 3, dtype=torch.float64), torch.randn(4, 4, 7, dtype=torch.float64)
    output, (h_n, c_n) = CellLoopReference(reference, frozen)(x, (h0, c0))
    assert torch.equal(h_n, h0) and torch.equal(c_n, c0)
    assert torch.equal(output[:, :, :3], h0[2].expand(6, 4, 3))


@pytest.mark.parametrize("variant", ["recurrent_mask", "zoneout", "zoneout_eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (3, 64), (32, 70)], ids=str)
def test_the_ops_variants_in_fp32_and_bf16(dtype, shape, variant):
    """The variants' tensors in the kernels' other forms (direct dot products at one or three
    rows, panels with a partial block at 32 rows, bf16 storage) against the fp64 reference,
    training and inference; the error matches the same call without them."""
    batch, hidden = shape
    torch.manual_seed(1)
    steps, features = 7, 10
    tensors = [torch.randn(steps, batch, features), torch.randn(batch, hidden),
               torch.randn(batch, hidden), torch.randn(4 * hidden, features) * 0.2,
               torch.randn(4 * hidden, hidden) * 0.2, torch.randn(4 * hidden)]
    rows = steps * batch
    drawn = {
        "recurrent_mask": {"recurrent_mask": ((torch.rand(batch, hidden) >= 0.3) / 0.7).float()},
        "zoneout": {"zoneout_cell": (torch.rand(rows, hidden) < 0.3).float(),
                    "zoneout_hidden": (torch.rand(rows, hidden) < 0.2).float()},
        "zoneout_eval": {"zoneout_cell": torch.full((1, hidden), 0.3),
                         "zoneout_hidden": torch.full((1, hidden), 0.2)},
    }[variant]

    def errors(variants):
        def run(function, run_dtype, **kwargs):
            args = [t.to(run_dtype).requires_grad_() for t in tensors]
            math = {name: t.to(ops.math_dtype(run_dtype)) for name, t in variants.items()}
            outputs = function(*args, None, None, None, False, **math, **kwargs)
            loss = sum((o.double() * w).sum() for o, w in zip(outputs, weights))
            grads = torch.autograd.grad(loss, [args[0], args[1], args[2], args[4]])
            return [t.double() for t in (*outputs, *grads)]

        expected = run(ops.reference_layer_forward, torch.float64)
        actual = run(ops.layer_forward, dtype, training=True)
        with torch.no_grad():
            math = {name: t.to(ops.math_dtype(dtype)) for name, t in variants.items()}
            inference = [t.double() for t in ops.layer_forward(
                *[t.to(dtype) for t in tensors], None, None, None, False, False, **math)]
        return max(rel_error(a, e) for a, e in zip(actual + inference, expected + expected[:3]))

    weights = [torch.randn(s, dtype=torch.float64) for s in
               [(steps, batch, hidden), (batch, hidden), (batch, hidden)]]
    with_variant, without = errors(drawn), errors({})
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    assert with_variant < bound and without < bound
    assert with_variant < 3 * without + 1e-6


def test_recurrent_dropout_masks_drop_at_the_rate_asked_afresh_each_forward_and_repeat_by_seed():
    """h0's gradient reaches it only through the mask (no output reads h0), so its zeros are
    the mask's: one per layer-direction, a fresh one per forward, the same for the same
    seed."""
    module = lstm_ext.LSTM(16, 64, num_layers=2, bidirectional=True, recurrent_dropout=0.3)
    x = torch.randn(5, 200, 16)

    def zero_pattern(seed):
        torch.manual_seed(seed)
        h0 = torch.randn(4, 200, 64, requires_grad=True)
        c0 = torch.randn(4, 200, 64)
        module(x, (h0, c0))[0].sum().backward()
        return h0.grad == 0

    first, second, repeat = zero_pattern(1), zero_pattern(2), zero_pattern(1)
    assert abs(first.double().mean().item() - 0.3) < 0.02
    assert not torch.equal(first, second)
    assert torch.equal(first, repeat)
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])


def test_recurrent_dropout_in_eval_mode_is_the_plain_lstm():
    torch.manual_seed(0)
    dropping = lstm_ext.LSTM(5, 8, num_layers=2, recurrent_dropout=0.5).eval()
    plain = lstm_ext.LSTM(5, 8, num_layers=2)
    plain.load_state_dict(dropping.state_dict())
    x = torch.randn(6, 3, 5)
    assert torch.equal(dropping(x)[0], plain(x)[0])
    assert not torch.equal(dropping.train()(x)[0], plain(x)[0])
    with torch.no_grad():  # training mode without gradients still drops
        assert not torch.equal(dropping(x)[0], plain(x)[0])


def test_recurrent_dropout_gradcheck_and_gradgradcheck():
    module = lstm_ext.LSTM(3, 4, proj_size=2, recurrent_dropout=0.5, dtype=torch.float64)
    weight = module.weight_hh_l0.detach().clone().requires_grad_()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)

    def run(x, weight):
        torch.manual_seed(3)  # the same masks for every evaluation
        return torch.func.functional_call(module, {"weight_hh_l0": weight}, (x,))[0]

    assert torch.autograd.gradcheck(run, (x, weight))
    assert torch.autograd.gradgradcheck(run, (x, weight))


def test_recurrent_dropout_under_autocast_follows_the_fp64_reference():
    torch.manual_seed(0)
    reference = nn.LSTM(6, 32, num_layers=2, dtype=torch.float64)
    ours = lstm_ext.LSTM(6, 32, num_layers=2, recurrent_dropout=0.25)
    ours.load_state_dict(reference.state_dict())
    case = Case(reference, "padded", steps=8, batch=5)
    torch.manual_seed(4)
    actual = case.run(ours, dtype=torch.float32, autocast=True)
    assert actual["output"].dtype == torch.bfloat16
    masks = recurrent_masks(reference, 5, 0.25, seed=4, dtype=torch.float32)
    expected = case.run(CellLoopReference(reference, [(m.double(), None, None) for m in masks]))
    errors = compare(actual, expected, 5e-2)
    assert errors["output"] < 2e-2


def test_recurrent_dropout_compiles_and_keeps_its_state_dict():
    torch.manual_seed(0)
    module = lstm_ext.LSTM(4, 32, recurrent_dropout=0.25)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(5, 300, 4)
    h0 = torch.randn(1, 300, 32, requires_grad=True)
    compiled(x, (h0, torch.zeros(1, 300, 32)))[0].sum().backward()
    dropped = (h0.grad == 0).double().mean().item()
    assert 0.2 < dropped < 0.3
    compiled.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(x)[0], module.eval()(x)[0], atol=1e-6)
    assert module.state_dict().keys() == nn.LSTM(4, 32).state_dict().keys()
    assert "recurrent_dropout=0.25" in repr(module)
    assert copy.deepcopy(module).recurrent_dropout == 0.25


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.5", True])
def test_bad_recurrent_dropout_is_refused_with_what_to_fix(value):
    with pytest.raises(ValueError, match="recurrent_dropout is the probability"):
        lstm_ext.LSTM(4, 8, recurrent_dropout=value)


@pytest.mark.parametrize("bad, message", [
    (torch.ones(3, 7), r"recurrent_mask \(batch, proj_size or hidden\) of shape \[2, 6\]"),
    (torch.ones(2, 6, dtype=torch.float64), "recurrent_mask must have the math dtype Float"),
])
def test_a_bad_recurrent_mask_is_refused_by_the_op(bad, message):
    args = [torch.randn(4, 2, 3), torch.randn(2, 6), torch.randn(2, 6), torch.randn(24, 3),
            torch.randn(24, 6)]
    with pytest.raises(RuntimeError, match=message):
        ops.layer_forward(*args, recurrent_mask=bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("option", ["weight_drop", "recurrent_dropout"])
def test_variants_run_in_a_module_of_low_precision(option, dtype):
    """The masks are made in fp32 and the weights stay in the module's dtype (a bf16 module
    with weight_drop once failed with "w_hh has dtype Float")."""
    torch.manual_seed(0)
    module = lstm_ext.LSTM(4, 16, **{option: 0.3}).to(dtype)
    x = torch.randn(5, 3, 4, dtype=dtype, requires_grad=True)
    output, (h_n, c_n) = module(x)
    assert output.dtype == h_n.dtype == c_n.dtype == dtype
    output.float().sum().backward()
    assert x.grad.dtype == dtype and x.grad.isfinite().all()


def case_rows(case):
    """Rows of data the LSTM runs for a case (T * B, or the packed total)."""
    if case.kind.startswith("packed"):
        return sum(len(leaf) for leaf in case.leaves)
    return case.leaves[0].shape[0] * case.leaves[0].shape[1] if case.kind != "unbatched" \
        else case.leaves[0].shape[0]


@pytest.mark.parametrize("path", ["recurrence", "step_loop"])
@pytest.mark.parametrize("kind", ["padded", "packed_unsorted", "unbatched"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_zoneout_is_the_cell_loop_with_the_masks_drawn(config, kind, path, monkeypatch):
    """Training (fresh d per step, sequence and unit; with recurrent dropout too, whose mask
    is drawn first) and eval (d = z), fp64, outputs and every gradient, both CPU paths."""
    monkeypatch.setenv("LSTM_EXT_CPU_RECURRENCE", "1" if path == "recurrence" else "0")
    torch.manual_seed(0)
    reference = nn.LSTM(**config, dtype=torch.float64)
    ours = lstm_ext.LSTM(**config, zoneout=(0.3, 0.2), recurrent_dropout=0.25,
                         dtype=torch.float64)
    ours.load_state_dict(reference.state_dict())
    case = Case(reference, kind, steps=6, batch=4)
    batch, rows = (1 if kind == "unbatched" else 4), case_rows(case)
    masks = variant_masks(reference, batch, rows, seed=7, recurrent_dropout=0.25,
                          zoneout=(0.3, 0.2))
    torch.manual_seed(7)
    compare(case.run(ours), case.run(CellLoopReference(reference, masks)), 1e-10)
    drawn = torch.cat([d.flatten() for m in masks for d in m[1:]])
    assert (drawn == 1).any() and (drawn == 0).any()

    size = reference.proj_size or reference.hidden_size
    expectation = [(None, torch.full((1, reference.hidden_size), 0.3, dtype=torch.float64),
                    torch.full((1, size), 0.2, dtype=torch.float64))] * len(masks)
    compare(case.run(ours.eval()), case.run(CellLoopReference(reference, expectation)), 1e-10)


def test_zoneout_keeps_each_unit_at_the_rate_asked_afresh_each_forward_and_repeats_by_seed():
    """An output unit equal to its value one step before was zoned out (a new value equal to
    the old to the last bit does not happen with random weights)."""
    module = lstm_ext.LSTM(8, 64, num_layers=2, bidirectional=True, zoneout=(0.0, 0.3))
    x = torch.randn(6, 100, 8)

    def kept(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            output = module(x)[0]
        return output[1:] == output[:-1]

    first, second, repeat = kept(1), kept(2), kept(1)
    assert abs(first.double().mean().item() - 0.3) < 0.02
    assert not torch.equal(first, second)
    assert torch.equal(first, repeat)
    # Each step and direction draws afresh.
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[..., :64], first[..., 64:])
    with torch.no_grad():  # eval: the expectation, where nothing is kept exactly
        output = module.eval()(x)[0]
    assert not (output[1:] == output[:-1]).any()


def test_zoneout_of_one_freezes_the_state_and_of_zero_is_the_plain_lstm():
    torch.manual_seed(0)
    frozen = lstm_ext.LSTM(3, 5, zoneout=1.0)
    plain = lstm_ext.LSTM(3, 5)
    plain.load_state_dict(frozen.state_dict())
    x = torch.randn(4, 2, 3)
    h0, c0 = torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    for mode in (frozen.train(), frozen.eval()):
        output, (h_n, c_n) = mode(x, (h0, c0))
        assert torch.equal(output, h0.expand(4, 2, 5))
        assert torch.equal(h_n, h0) and torch.equal(c_n, c0)
    zero = lstm_ext.LSTM(3, 5, zoneout=(0.0, 0.0))
    zero.load_state_dict(plain.state_dict())
    assert torch.equal(zero(x)[0], plain(x)[0])


def test_zoneout_gradcheck_and_gradgradcheck():
    module = lstm_ext.LSTM(3, 4, proj_size=2, zoneout=(0.4, 0.3), dtype=torch.float64)
    weight = module.weight_hh_l0.detach().clone().requires_grad_()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)

    def run(x, weight, h0, c0):
        torch.manual_seed(3)  # the same masks for every evaluation
        output, (h, c) = torch.func.functional_call(module, {"weight_hh_l0": weight},
                                                    (x, (h0, c0)))
        return output, h, c

    assert torch.autograd.gradcheck(run, (x, weight, h0, c0))
    assert torch.autograd.gradgradcheck(run, (x, weight, h0, c0))


def test_zoneout_under_autocast_follows_the_fp64_reference():
    torch.manual_seed(0)
    reference = nn.LSTM(6, 32, num_layers=2, dtype=torch.float64)
    ours = lstm_ext.LSTM(6, 32, num_layers=2, zoneout=(0.2, 0.1))
    ours.load_state_dict(reference.state_dict())
    case = Case(reference, "padded", steps=8, batch=5)
    torch.manual_seed(4)
    actual = case.run(ours, dtype=torch.float32, autocast=True)
    assert actual["output"].dtype == torch.bfloat16
    masks = variant_masks(reference, 5, 40, seed=4, dtype=torch.float32, zoneout=(0.2, 0.1))
    doubled = [tuple(None if m is None else m.double() for m in masks) for masks in masks]
    errors = compare(actual, case.run(CellLoopReference(reference, doubled)), 5e-2)
    assert errors["output"] < 2e-2


def test_zoneout_compiles_and_keeps_its_state_dict():
    torch.manual_seed(0)
    module = lstm_ext.LSTM(4, 32, zoneout=(0.1, 0.05))
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(5, 3, 4)
    compiled(x)[0].sum().backward()
    assert module.weight_hh_l0.grad.ne(0).any()
    compiled.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(x)[0], module.eval()(x)[0], atol=1e-6)
    assert module.state_dict().keys() == nn.LSTM(4, 32).state_dict().keys()
    assert "zoneout=(0.1, 0.05)" in repr(module)
    assert copy.deepcopy(module).zoneout == (0.1, 0.05)
    assert lstm_ext.LSTM(4, 8, zoneout=0.2).zoneout == (0.2, 0.2)


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.5", True, (0.1,), (0.1, 0.2, 0.3)])
def test_bad_zoneout_is_refused_with_what_to_fix(value):
    with pytest.raises(ValueError, match="zoneout is the probability"):
        lstm_ext.LSTM(4, 8, zoneout=value)


def test_a_module_with_zoneout_is_not_silently_turned_into_something_else():
    """Zoneout changes the eval-mode function, which nn.LSTM lacks."""
    module = lstm_ext.LSTM(4, 8, zoneout=0.1)
    with pytest.raises(ValueError, match="torch.nn.LSTM has no zoneout"):
        module.to_torch()
    assert type(lstm_ext.LSTM(4, 8, recurrent_dropout=0.1).to_torch()) is nn.LSTM


@pytest.mark.parametrize("bad, message", [
    (dict(zoneout_cell=torch.ones(5, 6)), r"zoneout_cell of shape \[8, 6\]"),
    (dict(zoneout_hidden=torch.ones(8, 5)), r"zoneout_hidden of shape \[8, 6\]"),
    (dict(zoneout_cell=torch.ones(1, 6, dtype=torch.float64)), "must have the math dtype"),
])
def test_bad_zoneout_tensors_are_refused_by_the_op(bad, message):
    args = [torch.randn(4, 2, 3), torch.randn(2, 6), torch.randn(2, 6), torch.randn(24, 3),
            torch.randn(24, 6)]
    with pytest.raises(RuntimeError, match=message):
        ops.layer_forward(*args, **bad)


def run_with_cells(module, case):
    """Outputs (output, h_n, c_n, cells) and every gradient of a random weighting of them."""
    input, state, leaves = case.inputs()
    output, (h_n, c_n), cells = module(input, tuple(state))
    if isinstance(output, PackedSequence):
        assert isinstance(cells, PackedSequence)
        assert torch.equal(cells.batch_sizes, output.batch_sizes)
        output, cells = output.data, cells.data
    generator = torch.Generator().manual_seed(99)
    outputs = {"output": output, "h_n": h_n, "c_n": c_n, "cells": cells}
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum()
               for t in outputs.values())
    module.zero_grad(set_to_none=True)
    loss.backward()
    result = dict(outputs)
    result.update({f"grad_input{i}": leaf.grad for i, leaf in enumerate(leaves)})
    result["grad_h0"], result["grad_c0"] = state[0].grad, state[1].grad
    result.update({f"grad_{name}": p.grad for name, p in module.named_parameters()})
    return result


@pytest.mark.parametrize("path", ["recurrence", "step_loop"])
@pytest.mark.parametrize("kind", ["padded", "packed_unsorted", "unbatched"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_the_cell_sequence_is_every_steps_c_and_gradients_flow_through_it(config, kind, path,
                                                                          monkeypatch):
    """The last layer's c_t of every step, laid out as the output (batch_first, unbatched,
    packed, both directions), fp64, with every gradient through it; with zoneout as well."""
    monkeypatch.setenv("LSTM_EXT_CPU_RECURRENCE", "1" if path == "recurrence" else "0")
    torch.manual_seed(0)
    reference = nn.LSTM(**config, dtype=torch.float64)
    ours = lstm_ext.LSTM(**config, return_cell_sequence=True, dtype=torch.float64)
    ours.load_state_dict(reference.state_dict())
    case = Case(reference, kind, steps=6, batch=4)
    compare(run_with_cells(ours, case),
            run_with_cells(CellLoopReference(reference, return_cells=True), case), 1e-10)

    zoned = lstm_ext.LSTM(**config, return_cell_sequence=True, zoneout=(0.3, 0.2),
                          dtype=torch.float64)
    zoned.load_state_dict(reference.state_dict())
    masks = variant_masks(reference, 1 if kind == "unbatched" else 4, case_rows(case), seed=3,
                          zoneout=(0.3, 0.2))
    torch.manual_seed(3)
    compare(run_with_cells(zoned, case),
            run_with_cells(CellLoopReference(reference, masks, return_cells=True), case), 1e-10)


def test_the_cell_sequence_ends_in_c_n_and_the_plain_outputs_are_unchanged():
    torch.manual_seed(0)
    ours = lstm_ext.LSTM(5, 7, num_layers=2, return_cell_sequence=True)
    plain = lstm_ext.LSTM(5, 7, num_layers=2)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(6, 3, 5)
    output, (h_n, c_n), cells = ours(x)
    expected, (expected_h, expected_c) = plain(x)
    assert torch.equal(output, expected) and torch.equal(h_n, expected_h)
    assert torch.equal(c_n, expected_c)
    assert cells.shape == (6, 3, 7) and torch.equal(cells[-1], c_n[-1])
    # h_t = o_t * tanh(c_t): |h| <= tanh|c| at every step.
    assert (output.abs() <= cells.tanh().abs() + 1e-6).all()


def test_the_cell_sequence_gradgradcheck_and_compile():
    module = lstm_ext.LSTM(3, 4, return_cell_sequence=True, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: module(x)[2], (x,))
    compiled = torch.compile(lstm_ext.LSTM(4, 8, return_cell_sequence=True), fullgraph=True)
    cells = compiled(torch.randn(5, 2, 4))[2]
    assert cells.shape == (5, 2, 8)
    cells.sum().backward()


def test_a_module_returning_the_cell_sequence_is_not_silently_converted():
    module = lstm_ext.LSTM(4, 8, return_cell_sequence=True)
    with pytest.raises(ValueError, match="cannot return the cell sequence"):
        module.to_torch()
    with pytest.warns(UserWarning, match="returns the cell sequence"):
        assert type(lstm_ext.quantize_dynamic(module)) is lstm_ext.LSTM
    with pytest.raises(ValueError, match="return_cell_sequence is True or False"):
        lstm_ext.LSTM(4, 8, return_cell_sequence=1)
    assert "return_cell_sequence=True" in repr(module)


class LayerNormReference(nn.Module):
    """The LayerNorm LSTM (Ba et al.) as a plain cell loop: i, f, g, o = LN(W_ih x_t) + b_ih +
    b_hh + LN(W_hh (m * h_{t-1})), c_t = f c_{t-1} + i g, h_t = o tanh(LN(c_t)) (then W_hr),
    on nn.LSTM's parameters and copies of the norms' (named as lstm_ext's); padded input."""

    def __init__(self, lstm, norms, masks=None, return_cells=False, zones=None):
        super().__init__()
        self.lstm, self.masks, self.return_cells, self.zones = lstm, masks, return_cells, zones
        self.norms = {name: nn.Parameter(value.detach().clone()) for name, value in norms.items()}

    def named_parameters(self, *args, **kwargs):
        yield from self.lstm.named_parameters()
        yield from self.norms.items()

    def forward(self, input, hx):
        lstm = self.lstm
        x = input.transpose(0, 1) if lstm.batch_first else input
        params = dict(self.named_parameters())
        directions = 2 if lstm.bidirectional else 1
        hidden = lstm.hidden_size
        layer_input, h_n, c_n = x, [], []
        for layer in range(lstm.num_layers):
            outputs, cells = [], []
            for direction in range(directions):
                index = layer * directions + direction
                suffix = f"_l{layer}" + ("_reverse" if direction else "")

                def norm(value, part):
                    return F.layer_norm(value, value.shape[-1:],
                                        params[f"layer_norm_{part}_weight{suffix}"],
                                        params[f"layer_norm_{part}_bias{suffix}"])

                w_hr = params.get("weight_hr" + suffix)
                h, c = hx[0][index], hx[1][index]
                mask = self.masks[index] if self.masks else None
                steps = range(x.shape[0] - 1, -1, -1) if direction else range(x.shape[0])
                out, cell = [None] * x.shape[0], [None] * x.shape[0]
                for t in steps:
                    h_in = h if mask is None else mask * h
                    gates = (norm(layer_input[t] @ params["weight_ih" + suffix].t(), "ih")
                             + params["bias_ih" + suffix] + params["bias_hh" + suffix]
                             + norm(h_in @ params["weight_hh" + suffix].t(), "hh"))
                    i, f, g, o = gates.chunk(4, 1)
                    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h_new = torch.sigmoid(o) * torch.tanh(norm(c_new, "cell"))
                    if w_hr is not None:
                        h_new = h_new @ w_hr.t()
                    # Zoneout (d per row of data, time-major; one row in eval), h~ from c~.
                    d_c, d_h = self.zones[index] if self.zones else (None, None)
                    rows = slice(t * h.shape[0], (t + 1) * h.shape[0])
                    if d_c is not None:
                        d = d_c[rows] if len(d_c) > 1 else d_c
                        c_new = d * c + (1 - d) * c_new
                    if d_h is not None:
                        d = d_h[rows] if len(d_h) > 1 else d_h
                        h_new = d * h + (1 - d) * h_new
                    h, c = h_new, c_new
                    out[t], cell[t] = h, c
                outputs.append(torch.stack(out))
                cells.append(torch.stack(cell))
                h_n.append(h)
                c_n.append(c)
            layer_input = torch.cat(outputs, dim=-1)
        output = layer_input.transpose(0, 1) if lstm.batch_first else layer_input
        if not self.return_cells:
            return output, (torch.stack(h_n), torch.stack(c_n))
        cells = torch.cat(cells, dim=-1)
        cells = cells.transpose(0, 1) if lstm.batch_first else cells
        return output, (torch.stack(h_n), torch.stack(c_n)), cells


def layer_norm_pair(config, dtype=torch.float64, **options):
    """Ours with layer_norm=True (norm gains and biases drawn at random, so that they count)
    and the reference on the same values."""
    torch.manual_seed(0)
    reference = nn.LSTM(**config, dtype=dtype)
    ours = lstm_ext.LSTM(**config, layer_norm=True, dtype=dtype, **options)
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            if name.startswith("layer_norm_"):
                parameter.copy_(torch.randn_like(parameter) * 0.3 + (
                    1.0 if "_weight_" in name else 0.0))
    ours.load_state_dict({**ours.state_dict(), **reference.state_dict()})
    norms = {name: p for name, p in ours.named_parameters() if name.startswith("layer_norm_")}
    return ours, reference, norms


@pytest.mark.parametrize("path", ["cpu_kernels", "aten"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_layer_norm_lstm_is_the_cell_loop(config, path, monkeypatch):
    """fp64, outputs and every gradient (the norms' gains and biases included), in training
    and in eval mode (where no gradient is kept: the op's inference form); on the CPU's
    kernels (the fused recurrence; with a projection, the row kernels) and on the ATen ops
    other devices run."""
    monkeypatch.setenv("LSTM_EXT_CPU_RECURRENCE", "1" if path == "cpu_kernels" else "0")
    ours, reference, norms = layer_norm_pair(config)
    case = Case(reference, "padded", steps=6, batch=4)
    compare(case.run(ours), case.run(LayerNormReference(reference, norms)), 1e-10)
    input, state, _ = case.inputs()
    with torch.no_grad():
        expected = LayerNormReference(reference, norms)(input, tuple(state))
        actual = ours.eval()(input, tuple(state))
    for got, want in zip(torch.utils._pytree.tree_leaves(actual),
                         torch.utils._pytree.tree_leaves(expected)):
        assert rel_error(got, want) < 1e-12


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5])
def test_layer_norm_lstm_at_a_few_rows_a_step_is_the_cell_loop(batch, monkeypatch):
    """A small batch's fused backward writes the products' gradients in rows rather than
    transposed (cpu::grads_in_rows: up to 2 rows in fp64, 4 in fp32), and the weight
    gradients' products read them so: every gradient against the cell loop in fp64 with and
    without zoneout, on either side of both limits, and in fp32 (H 40: two blocks of units and
    a partial one at every width) against fp64; packed, the gradients of the parameters are
    those of each sequence alone, summed."""
    monkeypatch.setenv("LSTM_EXT_CPU_RECURRENCE", "1")
    config = dict(input_size=6, hidden_size=40, num_layers=1)
    z = (0.3, 0.2)
    for zoneout in (None, z):
        options = {"zoneout": zoneout} if zoneout else {}
        ours, reference, norms = layer_norm_pair(config, **options)
        case = Case(reference, "padded", steps=6, batch=batch)
        zones = None
        if zoneout:
            zones = [masks[1:] for masks in variant_masks(reference, batch, case_rows(case),
                                                          seed=3, zoneout=z)]
        torch.manual_seed(3)
        expected = case.run(LayerNormReference(reference, norms, zones=zones))
        torch.manual_seed(3)
        compare(case.run(ours), expected, 1e-10)
        torch.manual_seed(3)
        compare(case.run(copy.deepcopy(ours).float(), dtype=torch.float32), expected, 2e-5)

    ours, _, _ = layer_norm_pair(config)
    lengths = [6, 3, 5, 1, 4][:batch]
    sequences = [torch.randn(n, 6, dtype=torch.float64) for n in lengths]
    weights = [torch.randn(n, 40, dtype=torch.float64) for n in lengths]
    for module, tolerance in ((ours, 1e-10), (copy.deepcopy(ours).float(), 2e-5)):
        dtype = next(module.parameters()).dtype
        module.zero_grad()
        packed = torch.nn.utils.rnn.pack_sequence([x.to(dtype) for x in sequences],
                                                  enforce_sorted=False)
        output, _ = torch.nn.utils.rnn.pad_packed_sequence(module(packed)[0])
        sum((output[:n, i] * w.to(dtype)).sum()
            for i, (n, w) in enumerate(zip(lengths, weights))).backward()
        together = [p.grad.double().clone() for p in module.parameters()]
        module.zero_grad()
        for x, w in zip(sequences, weights):
            (module(x.to(dtype).unsqueeze(1))[0][:, 0] * w.to(dtype)).sum().backward()
        for got, want in zip(together, module.parameters()):
            assert rel_error(got, want.grad.double()) < tolerance


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2]], ids=str)
def test_layer_norm_lstm_without_an_input_gradient(config, monkeypatch):
    """An input that needs no gradient (data, or a frozen embedding's output): the fused
    backward then skips dx's operand, and every other gradient still matches the cell loop
    in fp64."""
    monkeypatch.setenv("LSTM_EXT_CPU_RECURRENCE", "1")
    ours, reference, norms = layer_norm_pair(config)
    case = Case(reference, "padded", steps=6, batch=4)
    compare(case.run(ours, input_grad=False),
            case.run(LayerNormReference(reference, norms), input_grad=False), 1e-10)


@pytest.mark.parametrize("layer", ["plain", "layer_norm"])
def test_saved_sequences_reuse_memory_only_once_freed(layer):
    """The CPU forward's saved sequences (which autograd holds until the backward) come from
    memory kept across calls: one still held is never handed out again, one freed is (the next
    training step's forward then writes no fresh pages), and each storage is its own size."""
    torch.manual_seed(0)
    steps, batch, inputs, hidden = 7, 3, 5, 37  # sizes only this test asks for
    gates = 4 * hidden
    weights = [torch.randn(gates, inputs), torch.randn(gates, hidden) * 0.2,
               torch.randn(gates), torch.randn(gates)]
    norms = [torch.rand(n) + 0.5 if i % 2 == 0 else torch.randn(n)
             for i, n in enumerate([gates, gates, gates, gates, hidden, hidden])]
    zeros = torch.zeros(batch, hidden)

    def forward(x):
        if layer == "plain":
            return torch.ops.lstm_ext.lstm_layer_forward(
                x, zeros, zeros, *weights, None, None, False, True, None, None, None, False)
        return torch.ops.lstm_ext.lstm_layer_norm_forward(
            x, zeros, zeros, *weights, None, None, False, True, *norms)

    # The plain layer's cell_prev and hidden_prev (its gates are oneDNN's input products); the
    # LayerNorm layer's gates, cell_prev, cell, products, stats and hidden_prev.
    kept = [4, 5] if layer == "plain" else [3, 4, 5, 6, 8, 9]
    # Calls of another length still held (as by other graphs alive) fill the pool: it lets go
    # of the oldest, and keeps the newest.
    crowd = [forward(torch.randn(steps + 1, batch, inputs)) for _ in range(8)]
    crowd_values = [[t[i].clone() for i in kept] for t in crowd]
    x1, x2 = torch.randn(steps, batch, inputs), torch.randn(steps, batch, inputs)
    first = forward(x1)
    expected = [t.clone() for t in first]
    second = forward(x2)
    for i in kept:
        assert first[i].data_ptr() != second[i].data_ptr()
        assert torch.equal(first[i], expected[i])  # not overwritten by the second call
    freed = [first[i].data_ptr() for i in kept]
    del first
    third = forward(x1)
    assert [third[i].data_ptr() for i in kept] == freed
    for i in kept:
        assert third[i].untyped_storage().nbytes() == third[i].nbytes
        assert torch.equal(third[i], expected[i])
    assert all(second[i].data_ptr() != third[i].data_ptr() for i in kept)
    for t, values in zip(crowd, crowd_values):  # let go of, never handed out while held
        assert all(torch.equal(t[i], v) for i, v in zip(kept, values))


@pytest.mark.parametrize("layer_norm", [False, True])
def test_gradients_accumulate_over_forwards_before_a_backward(layer_norm):
    """Two forwards, then both backwards (gradient accumulation): each backward still reads
    its own forward's saved sequences, whatever memory the second forward took."""
    torch.manual_seed(0)
    model = lstm_ext.LSTM(6, 11, num_layers=2, layer_norm=layer_norm, dtype=torch.float64)
    xs = [torch.randn(5, 3, 6, dtype=torch.float64) for _ in range(2)]
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for x in xs:
        grads = torch.autograd.grad(model(x)[0].square().sum(), list(model.parameters()))
        expected = [e + g for e, g in zip(expected, grads)]
    losses = [model(x)[0].square().sum() for x in xs]
    for loss in reversed(losses):
        loss.backward()
    for parameter, want in zip(model.parameters(), expected):
        assert rel_error(parameter.grad, want) < 1e-12


@pytest.mark.parametrize("path", ["cpu_kernels", "aten"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_layer_norm_lstm_returns_the_cell_sequence(config, path, monkeypatch):
    """layer_norm with return_cell_sequence: the last layer's c_t of every step (before its
    norm), fp64, with every gradient flowing through the cells as well, on the fused kernel
    (with a projection, the row kernels) and the ATen step loop; in eval mode the same cells;
    gradcheck and gradgradcheck through the cells."""
    monkeypatch.setenv("LSTM_EXT_CPU_RECURRENCE", "1" if path == "cpu_kernels" else "0")
    ours, reference, norms = layer_norm_pair(config, return_cell_sequence=True)
    expected_module = LayerNormReference(reference, norms, return_cells=True)
    case = Case(reference, "padded", steps=6, batch=4)
    compare(run_with_cells(ours, case), run_with_cells(expected_module, case), 1e-10)
    input, state, _ = case.inputs()
    with torch.no_grad():
        expected = expected_module(input, tuple(state))
        actual = ours.eval()(input, tuple(state))
    assert len(actual) == 3
    for got, want in zip(torch.utils._pytree.tree_leaves(actual),
                         torch.utils._pytree.tree_leaves(expected)):
        assert rel_error(got, want) < 1e-12
    if not config.get("batch_first"):
        # Packed input: each sequence's cells as when it runs alone.
        lengths = [6, 3, 5, 1]
        sequences = [torch.randn(n, config["input_size"], dtype=torch.float64) for n in lengths]
        packed = torch.nn.utils.rnn.pack_sequence(sequences, enforce_sorted=False)
        with torch.no_grad():
            cells, _ = torch.nn.utils.rnn.pad_packed_sequence(ours(packed)[2])
            for index, sequence in enumerate(sequences):
                alone = ours(sequence.unsqueeze(1))[2]
                assert rel_error(cells[:lengths[index], index], alone[:, 0]) < 1e-12
    small = lstm_ext.LSTM(3, 4, layer_norm=True, return_cell_sequence=True,
                          proj_size=2 if config.get("proj_size") else 0, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: small(x)[2], (x,))
    assert torch.autograd.gradgradcheck(lambda x: small(x)[2], (x,))


@pytest.mark.parametrize("path", ["cpu_kernels", "aten"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_layer_norm_lstm_with_zoneout_is_the_cell_loop(config, path, monkeypatch):
    """layer_norm with zoneout: the masks the module draws in the LayerNorm cell loop
    (c_t = d c_{t-1} + (1 - d) c~_t, h likewise, h~ from LN(c~)), fp64, outputs and every
    gradient, on the CPU row kernels' step loop and the ATen one; eval mode is the
    expectation; gradcheck and gradgradcheck."""
    monkeypatch.setenv("LSTM_EXT_CPU_RECURRENCE", "1" if path == "cpu_kernels" else "0")
    z = (0.3, 0.2)
    ours, reference, norms = layer_norm_pair(config, zoneout=z)
    case = Case(reference, "padded", steps=6, batch=4)
    zones = [masks[1:] for masks in variant_masks(reference, 4, case_rows(case), seed=3,
                                                  zoneout=z)]
    torch.manual_seed(3)
    compare(case.run(ours), case.run(LayerNormReference(reference, norms, zones=zones)), 1e-10)
    input, state, _ = case.inputs()
    size = config.get("proj_size") or config["hidden_size"]
    expectation = [(torch.full((1, config["hidden_size"]), z[0], dtype=torch.float64),
                    torch.full((1, size), z[1], dtype=torch.float64))] * len(zones)
    with torch.no_grad():
        expected = LayerNormReference(reference, norms, zones=expectation)(input, tuple(state))
        actual = ours.eval()(input, tuple(state))
    for got, want in zip(torch.utils._pytree.tree_leaves(actual),
                         torch.utils._pytree.tree_leaves(expected)):
        assert rel_error(got, want) < 1e-12
    small = lstm_ext.LSTM(3, 4, layer_norm=True, zoneout=(0.4, 0.3), dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)

    def seeded(x):
        torch.manual_seed(8)
        return small(x)[0]

    assert torch.autograd.gradcheck(seeded, (x,))
    assert torch.autograd.gradgradcheck(seeded, (x,))


@pytest.mark.parametrize("path", ["cpu_kernels", "aten"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_layer_norm_lstm_with_zoneout_returns_the_cell_sequence(config, path, monkeypatch):
    """layer_norm with zoneout and return_cell_sequence: the cells are c_t after zoneout (the
    state the next step starts from), against the cell loop in fp64 with the module's masks,
    with every gradient flowing through them as well; the fused kernel, the row kernels (with
    a projection) and the ATen step loop; gradcheck through the cells."""
    monkeypatch.setenv("LSTM_EXT_CPU_RECURRENCE", "1" if path == "cpu_kernels" else "0")
    z = (0.3, 0.2)
    ours, reference, norms = layer_norm_pair(config, zoneout=z, return_cell_sequence=True)
    case = Case(reference, "padded", steps=6, batch=4)
    zones = [masks[1:] for masks in variant_masks(reference, 4, case_rows(case), seed=3,
                                                  zoneout=z)]
    torch.manual_seed(3)
    expected = LayerNormReference(reference, norms, zones=zones, return_cells=True)
    compare(run_with_cells(ours, case), run_with_cells(expected, case), 1e-10)
    small = lstm_ext.LSTM(3, 4, layer_norm=True, zoneout=(0.4, 0.3), return_cell_sequence=True,
                          proj_size=2 if config.get("proj_size") else 0, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)

    def seeded(x):
        torch.manual_seed(8)
        return small(x)[2]

    assert torch.autograd.gradcheck(seeded, (x,))


@pytest.mark.parametrize("path", ["cpu_kernels", "aten"])
def test_layer_norm_lstm_with_recurrent_dropout_and_packed_input(path, monkeypatch):
    """The recurrent mask enters the normalised product; packed input gives the padded
    result of each sequence at its own length."""
    monkeypatch.setenv("LSTM_EXT_CPU_RECURRENCE", "1" if path == "cpu_kernels" else "0")
    config = dict(input_size=5, hidden_size=7, num_layers=2, bidirectional=True)
    ours, reference, norms = layer_norm_pair(config, recurrent_dropout=0.3)
    case = Case(reference, "padded", steps=6, batch=4)
    masks = recurrent_masks(reference, 4, 0.3, seed=5)
    torch.manual_seed(5)
    compare(case.run(ours), case.run(LayerNormReference(reference, norms, masks)), 1e-10)

    ours.eval()
    lengths = [6, 3, 5, 1]
    sequences = [torch.randn(n, 5, dtype=torch.float64) for n in lengths]
    packed = torch.nn.utils.rnn.pack_sequence(sequences, enforce_sorted=False)
    output, (h_n, _) = ours(packed)
    padded, _ = torch.nn.utils.rnn.pad_packed_sequence(output)
    for index, sequence in enumerate(sequences):
        alone, (h_alone, _) = ours(sequence.unsqueeze(1))
        assert rel_error(padded[:lengths[index], index], alone[:, 0]) < 1e-12
        assert rel_error(h_n[:, index], h_alone[:, 0]) < 1e-12


def test_layer_norm_lstm_parameters_state_dict_and_refusals():
    ours = lstm_ext.LSTM(4, 8, num_layers=2, bidirectional=True, layer_norm=True)
    names = [name for name, _ in ours.named_parameters()]
    plain = nn.LSTM(4, 8, num_layers=2, bidirectional=True)
    assert names[:len(plain.state_dict())] == list(plain.state_dict())
    assert "layer_norm_cell_bias_l1_reverse" in names and len(names) == 16 + 24
    assert ours.layer_norm_ih_weight_l0.shape == (32,) and ours.layer_norm_cell_weight_l0.eq(1).all()
    ours.reset_parameters()
    assert ours.layer_norm_hh_bias_l1.eq(0).all() and ours.layer_norm_hh_weight_l1.eq(1).all()
    # An nn.LSTM state_dict lacks the norms: a strict load says which.
    with pytest.raises(RuntimeError, match="layer_norm_ih_weight_l0"):
        ours.load_state_dict(plain.state_dict())
    assert "layer_norm=True" in repr(ours)
    with pytest.raises(ValueError, match="no layer normalisation"):
        ours.to_torch()
    with pytest.warns(UserWarning, match="layer_norm=True"):
        assert type(lstm_ext.quantize_dynamic(ours)) is lstm_ext.LSTM


def test_layer_norm_lstm_gradcheck_gradgradcheck_compile_and_autocast():
    module = lstm_ext.LSTM(3, 4, proj_size=2, layer_norm=True, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    gain = module.layer_norm_cell_weight_l0.detach().clone().requires_grad_()

    def run(x, gain):
        return torch.func.functional_call(module, {"layer_norm_cell_weight_l0": gain}, (x,))[0]

    assert torch.autograd.gradcheck(run, (x, gain))
    assert torch.autograd.gradgradcheck(run, (x, gain))
    compiled = torch.compile(lstm_ext.LSTM(4, 8, layer_norm=True), fullgraph=True)
    output = compiled(torch.randn(5, 2, 4))[0]
    output.sum().backward()
    config = dict(input_size=6, hidden_size=16, num_layers=2)
    ours, reference, norms = layer_norm_pair(config, dtype=torch.float32)
    case = Case(reference, "padded", steps=5, batch=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = ours(case.inputs(torch.float32)[0])[0]
    expected = LayerNormReference(reference.double(), {k: v.double() for k, v in norms.items()})(
        case.inputs()[0], [torch.zeros(2, 3, 16, dtype=torch.float64)] * 2)[0]
    assert rel_error(output, expected) < 2e-2


def test_the_drivers_layer_norm():
    model = build_model(TrainConfig(hidden=8, emb=4, layer_norm=True), 10)
    assert model.lstm.layer_norm
    with pytest.raises(ValueError, match="--layer-norm"):
        build_model(TrainConfig(impl="torch", hidden=8, emb=4, layer_norm=True), 10)


@pytest.mark.parametrize("proj_size", [0, 24])
@pytest.mark.parametrize("path", ["cpu_kernels", "aten"])
def test_layer_norm_lstm_in_fp32_follows_the_fp64_reference(path, proj_size, monkeypatch):
    """The CPU kernels' fast fp32 sigmoid/tanh, with many rows (many tiles per thread in the
    fused recurrence; with a projection, more rows than one task of the row kernels)."""
    monkeypatch.setenv("LSTM_EXT_CPU_RECURRENCE", "1" if path == "cpu_kernels" else "0")
    config = dict(input_size=16, hidden_size=48, num_layers=1, bidirectional=True,
                  proj_size=proj_size)
    ours, reference, norms = layer_norm_pair(config)
    case = Case(reference, "padded", steps=7, batch=700)
    expected = case.run(LayerNormReference(reference, norms))
    compare(case.run(ours.float(), dtype=torch.float32), expected, 2e-5)


def test_layer_norm_double_backward_uses_a_reference_equal_to_the_op():
    """Double backward differentiates ops.reference_layer_norm_forward; gradgradcheck alone
    cannot see that reference disagree with the op, so compare first-order gradients made
    through it (create_graph=True) with the op's own (fp64, packed, projection, mask)."""
    ours, _, _ = layer_norm_pair(dict(input_size=5, hidden_size=6, num_layers=1, proj_size=3),
                                 recurrent_dropout=0.4)
    sequences = [torch.randn(n, 5, dtype=torch.float64) for n in (5, 4, 2)]
    packed = torch.nn.utils.rnn.pack_sequence(sequences)
    state = [torch.randn(1, 3, 3, dtype=torch.float64), torch.randn(1, 3, 6, dtype=torch.float64)]
    leaves = [packed.data.requires_grad_(), *(t.requires_grad_() for t in state)]
    parameters = list(ours.parameters())

    def grads(create_graph):
        torch.manual_seed(11)  # the same mask both times
        output, (h_n, c_n) = ours(torch.nn.utils.rnn.PackedSequence(
            leaves[0], packed.batch_sizes), (leaves[1], leaves[2]))
        loss = (output.data.sin().sum() + h_n.square().sum() + c_n.sum())
        return torch.autograd.grad(loss, leaves + parameters, create_graph=create_graph)

    for through_reference, from_op in zip(grads(True), grads(False)):
        assert rel_error(through_reference, from_op) < 1e-10


@pytest.mark.parametrize("zoneout", [None, "per row", "one row"])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("split", ["units", "rows"])
def test_layer_norm_fused_recurrence_split_over_threads(split, packed, dtype, threads, zoneout):
    """The CPU's fused LayerNorm recurrence on several threads, split both ways (see
    row_split in layer_norm_kernels.cpp): by units at H 150 and 2-3 rows a thread, where each
    thread multiplies its units' panels for every row and then takes whole rows for the norms
    and the cell; by rows at H 70 (a W_hh small enough for 2 rows a thread), where each thread
    has whole rows throughout. Under both, threads meet steps where they have no rows, and
    each row's math is one thread's: the same bits as on one thread. Both hidden sizes leave
    partial last blocks at every instruction set's width. Outputs and every gradient of the op
    against ops.reference_layer_norm_forward in fp64 (forward and reversed, with a recurrent
    mask, packed sequences whose rows end at different steps), and with zoneout of c and h:
    weights in [0, 1] per row of data (training draws 0 or 1; any weight is the same formula)
    or one row for every step (eval's expectations)."""
    torch.manual_seed(3)
    steps, batch, features = 7, 5, 6
    hidden = 150 if split == "units" else 70
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for reverse in (False, True):
            if packed:
                batch_sizes = torch.tensor([5, 5, 4, 3, 3, 2, 1])
                x = torch.randn(int(batch_sizes.sum()), features, dtype=torch.float64)
            else:
                batch_sizes, x = None, torch.randn(steps, batch, features, dtype=torch.float64)
            tensors = [x, torch.randn(batch, hidden, dtype=torch.float64),
                       torch.randn(batch, hidden, dtype=torch.float64),
                       torch.randn(4 * hidden, features, dtype=torch.float64) * 0.3,
                       torch.randn(4 * hidden, hidden, dtype=torch.float64) * 0.2,
                       torch.randn(4 * hidden, dtype=torch.float64),
                       torch.randn(4 * hidden, dtype=torch.float64)]
            # Gains about 1, biases about 0: ih, hh (4H each), then the cell's (H).
            norms = [torch.randn(n, dtype=torch.float64) * 0.3 + (1.0 - k % 2)
                     for k, n in enumerate((4 * hidden,) * 4 + (hidden,) * 2)]
            mask = (torch.rand(batch, hidden, dtype=torch.float64) >= 0.3).double() / 0.7
            weights = torch.randn(steps * batch, hidden, dtype=torch.float64)
            zones = [None, None]
            if zoneout is not None:
                rows = x.shape[0] if packed else steps * batch
                zones = [torch.rand(rows if zoneout == "per row" else 1, hidden,
                                    dtype=torch.float64) for _ in range(2)]
            results = []
            for function in ("op", "reference", "op on one thread"):
                run_dtype = dtype if function != "reference" else torch.float64
                torch.set_num_threads(1 if function == "op on one thread" else threads)
                leaves = [t.to(run_dtype).requires_grad_() for t in tensors + norms]
                arguments = (*leaves[:7], None, batch_sizes, reverse)
                zone = [z if z is None else z.to(run_dtype) for z in zones]
                # With zoneout the cell sequence too (c after it), its gradient through the op.
                cells = zoneout is not None
                if function != "reference":
                    returned = ops.layer_norm_forward(
                        *arguments, True, leaves[7:], mask.to(run_dtype), return_cells=cells,
                        zoneout_cell=zone[0], zoneout_hidden=zone[1])
                else:
                    returned = ops.reference_layer_norm_forward(
                        *arguments, leaves[7:], mask, return_cells=cells, zoneout_cell=zone[0],
                        zoneout_hidden=zone[1])
                output, h_n, c_n = returned[:3]
                flat = output.reshape(-1, hidden)
                loss = ((flat * weights[:flat.shape[0]].to(run_dtype)).sum() + h_n.sin().sum()
                        + (c_n * c_n).sum())
                sequence = returned[3].reshape(-1, hidden) if cells else output
                if cells:
                    loss = loss + (sequence * weights[:sequence.shape[0]].to(run_dtype)).cos().sum()
                results.append([output, h_n, c_n, sequence, *torch.autograd.grad(loss, leaves)])
            tolerance = 1e-10 if dtype == torch.float64 else 1e-5
            for index, (got, want) in enumerate(zip(*results[:2])):
                error = rel_error(got, want)
                assert error < tolerance, (reverse, index, error)
            # (Gradients summed over rows, the biases' and the norms', add per-thread sums.)
            same_bits = [torch.equal(a, b) for a, b in zip(results[0][:9], results[2][:9])]
            assert all(same_bits), (reverse, same_bits)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("packed", [False, True])
def test_the_double_backward_reference_of_the_layer_op_equals_it_with_every_variant(packed):
    """ops.reference_layer_forward, which double backward differentiates, against the layer
    op with a recurrent mask, zoneout and the cell sequence: outputs and first-order
    gradients, fp64."""
    torch.manual_seed(2)
    steps, batch, features, hidden, proj = 5, 3, 4, 6, 3
    options = {"dtype": torch.float64}
    if packed:
        batch_sizes = torch.tensor([3, 3, 2, 2, 1])
        x = torch.randn(int(batch_sizes.sum()), features, **options)
    else:
        batch_sizes, x = None, torch.randn(steps, batch, features, **options)
    rows = x.shape[0] if packed else steps * batch
    tensors = [x, torch.randn(batch, proj, **options), torch.randn(batch, hidden, **options),
               torch.randn(4 * hidden, features, **options),
               torch.randn(4 * hidden, proj, **options), torch.randn(4 * hidden, **options),
               torch.randn(4 * hidden, **options), torch.randn(proj, hidden, **options)]
    variants = [(torch.rand(batch, proj, **options) >= 0.3).double() / 0.7,
                (torch.rand(rows, hidden, **options) < 0.3).double(),
                (torch.rand(rows, proj, **options) < 0.2).double()]
    results = []
    for function, extra in ((ops.layer_forward, {"training": True}), (
            ops.reference_layer_forward, {})):
        leaves = [t.clone().requires_grad_() for t in tensors]
        outputs = function(*leaves, batch_sizes=batch_sizes, recurrent_mask=variants[0],
                           zoneout_cell=variants[1], zoneout_hidden=variants[2],
                           return_cells=True, **extra)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), **options).view(o.shape)).sum()
                   for o in outputs)
        results.append([*outputs, *torch.autograd.grad(loss, leaves)])
    for got, want in zip(*results):
        assert rel_error(got, want) < 1e-10


# ---------------------------------------------------------------------------------------------
# LSTMCell: zoneout and the LayerNorm cell (one step through the layer ops)


def cell_step_reference(cell, x, hx, zoneout_masks=None):
    """The cell's variant step in torch ops: LayerNorm (with the cell's norm parameters) or
    zoneout with the given (d_c, d_h)."""
    h, c = hx

    def norm(value, part):
        return F.layer_norm(value, value.shape[-1:], getattr(cell, f"layer_norm_{part}_weight"),
                            getattr(cell, f"layer_norm_{part}_bias"))

    products = x @ cell.weight_ih.t(), h @ cell.weight_hh.t()
    if cell.layer_norm:
        products = norm(products[0], "ih"), norm(products[1], "hh")
    i, f, g, o = (products[0] + cell.bias_ih + products[1] + cell.bias_hh).chunk(4, -1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(norm(c_new, "cell") if cell.layer_norm else c_new)
    if zoneout_masks is not None:
        d_c, d_h = zoneout_masks
        c_new = d_c * c + (1 - d_c) * c_new
        h_new = d_h * h + (1 - d_h) * h_new
    return h_new, c_new


def variant_cell(hidden=7, **options):
    """An fp64 LSTMCell(5, hidden) with the options, its norm gains and biases drawn at
    random."""
    torch.manual_seed(0)
    cell = lstm_ext.LSTMCell(5, hidden, dtype=torch.float64, **options)
    with torch.no_grad():
        for name, parameter in cell.named_parameters():
            if name.startswith("layer_norm_"):
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return cell


def cell_grads(cell, step, batched):
    """Outputs and the gradients of x, hx and every parameter of one step(cell, x, hx)."""
    torch.manual_seed(7)
    shape = (3,) if batched else ()
    leaves = [torch.randn(*shape, n, dtype=torch.float64, requires_grad=True)
              for n in (5, cell.hidden_size, cell.hidden_size)]
    h, c = step(leaves[0], (leaves[1], leaves[2]))
    weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(k),
                           dtype=torch.float64) for k, t in enumerate((h, c))]
    loss = (h * weights[0]).sum() + (c * weights[1]).sum()
    return [h, c, *torch.autograd.grad(loss, leaves + list(cell.parameters()))]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_layer_norm_cell_is_the_formula(training, batched):
    """fp64: h', c' and every gradient (norm gains and biases included), batched and not, in
    training and in eval mode."""
    cell = variant_cell(layer_norm=True).train(training)
    got = cell_grads(cell, cell, batched)
    want = cell_grads(cell, lambda x, hx: cell_step_reference(cell, x, hx), batched)
    for index, (a, b) in enumerate(zip(got, want)):
        assert rel_error(a, b) < 1e-10, index


@pytest.mark.parametrize("hidden", [7, 32])
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("batched", [True, False])
def test_zoneout_cell_is_the_formula_with_fresh_masks_per_call(batched, layer_norm, hidden):
    """Training: the masks the cell draws (d^c then d^h, (B, H), from torch's generator) in
    the formula, fp64, outputs and every gradient; a second call draws other masks; eval mode
    is the expectation. Alone and with layer_norm; alone at H 32 the backward kernel reads
    W_hh's rows in place (whole vectors long in every instruction set), at H 7 the step loop
    runs."""
    z = (0.3, 0.2)
    cell = variant_cell(hidden, zoneout=z, layer_norm=layer_norm)
    rows = 3 if batched else 1

    def seeded_cell(x, hx):
        torch.manual_seed(11)
        return cell(x, hx)

    def reference(x, hx):
        torch.manual_seed(11)
        masks = [ops.bernoulli_mask((rows, hidden), p, 1.0, torch.float64, "cpu") for p in z]
        if not batched:
            masks = [m[0] for m in masks]
        return cell_step_reference(cell, x, hx, masks)

    for index, (a, b) in enumerate(zip(cell_grads(cell, seeded_cell, batched),
                                       cell_grads(cell, reference, batched))):
        assert rel_error(a, b) < 1e-10, index
    x, h, c = (torch.randn(rows, n, dtype=torch.float64) for n in (5, hidden, hidden))
    first, second = cell(x, (h, c)), cell(x, (h, c))
    assert not torch.equal(first[1], second[1])

    cell.eval()
    masks = [torch.tensor(p, dtype=torch.float64) for p in z]
    expected = cell_step_reference(cell, x, (h, c), masks)
    for got, want in zip(cell(x, (h, c)), expected):
        assert rel_error(got, want) < 1e-12


def test_variant_cells_gradcheck_gradgradcheck_and_compile():
    """gradcheck and gradgradcheck of both variants (zoneout with its masks reseeded for each
    evaluation); torch.compile(fullgraph=True) gives eager's values (zoneout in eval mode:
    compiled code draws its random numbers its own way)."""
    for options in ({"layer_norm": True}, {"zoneout": (0.4, 0.3)},
                    {"layer_norm": True, "zoneout": (0.4, 0.3)}):
        cell = variant_cell(**options)

        def step(x, h, c):
            torch.manual_seed(5)
            return cell(x, (h, c))

        inputs = [torch.randn(2, n, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7)]
        assert torch.autograd.gradcheck(step, inputs)
        assert torch.autograd.gradgradcheck(step, inputs)
        cell.train("zoneout" not in options)  # (compiled zoneout draws its own masks)
        compiled = torch.compile(cell, fullgraph=True)
        for got, want in zip(compiled(inputs[0], tuple(inputs[1:])),
                             cell(inputs[0], tuple(inputs[1:]))):
            assert rel_error(got, want) < 1e-12


def test_variant_cells_parameters_state_dict_repr_and_refusals():
    cell = lstm_ext.LSTMCell(4, 6, layer_norm=True)
    names = [name for name, _ in cell.named_parameters()]
    assert names == ["weight_ih", "weight_hh", "bias_ih", "bias_hh", "layer_norm_ih_weight",
                     "layer_norm_ih_bias", "layer_norm_hh_weight", "layer_norm_hh_bias",
                     "layer_norm_cell_weight", "layer_norm_cell_bias"]
    assert cell.layer_norm_hh_weight.shape == (24,) and cell.layer_norm_cell_bias.shape == (6,)
    cell.reset_parameters()
    assert torch.equal(cell.layer_norm_ih_weight, torch.ones(24))
    assert torch.equal(cell.layer_norm_cell_bias, torch.zeros(6))
    # An nn.LSTMCell's state_dict loads into the plain part of a variant cell, exactly.
    reference = nn.LSTMCell(4, 6)
    missing, unexpected = cell.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("layer_norm_") for name in missing)
    assert torch.equal(cell.weight_hh, reference.weight_hh)
    assert "layer_norm=True" in repr(cell)
    assert "zoneout=(0.1, 0.2)" in repr(lstm_ext.LSTMCell(4, 6, zoneout=(0.1, 0.2)))
    for options in ({"layer_norm": True}, {"zoneout": 0.1}):
        with pytest.raises(ValueError, match="to_torch"):
            lstm_ext.LSTMCell(4, 6, **options).to_torch()
    with pytest.raises(ValueError, match="zoneout"):
        lstm_ext.LSTMCell(4, 6, zoneout=1.5)
    with pytest.raises(ValueError, match="layer_norm"):
        lstm_ext.LSTMCell(4, 6, layer_norm=1)
    with pytest.raises(ValueError, match="layer_norm"):
        lstm_ext.QuantizedLSTMCell.from_float(lstm_ext.LSTMCell(4, 6, layer_norm=True))
    with pytest.warns(UserWarning, match="zoneout"):
        kept = lstm_ext.quantize_dynamic(lstm_ext.LSTMCell(4, 6, zoneout=0.1))
    assert type(kept) is lstm_ext.LSTMCell


def test_zoneout_cell_under_cpu_autocast_runs_in_its_inputs_dtype():
    """As nn.LSTMCell (lstm_cell is not on CPU autocast's list): fp32 in, fp32 out, the same
    values as without autocast."""
    cell = lstm_ext.LSTMCell(5, 7, zoneout=0.2).eval()
    x, h, c = (torch.randn(3, n) for n in (5, 7, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cell(x, (h, c))
    for a, b in zip(got, cell(x, (h, c))):
        assert a.dtype == torch.float32 and torch.equal(a, b)
