"""Shared helpers: running a module with every gradient collected, and relative errors."""

import contextlib
import copy
import importlib.util
import os
import random
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import lstm_ext  # noqa: F401  (loads the ops)

# Inductor's on-disk cache (shared by every run on a machine) keys a compiled graph on the
# graph, not on the custom ops' library, so code compiled against an older build of the ops
# could be replayed; the tests (and the processes they start) compile into their own cache.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="lstm_ext_inductor_"))

# Property tests: "ci" (the default) draws a fixed sequence of examples, so every CI run checks
# the same cases in bounded time; HYPOTHESIS_PROFILE=long searches 50 times as many, at random.
settings.register_profile("ci", max_examples=40, derandomize=True, deadline=None,
                          print_blob=True)
settings.register_profile("long", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# A kernel fault that breaks the CUDA context fails its own test only (see cuda_faults.py).
pytest_plugins = ["cuda_faults"]

@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each test compiles from empty caches: Dynamo's recompile limit (8) counts the cache
    entries of one code object, LSTM.forward's across every test that compiles an LSTM, and
    with fullgraph=True reaching it is an error, so a test would fail for others' compiles."""
    torch._dynamo.reset()
    yield


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


# Memory layouts a caller can hand a tensor in (see relayout).
LAYOUTS = ["contiguous", "transposed", "stepped", "padded", "offset", "expanded"]


def relayout(tensor, layout):
    """The same values (for "expanded": the first row repeated, see `values_for`) in another
    memory layout."""
    if layout == "contiguous" or tensor.dim() == 0:
        return tensor
    if layout == "transposed" and tensor.dim() >= 2:
        return tensor.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "stepped":
        wide = torch.full((*tensor.shape[:-1], 2 * tensor.shape[-1]), float("nan"),
                          dtype=tensor.dtype)
        wide[..., ::2] = tensor
        return wide[..., ::2]
    if layout == "padded":  # rows of the last dimension inside wider rows
        wide = torch.full((*tensor.shape[:-1], tensor.shape[-1] + 3), float("nan"),
                          dtype=tensor.dtype)
        wide[..., : tensor.shape[-1]] = tensor
        return wide[..., : tensor.shape[-1]]
    if layout == "offset":
        storage = torch.full((tensor.numel() + 3,), float("nan"), dtype=tensor.dtype)
        storage[3:] = tensor.reshape(-1)
        return storage[3:].view(tensor.shape)
    if layout == "expanded" and tensor.shape[0] > 0:
        return tensor[:1].expand(tensor.shape)
    return tensor


def values_for(tensor, layout):
    """The values the contiguous reference call gets for an argument passed in `layout`."""
    if layout == "expanded" and tensor.dim() > 0 and tensor.shape[0] > 0:
        return tensor[:1].expand(tensor.shape).contiguous()
    return tensor



@pytest.fixture
def corpus_file(tmp_path):
    """A tiny word corpus for the language-model driver (400 lines of 3 to 9 words)."""
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(400)]
    path = tmp_path / "tiny.txt"
    path.write_text("\n".join(lines))
    return path


def load_benchmark_script(name):
    """benchmarks/<name>.py as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def poisoned_allocations(device):
    """Inside, every fresh tensor (torch.empty in Python, at::empty in the extension) on any
    device comes filled with NaN (PyTorch's deterministic mode with
    fill_uninitialized_memory), so an output element a kernel forgets to write stays NaN
    instead of showing whatever the allocator's cached memory held (often the right answer of
    the previous run)."""
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory)
    # warn_only: deterministic mode would otherwise refuse cuBLAS without a workspace setting.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        probe = torch.empty(1000, device=device)
        assert probe.isnan().all(), "fresh allocations are not poisoned; the check would be void"
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = previous[2]


def layers_spy(monkeypatch):
    """The calls of ops.layers_forward (lstm_layers), which LSTM and QuantizedLSTM make, in a
    list that the test may clear."""
    calls = []
    original = lstm_ext.ops.layers_forward

    def record(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(lstm_ext.ops, "layers_forward", record)
    return calls


def rel_error(actual, expected):
    """‖actual − expected‖ / ‖expected‖ in fp64 (0 when both are exactly zero)."""
    actual, expected = actual.double(), expected.double()
    denominator = expected.norm()
    difference = (actual - expected).norm()
    if denominator == 0:
        return difference.item()
    return (difference / denominator).item()


class Case:
    """Fresh random inputs for one LSTM configuration, built so that the same leaves can be fed
    to several modules: `kind` is 'padded', 'unbatched', 'packed_sorted' or 'packed_unsorted'."""

    def __init__(self, module, kind, steps=5, batch=3, with_state=True, dtype=torch.float64,
                 lengths=None):
        self.kind = kind
        num_directions = 2 if module.bidirectional else 1
        state_size = module.proj_size or module.hidden_size
        layers = module.num_layers * num_directions
        options = {"dtype": dtype}
        if kind.startswith("packed"):
            if lengths is None:
                lengths = torch.randint(1, steps + 1, (batch,)).tolist()
                lengths[0] = steps
                lengths[-1] = 1  # a length-1 sequence in every packed case
            if kind == "packed_sorted":
                lengths = sorted(lengths, reverse=True)
            self.leaves = [torch.randn(n, module.input_size, **options) for n in lengths]
            batch = len(lengths)
        elif kind == "unbatched":
            self.leaves = [torch.randn(steps, module.input_size, **options)]
        else:
            shape = (batch, steps) if module.batch_first else (steps, batch)
            self.leaves = [torch.randn(*shape, module.input_size, **options)]
        self.state = None
        if with_state:
            state_batch = () if kind == "unbatched" else (batch,)
            self.state = [
                torch.randn(layers, *state_batch, state_size, **options),
                torch.randn(layers, *state_batch, module.hidden_size, **options),
            ]

    def to(self, device):
        """The same case with its tensors on another device."""
        moved = copy.copy(self)
        moved.leaves = [t.to(device) for t in self.leaves]
        moved.state = None if self.state is None else [t.to(device) for t in self.state]
        return moved

    def inputs(self, dtype=None, input_grad=True):
        """(input, hx) made from leaves of this case, converted to dtype; the state requires
        grad, the input where input_grad says."""
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_(input_grad)
                  for t in self.leaves]
        state = None
        if self.state is not None:
            state = [t.detach().to(dtype or t.dtype).requires_grad_() for t in self.state]
        if self.kind == "packed_sorted":
            input = pack_sequence(leaves, enforce_sorted=True)
        elif self.kind == "packed_unsorted":
            input = pack_sequence(leaves, enforce_sorted=False)
        else:
            input = leaves[0]
        return input, state, leaves

    def run(self, module, dtype=None, autocast=False, input_grad=True):
        """Forward and backward of a random weighting of every output; returns a dict of the
        outputs and of every gradient (inputs where input_grad, states, each parameter by
        name)."""
        input, state, leaves = self.inputs(dtype, input_grad)
        with torch.autocast("cpu", enabled=autocast):
            output, (h_n, c_n) = module(input, None if state is None else tuple(state))
        if isinstance(output, PackedSequence):
            output = output.data
        generator = torch.Generator().manual_seed(1234)
        # d loss / d t is exactly the weight, in any dtype.
        loss = sum(
            (t * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t)).sum()
            for t in (output, h_n, c_n)
        )
        module.zero_grad(set_to_none=True)
        loss.backward()
        result = {"output": output, "h_n": h_n, "c_n": c_n}
        for index, leaf in enumerate(leaves if input_grad else []):
            result[f"grad_input{index}"] = leaf.grad
        if state is not None:
            result["grad_h0"], result["grad_c0"] = state[0].grad, state[1].grad
        for name, parameter in module.named_parameters():
            result[f"grad_{name}"] = parameter.grad
        return result


def separate_products(profile):
    """The whole-sequence products a profile recorded outside the recurrence."""
    return sum(event.count for event in profile.key_averages()
               if event.key in ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise",
                                "lstm_ext::panel_product", "lstm_ext::small_linear"))


def compare(actual, expected, tolerance):
    """Relative error of every entry; fails listing the entries above tolerance."""
    assert actual.keys() == expected.keys()
    errors = {key: rel_error(actual[key], expected[key]) for key in expected}
    worst = {key: error for key, error in errors.items() if not error <= tolerance}
    assert not worst, f"relative errors above {tolerance}: {worst}"
    return errors
