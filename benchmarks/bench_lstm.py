"""lstm_ext.LSTM against torch.nn.LSTM (oneDNN on the CPU, cuDNN on CUDA), side by side.

Each row runs both implementations on the same weights and inputs, interleaved (ours, theirs,
ours, ...) after a warm-up, and reports medians, the ratio (baseline time / our time, so > 1
means we are faster; the median of the ratios of back-to-back runs), GFLOP/s and the fraction
of this machine's GEMM roof measured in the same run with a large torch.mm in the row's dtype.
Absolute times on a shared machine move between runs; the ratios measured side by side are what
to compare.

    python benchmarks/bench_lstm.py --quick              # a few rows, seconds
    python benchmarks/bench_lstm.py --json out.json      # the default suite
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
import dataclasses
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import lstm_ext


@dataclass
class Row:
    # "inference" (no_grad), "forward" (recording for backward, as in training), "training"
    # (forward + backward), "decode"
    mode: str
    hidden: int
    batch: int
    steps: int
    input_size: int = 0        # 0: same as hidden
    layers: int = 1
    dtype: str = "float32"
    bidirectional: bool = False
    proj_size: int = 0
    packed: bool = False       # variable lengths as a PackedSequence
    autocast: bool = False     # fp32 module under torch.autocast in `dtype`
    int8: bool = False         # int8 weights: ours quantize_dynamic'd, torch's likewise
    input_grad: bool = False   # training with an input that requires grad (as after an embedding)
    cell: bool = False         # LSTMCell against nn.LSTMCell, one call per step in a Python loop
    results: dict = field(default_factory=dict)

    @property
    def name(self):
        parts = [self.mode, f"H{self.hidden}", f"B{self.batch}", f"T{self.steps}"]
        if self.layers > 1:
            parts.append(f"L{self.layers}")
        if self.bidirectional:
            parts.append("bidir")
        if self.proj_size:
            parts.append(f"P{self.proj_size}")
        if self.packed:
            parts.append("packed")
        parts.append(("autocast-" if self.autocast else "") + self.dtype)
        if self.int8:
            parts.append("int8")
        if self.input_grad:
            parts.append("input-grad")
        if self.cell:
            parts.append("cell")
        return " ".join(parts)


# fp32 inference rows of at least this batch count in their own group (the "inference-batched"
# suite); the "inference" suite's B 1 and 4 rows are bound by reading the weights instead.
BATCHED_INFERENCE_ROWS = 16
BATCHED_INFERENCE_GROUP = f"inference fp32, B >= {BATCHED_INFERENCE_ROWS}"

QUICK = [
    Row("inference", 256, 16, 25),
    Row("forward", 256, 16, 25),
    Row("training", 256, 16, 25),
    Row("decode", 256, 1, 1, layers=2),
]

# DeepBench's LSTM shapes scaled to a 2-core CPU, language-model shapes, and the cases where
# nn.LSTM leaves oneDNN (PackedSequence, projections, fp64) or uses it differently (bf16).
SUITES = {
    "training": [Row("training", h, b, t) for h in (256, 512, 1024) for b in (16, 32, 64)
                 for t in (25, 50, 150)],
    "inference": [Row("inference", h, b, t) for h in (256, 512, 1024) for b in (1, 4)
                  for t in (25, 150)],
    # Batched inference (evaluation, offline scoring), where each step's product has rows
    # enough to run near the roof on both sides: its own group, so that the B 1 and 4 group
    # stays comparable across runs.
    "inference-batched": [Row("inference", h, b, t) for h, b in ((256, 32), (512, 16),
                                                                 (512, 32), (1024, 16))
                          for t in (25, 50)],
    "lm": [Row("training", 650, 20, 35, layers=2),
           Row("training", 512, 64, 128, input_size=64, layers=2)],
    "packed": [Row("training", h, b, 100, packed=True) for h, b in ((256, 32), (512, 32), (512, 64))]
              + [Row("inference", 512, 32, 100, packed=True)],
    "bf16": [Row("training", h, 32, 50, dtype="bfloat16", autocast=True) for h in (256, 512, 1024)]
            + [Row("training", 512, 32, 50, dtype="bfloat16"),
               Row("inference", 512, 32, 50, dtype="bfloat16", autocast=True)],
    "fp64": [Row("training", h, 32, 50, dtype="float64") for h in (256, 512)],
    "projection": [Row("training", h, 32, 50, proj_size=h // 4) for h in (512, 1024)],
    "bidirectional": [Row("training", 256, 16, 50, bidirectional=True),
                      Row("training", 512, 32, 50, layers=2, bidirectional=True)],
    "decode": [Row("decode", 512, 1, 1, layers=2)],
    # LSTMCell as models that step it in Python use it: 25 calls, the state carried.
    "cell": [Row(mode, h, b, 25, cell=True) for mode in ("inference", "training")
             for h, b in ((128, 8), (256, 8), (256, 32), (512, 16))],
    # Training rows whose input requires grad, so that both sides compute dx (torch's oneDNN
    # computes it either way; ours only when asked).
    "input-grad": [Row("training", h, 32, 50, input_grad=True) for h in (256, 512, 1024)],
    # int8 weights (lstm_ext.quantize_dynamic) against torch's quantize_dynamic(nn.LSTM), and
    # against our own fp32 in the same run (the serving issue's target: 2x our fp32 decode).
    "int8": [Row("decode", 512, 1, 1, layers=2, int8=True),
             Row("decode", 512, 32, 1, layers=2, int8=True),
             Row("inference", 512, 1, 25, int8=True), Row("inference", 512, 4, 25, int8=True)],
    # The CUDA issue's targets: DeepBench training shapes against cuDNN, fp32 and half types,
    # the language-model shape, and decode steps of a 2-layer model.
    "gpu-fp32": [Row(mode, h, b, t) for h in (256, 512, 1024) for b in (16, 64)
                 for t in (25, 150) for mode in ("forward", "training")]
                + [Row("training", 512, 64, 128, input_size=64, layers=2)]
                + [Row("decode", 512, b, 1, layers=2) for b in (1, 8)],
    "gpu-half": [Row(mode, h, b, t, dtype=dtype) for dtype in ("bfloat16", "float16")
                 for h in (256, 512, 1024) for b in (16, 64) for t in (25, 150)
                 for mode in ("forward", "training")]
                + [Row("training", 512, 64, 128, input_size=64, layers=2, dtype=dtype)
                   for dtype in ("bfloat16", "float16")]
                + [Row("decode", 512, 8, 1, layers=2, dtype=dtype)
                   for dtype in ("bfloat16", "float16")],
}
CPU_SUITES = [name for name in SUITES if not name.startswith("gpu")]

# The targets of the "CPU performance" issue: median ratio (torch time / ours) per group.
TARGETS = {
    "training fp32": 1.3,
    "inference fp32": 1.3,
    # The inference group as it was first tried included H 256 B 32 and H 512 B 16.
    BATCHED_INFERENCE_GROUP: 1.3,
    "packed training": 3.0,
    "bf16 training (autocast)": 1.3,
    "fp64 training": 2.0,
    "projection training": 2.0,
    "decode": 3.0,
    # The CUDA issue's: forward + backward on par with cuDNN overall, faster at B <= 16.
    **{f"gpu fwd+bwd {dtype}{batches}": 1.0 for dtype in ("float32", "bfloat16", "float16")
       for batches in ("", " B<=16")},
    **{f"gpu decode {dtype}": 3.0 for dtype in ("float32", "bfloat16", "float16")},
}
# A CUDA timing spans at least this long (repeating the run), so that launch jitter and the
# timer's resolution stay small against it.
MIN_CUDA_TIMING_S = 0.01
# Without --repeats, a row is timed at least this long in all (every contender's runs), up to
# MAX_REPEATS iterations: five iterations of a row of a few ms are too few for a median ratio
# on a shared machine, whose speed drifts between iterations.
MIN_TIMED_S = 1.0
MAX_REPEATS = 40


def groups_of(row, device_type):
    """The summary groups a row counts in: on CUDA by pass and dtype, and again for B <= 16."""
    if device_type != "cuda":
        return [group_of(row)]
    group = f"gpu {'fwd+bwd' if row.mode == 'training' else row.mode} {row.dtype}"
    return [group] + ([f"{group} B<=16"] if row.batch <= 16 else [])


def group_of(row):
    if row.int8:
        return f"int8 {row.mode}"
    if row.mode == "decode":
        return "decode"
    if row.cell:
        return f"cell {row.mode}"
    if row.packed:
        return f"packed {row.mode}"
    if row.proj_size:
        return f"projection {row.mode}"
    if row.dtype == "bfloat16":
        return f"bf16 {row.mode}" + (" (autocast)" if row.autocast else " (native)")
    if row.dtype == "float64":
        return f"fp64 {row.mode}"
    if row.bidirectional or row.layers > 1:
        return f"multi-layer/bidirectional {row.mode}"
    if row.input_grad:
        return f"{row.mode} fp32, input requires grad"
    if row.mode == "inference" and row.batch >= BATCHED_INFERENCE_ROWS:
        return BATCHED_INFERENCE_GROUP
    return f"{row.mode} fp32"


def flops(row, rows_of_data):
    """FLOPs of the products a call computes: the forward's 2·N·4H·(I+R) per layer and
    direction, + 2·N·H·P for projections, where N is the number of (step, sequence) pairs;
    training 3× that (each product again for the gradient of each operand), less the first
    layer's input gradient 2·N·4H·I per direction where the input does not require grad."""
    state = row.proj_size or row.hidden
    directions = 2 if row.bidirectional else 1
    total = 0
    input_size = row.input_size or row.hidden
    first_input_size = input_size
    for _ in range(row.layers):
        per_direction = 2 * rows_of_data * 4 * row.hidden * (input_size + state)
        if row.proj_size:
            per_direction += 2 * rows_of_data * row.hidden * row.proj_size
        total += directions * per_direction
        input_size = state * directions
    if row.mode != "training":
        return total
    input_gradient = directions * 2 * rows_of_data * 4 * row.hidden * first_input_size
    return 3 * total - (0 if row.input_grad else input_gradient)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(run, device, repeats):
    """The fastest of several runs after two warm-ups: a roof is what the machine can reach,
    and clocks and neighbours on a shared machine only ever pull single runs down."""
    times = []
    for _ in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times[2:])


def onednn_product(a, b):
    """a @ b through the oneDNN that torch ships, b prepacked once, or None where this torch
    has no such op (on x86 CPUs it reaches the vector width MKL's torch.mm may not use)."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        packed = mkldnn._reorder_linear_weight(b.t().contiguous(), batch_size=a.shape[0])
        run = lambda: mkldnn._linear_pointwise(a, packed, None, "none", [], "")  # noqa: E731
        run()
        return run
    except (AttributeError, RuntimeError):
        return None


def roof_products(dtype, device, size=None):
    """The roof's candidates: a large square product in this dtype through torch.mm and, on
    the CPU, torch's oneDNN (prepacked), since the roof is the best GEMM available, not
    whichever library torch.mm happens to call; with the FLOPs of one."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    runs = [lambda: torch.mm(a, b)]
    if device.type == "cpu":
        runs.append(onednn_product(a, b))
    return [run for run in runs if run], 2 * size**3


def gemm_roof(dtype, device, size=None, repeats=10):
    """GFLOP/s of the roof's product in this dtype, on this device, now: the better of its
    candidates."""
    runs, product_flops = roof_products(dtype, device, size)
    return max(product_flops / best_time(run, device, repeats) / 1e9 for run in runs)


# Per dtype, the roof's product that measure() times around each CPU row, and its FLOPs.
_ROOF_PRODUCTS = {}


def roof_now(dtype, device, repeats=3):
    """GFLOP/s of the faster of the roof's candidates in this dtype (chosen once per run), now.
    measure() takes it right before and right after a CPU row: a VM's speed moves by up to
    1.8x within a run, so a row measured in a slow phase sits low against a roof measured in
    a fast one. Not in every iteration: the product's 48 MB would push the row's weights out
    of the caches between its timed calls."""
    if dtype not in _ROOF_PRODUCTS:
        runs, product_flops = roof_products(dtype, device)
        _ROOF_PRODUCTS[dtype] = (min(runs, key=lambda run: best_time(run, device, 2)),
                                 product_flops)
    run, product_flops = _ROOF_PRODUCTS[dtype]
    return product_flops / best_time(run, device, repeats) / 1e9


def build(row, device, generator):
    dtype = getattr(torch, row.dtype)
    module_dtype = torch.float32 if row.autocast else dtype
    input_size = row.input_size or row.hidden
    torch.manual_seed(0)
    if row.cell:
        baseline = nn.LSTMCell(input_size, row.hidden, device=device, dtype=module_dtype)
        ours = lstm_ext.LSTMCell.from_torch(baseline)
    else:
        baseline = nn.LSTM(input_size, row.hidden, row.layers, bidirectional=row.bidirectional,
                           proj_size=row.proj_size, device=device, dtype=module_dtype)
        ours = lstm_ext.LSTM.from_torch(baseline)
    if row.int8:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao's eager quantization
            baseline = torch.ao.quantization.quantize_dynamic(baseline, {nn.LSTM},
                                                              dtype=torch.qint8)
        ours = lstm_ext.quantize_dynamic(ours)
    if row.packed:
        # Lengths spread like sentences in a batch: from a fifth of the longest to the longest.
        lengths = torch.randint(row.steps // 5, row.steps + 1, (row.batch,), generator=generator)
        lengths[0] = row.steps
        sequences = [torch.randn(int(n), input_size, generator=generator).to(device, module_dtype)
                     for n in lengths]
        make_input = lambda: pack_sequence(sequences, enforce_sorted=False)  # noqa: E731
        rows_of_data = int(lengths.sum())
    else:
        x = torch.randn(row.steps, row.batch, input_size, generator=generator).to(device, module_dtype)
        x.requires_grad_(row.input_grad)
        make_input = lambda: x  # noqa: E731
        rows_of_data = row.steps * row.batch
    return baseline, ours, make_input, rows_of_data


def cell_steps(module, x):
    """The cell over every step of x (T, B, I), from a zero state: the outputs, stacked."""
    h = c = x.new_zeros(x.shape[1], module.hidden_size)
    outputs = []
    for step in x:
        h, c = module(step, (h, c))
        outputs.append(h)
    return torch.stack(outputs), (h, c)


def step_function(row, module, make_input, device):
    autocast = torch.autocast(device.type, dtype=getattr(torch, row.dtype), enabled=row.autocast)
    if row.cell:
        forward = lambda data: cell_steps(module, data)  # noqa: E731
    else:
        forward = module
    if row.mode == "inference":
        def run():
            with torch.no_grad(), autocast:
                forward(make_input())
    elif row.mode == "forward":
        def run():
            with autocast:
                forward(make_input())
    elif row.mode == "training":
        def run():
            module.zero_grad(set_to_none=True)
            data_in = make_input()
            if isinstance(data_in, torch.Tensor):
                data_in.grad = None
            with autocast:
                output, (h, c) = forward(data_in)
            data = output.data if hasattr(output, "batch_sizes") else output
            (data.float().sum() + h.float().sum()).backward()
    else:  # decode: one token at a time, state carried, as in generation
        x = make_input()[:1]
        state = [None]

        def run():
            with torch.no_grad():
                _, state[0] = module(x, state[0])
    return run


def read_bandwidth(nbytes, device, repeats=20):
    """GB/s of reading a buffer of nbytes (a working set of that size, warm), now."""
    buffer = torch.ones(max(1, nbytes // 4), device=device)
    times = []
    for _ in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        buffer.sum()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times[2:]) / 1e9


# The op that shows which kernel nn.LSTM ran; without any of them it ran ATen's own cell loop.
BASELINE_KERNELS = {"aten::_cudnn_rnn": "cuDNN", "aten::miopen_rnn": "MIOpen",
                    "aten::mkldnn_rnn_layer": "oneDNN"}


def baseline_kernel(run):
    """Which kernel one call of the baseline's `run` went through, so that a row where nn.LSTM
    left cuDNN/oneDNN for ATen's slower native loop (an unsupported dtype or layout) cannot
    pass for a win against the vendor kernel."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    names = {event.name for event in profile.events()}
    return next((label for op, label in BASELINE_KERNELS.items() if op in names), "native ATen")


GEMM_EVENTS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "lstm_ext::step_gemm",
               "mkldnn::_linear_pointwise", "lstm_ext::panel_product", "lstm_ext::small_linear"}


def recurrence_kernels(dtype):
    """The instructions the fused recurrence multiplies with for `dtype`: the kernel set in
    use, except that under amx only bf16 runs on the tiles (the rest is AVX-512)."""
    isa = torch.ops.lstm_ext.cpu_isa()
    if isa == "amx" and dtype != torch.bfloat16:
        return "avx512"
    return isa


def profile_split(run, dtype=torch.float32):
    """Where one call of `run` spends its time: GEMMs (the whole-sequence products, and the
    per-step ones where the step loop runs), the recurrence (the fused CPU kernel, or the
    step loop's elementwise passes), and everything else (allocation, copies, dispatch,
    Python, autograd), plus which library ran the products. Profiler overhead lands in
    "other", so that share is an upper bound."""
    run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        start = time.perf_counter()
        run()
        total_us = (time.perf_counter() - start) * 1e6
    gemm = elementwise = 0.0
    for event in profile.key_averages():
        if event.key in GEMM_EVENTS:
            gemm += event.self_cpu_time_total
        elif event.key in ("lstm_ext::step_elementwise", "lstm_ext::recurrence"):
            elementwise += event.self_cpu_time_total
    keys = {event.key for event in profile.key_averages()}
    libraries = []
    if "lstm_ext::recurrence" in keys:
        libraries.append(f"per-step products in lstm_ext's fused recurrence "
                         f"({recurrence_kernels(dtype)})")
    if "lstm_ext::step_gemm" in keys:
        libraries.append("per-step products in the step loop's GEMM ("
                         + ("MKL packed" if torch.ops.lstm_ext.cpu_packed_gemm_enabled()
                            else "ATen") + ")")
    if "mkldnn::_linear_pointwise" in keys:
        libraries.append("whole-sequence products in oneDNN")
    if "lstm_ext::small_linear" in keys:
        libraries.append("whole-sequence products in lstm_ext's dot products on the weights "
                         f"in place ({recurrence_kernels(dtype)})")
    if "lstm_ext::panel_product" in keys:
        libraries.append("backward products in lstm_ext's panel tiles "
                         f"({recurrence_kernels(dtype)})")
    if keys & {"aten::mm", "aten::addmm"}:
        # ATen's matmul is oneDNN's for bf16 and fp16, MKL's for fp32 and fp64 (x86 wheels).
        by = "oneDNN" if dtype in (torch.bfloat16, torch.float16) else "MKL on x86 wheels"
        libraries.append(f"whole-sequence products in ATen ({by})")
    return {"gemm": gemm / total_us, "elementwise": elementwise / total_us,
            "other": max(0.0, 1 - (gemm + elementwise) / total_us),
            "libraries": libraries}


def paired_ratio(times, over, under):
    """The median over iterations of times[over][i] / times[under][i]. The two ran one after
    the other, so a slow phase of a shared machine (a VM's speed drifts by 1.5x within
    minutes) slows both and cancels, where the ratio of two medians keeps it."""
    return statistics.median(a / b for a, b in zip(times[over], times[under]))


def times_in_ms(times):
    """Every iteration's seconds per contender, as the JSON keeps them: ms, keys without
    spaces."""
    return {name.replace(" ", "_"): [round(t * 1e3, 4) for t in values]
            for name, values in times.items()}


def sized_repeats(repeats, min_timed_s, iteration_s):
    """The iterations to time: `repeats`, or more where that many iterations of iteration_s
    each would take less than min_timed_s, up to MAX_REPEATS."""
    if min_timed_s <= 0:
        return repeats
    return max(repeats, min(MAX_REPEATS, math.ceil(min_timed_s / iteration_s)))


def measure(row, device, repeats, warmup, profile=False, min_timed_s=0.0):
    """Times the row's contenders interleaved: `warmup` iterations, then `repeats`, or more
    where that many would take less than min_timed_s (the warm-up's last iteration tells),
    up to MAX_REPEATS."""
    generator = torch.Generator().manual_seed(0)
    baseline, ours, make_input, rows_of_data = build(row, device, generator)
    runs = {"ours": step_function(row, ours, make_input, device),
            "torch": step_function(row, baseline, make_input, device)}
    if row.int8:  # our fp32 on the same weights, before quantization
        fp32 = build(dataclasses.replace(row, int8=False), device,
                     torch.Generator().manual_seed(0))[1]
        runs["ours fp32"] = step_function(row, fp32, make_input, device)
    # Rows bound by reading weights measure the read bandwidth of their working set in every
    # iteration too, so that the floor comes from the same moments as the row's own times (a
    # VM's speed drifts within seconds; decode measured 65 % of its floor in a full run where
    # the bandwidth was measured in one burst after the row, 86 % alone).
    has_floor = row.mode == "decode" or row.batch <= SMALL_BATCH
    if has_floor:
        weight_bytes, working_set = bytes_read(row, ours, rows_of_data)
    bandwidths = []
    dtype = getattr(torch, row.dtype)
    roofs_around = []
    if device.type == "cpu":
        roofs_around.append(roof_now(dtype, device))
    # Decode steps are too short to time one by one: 1000 carried steps per timing. On CUDA the
    # warm-ups size the repeat count so that a timing lasts MIN_CUDA_TIMING_S.
    inner = {name: 1000 if row.mode == "decode" else 1 for name in runs}
    times = {name: [] for name in runs}
    iteration = 0
    while iteration < warmup + repeats:
        iteration_s = 0.0
        for name, run in runs.items():  # interleaved, so both see the same machine state
            synchronize(device)
            start = time.perf_counter()
            for _ in range(inner[name]):
                run()
            synchronize(device)
            elapsed = time.perf_counter() - start
            iteration_s += elapsed
            seconds = elapsed / inner[name]
            if iteration >= warmup:
                times[name].append(seconds)
            elif device.type == "cuda":
                inner[name] = max(inner[name], math.ceil(MIN_CUDA_TIMING_S / seconds))
        if has_floor and iteration >= warmup:
            bandwidths.append(read_bandwidth(working_set, device, repeats=3))
        iteration += 1
        if iteration == warmup:
            repeats = sized_repeats(repeats, min_timed_s, iteration_s)
    ours_s, torch_s = statistics.median(times["ours"]), statistics.median(times["torch"])
    result = {
        "ours_ms": ours_s * 1e3,
        "torch_ms": torch_s * 1e3,
        "ratio": paired_ratio(times, "torch", "ours"),
        "ours_gflops": flops(row, rows_of_data) / ours_s / 1e9,
    }
    result["times_ms"] = times_in_ms(times)
    if roofs_around:
        roofs_around.append(roof_now(dtype, device))
        result["roof_around_gflops"] = roof = max(roofs_around)
        result["roof_around_fraction"] = result["ours_gflops"] / roof
    if row.int8:
        result["ours_fp32_ms"] = statistics.median(times["ours fp32"]) * 1e3
        result["speedup_over_fp32"] = paired_ratio(times, "ours fp32", "ours")
    result["baseline_kernel"] = baseline_kernel(runs["torch"])
    if profile:
        result["profile"] = profile_split(runs["ours"], dtype)
    if has_floor:
        bandwidth = statistics.median(bandwidths)
        result.update(weight_bytes=weight_bytes, read_gbps=bandwidth,
                      bound_ms=weight_bytes / bandwidth / 1e6, read_gbps_each=bandwidths)
        # Paired, as the ratio is: each iteration's floor over the row's time in it.
        result["bound_fraction"] = statistics.median(
            weight_bytes / (gbps * 1e9) / seconds
            for gbps, seconds in zip(bandwidths, times["ours"]))
    return result


# Rows of at most this batch are bound by reading weights, not by arithmetic: their limit is
# the weight-read floor, not the GEMM roof.
SMALL_BATCH = 4


def bytes_read(row, module, rows_of_data):
    """The bytes of weights one call must read at least, and the working set they come from.
    A decode step reads every weight once. A small-batch sequence reads W_ih once (the input
    projection of every step is one product) and W_hh (and W_hr) at every step."""
    tensors = list(module.parameters()) + list(module.buffers())  # int8 weights are buffers
    everything = sum(t.numel() * t.element_size() for t in tensors)
    if row.mode == "decode":
        return everything, everything
    recurrent = sum(t.numel() * t.element_size()
                    for name, t in [*module.named_parameters(), *module.named_buffers()]
                    if name.startswith(("weight_hh", "weight_hr")))
    others = everything - recurrent
    steps = rows_of_data / row.batch
    return others + steps * recurrent, everything


# Instruction-set extensions worth naming with a CPU result (/proc/cpuinfo's names).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16")
# Microarchitectures by (vendor, family, model), for result names where a VM hides the model.
MICROARCHITECTURES = {
    ("AuthenticAMD", 25, range(0x00, 0x10)): "zen3",
    ("AuthenticAMD", 25, range(0x10, 0x100)): "zen4",
    ("AuthenticAMD", 26, range(0x00, 0x100)): "zen5",
    ("GenuineIntel", 6, range(85, 86)): "skylake-sp",
    ("GenuineIntel", 6, range(106, 107)): "icelake-sp",
    ("GenuineIntel", 6, range(143, 144)): "sapphire-rapids",
    ("GenuineIntel", 6, range(207, 208)): "emerald-rapids",
    ("GenuineIntel", 6, range(173, 174)): "granite-rapids",
}


def cpu_details(cpuinfo_text):
    """Vendor, model name, family/model, microarchitecture and the named ISA flags, from the
    text of /proc/cpuinfo (its first processor)."""
    fields = {}
    for line in cpuinfo_text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    vendor = fields.get("vendor_id", "unknown")
    family = int(fields.get("cpu family", "0") or 0)
    model = int(fields.get("model", "0") or 0)
    flags = set(fields.get("flags", "").split())
    uarch = next((name for (v, f, models), name in MICROARCHITECTURES.items()
                  if v == vendor and f == family and model in models),
                 f"family{family}-model{model}")
    return {"vendor": vendor, "model_name": fields.get("model name", platform.processor()),
            "family": family, "model": model, "microarchitecture": uarch,
            "isa_flags": [flag for flag in CPU_FLAGS if flag in flags]}


def result_name(machine):
    """cpu-<vendor>-<model>-<microarchitecture>: results are kept per CPU."""
    vendor = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(machine["vendor"],
                                                                  machine["vendor"].lower())
    words = machine["model_name"].lower().replace("(r)", "").replace("(tm)", "").split()
    model = "-".join(w for w in words if w not in ("amd", "intel", "processor", "cpu", "@"))
    slug = "-".join(part for part in ("cpu", vendor, model, machine["microarchitecture"]) if part)
    return "".join(c if c.isalnum() or c in "-." else "-" for c in slug)


def library_versions():
    """oneDNN and MKL versions from torch's build description."""
    config = torch.__config__.show()
    versions = {}
    for key, marker in (("onednn", "MKL-DNN v"), ("mkl", "Math Kernel Library Version ")):
        if marker in config:
            versions[key] = config.split(marker, 1)[1].split()[0]
    return versions


def machine_details(device):
    details = {"gpu": device.type == "cuda", "torch": torch.__version__,
               "threads": torch.get_num_threads(),
               "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
               "tf32": torch.backends.cuda.matmul.allow_tf32,
               "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device.type == "cuda":
        details["device"] = torch.cuda.get_device_name(device)
        return details
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = cpu_details(cpuinfo.read())
    except OSError:
        cpu = cpu_details("")
    details.update(cpu, device=f"{cpu['model_name']} ({cpu['microarchitecture']})",
                   cores=os.cpu_count(), kernel_isa=torch.ops.lstm_ext.cpu_isa(),
                   **library_versions())
    return details


def summarize(rows, device_type):
    """Median ratio per group, next to the group's target where it has one."""
    groups = {}
    for row in rows:
        if "error" in row.results:
            continue
        for group in groups_of(row, device_type):
            groups.setdefault(group, []).append(row.results["ratio"])
    return [{"group": group, "rows": len(ratios), "median_ratio": statistics.median(ratios),
             "target": TARGETS.get(group)} for group, ratios in groups.items()]


def split_text(result):
    split = result.get("profile")
    if not split:
        return ""
    return (f" GEMM {100 * split['gemm']:.0f} %, recurrence {100 * split['elementwise']:.0f} %, "
            f"other {100 * split['other']:.0f} % |")


def table(rows, summary, machine, command):
    lines = [
        f"# lstm_ext vs torch.nn.LSTM — {machine['device']}",
        "",
        f"`{command}` on {machine['date']}: torch {machine['torch']}, {machine['threads']} "
        f"threads, Python {machine['python']}"
        + (f", CUDA {machine['cuda']}, cuDNN {machine['cudnn']}, TF32 "
           f"{'on' if machine['tf32'] else 'off'}" if machine.get("gpu") else "")
        + ". ratio = torch time / ours (above 1: we are faster). GFLOP/s are ours; the "
        "limit is the GEMM roof in the row's dtype (the better of torch.mm and torch's "
        "oneDNN, measured in the same run; on the CPU, in brackets, against the faster of "
        "the two timed right before and right after the row) or, for batches of at most "
        f"{SMALL_BATCH} and decode, the weight-read floor (the weights a call must read, over "
        "the read bandwidth of a working set that size, measured in every iteration of the "
        "row and paired with it as the ratio is) where that floor is the tighter bound.",
        "" if machine.get("gpu") else cpu_line(machine),
        "",
        "| group | rows | median ratio | target | met |",
        "|---|---:|---:|---:|:---:|",
    ]
    for entry in summary:
        target = entry["target"]
        met = "" if target is None else ("yes" if entry["median_ratio"] >= target else "no")
        lines.append(f"| {entry['group']} | {entry['rows']} | {entry['median_ratio']:.2f} | "
                     f"{'' if target is None else f'{target:.1f}'} | {met} |")
    lines += ["", "| row | ours ms | torch ms | ratio | GFLOP/s | limit | notes |",
              "|---|---:|---:|---:|---:|---:|---|"]
    if any("profile" in row.results for row in rows):
        lines[-2] = lines[-2][:-len(" notes |")] + " where our time goes (profiled) | notes |"
        lines[-1] = lines[-1][:-len("---|")] + "---|---|"
    for row in rows:
        r = row.results
        notes = [r["error"]] if "error" in r else []
        if "baseline_kernel" in r:
            notes.append(f"torch ran {r['baseline_kernel']}")
        if "speedup_over_fp32" in r:
            notes.append(f"our fp32 {r['ours_fp32_ms']:.3f} ms: int8 "
                         f"{r['speedup_over_fp32']:.2f}x faster")
        if "bound_ms" in r:
            notes.append(f"weights {r['weight_bytes'] / 1e6:.1f} MB read at "
                         f"{r['read_gbps']:.0f} GB/s: floor {r['bound_ms']:.3f} ms")
        note = "; ".join(notes)
        if "profile" in r:
            note = "; ".join([note] * bool(note) + r["profile"]["libraries"])
        lines.append(f"{row_line(row)}{split_text(r) or ''} {note} |")
    return "\n".join(lines) + "\n"


def limit_text(results):
    """Where a row stands against its limit: the GEMM roof, or for small batches and decode the
    weight-read floor, unless the roof is the tighter of the two there (a CPU whose multiply-adds,
    not its reads, bound a batch of 4: the larger fraction is the limit that binds); with the
    roof as timed around the row, where it was."""
    roof = results["roof_fraction"]
    if "bound_fraction" in results and results["bound_fraction"] >= roof:
        return f"{100 * results['bound_fraction']:.0f} % of floor"
    text = f"{100 * roof:.0f} % of roof"
    if "roof_around_fraction" in results:
        text += f" ({100 * results['roof_around_fraction']:.0f} % of the roof timed around it)"
    return text


def cpu_line(machine):
    """The CPU a result came from, as the report names it."""
    if "vendor" not in machine:
        return ""
    versions = ", ".join(f"{name} {machine[key]}" for key, name in
                         (("onednn", "oneDNN"), ("mkl", "MKL")) if machine.get(key))
    return (f"CPU: {machine['model_name']}, {machine['vendor']} family {machine['family']} "
            f"model {machine['model']} ({machine['microarchitecture']}), {machine['cores']} "
            f"cores; flags {' '.join(machine['isa_flags']) or 'none of note'}; lstm_ext "
            f"kernels: {machine['kernel_isa']}" + (f"; {versions}" if versions else "") + ".")


def row_line(row):
    """The timing columns of a row's table line (blank where the row failed)."""
    r = row.results
    if "error" in r:
        return f"| {row.name} | | | | | |"
    return (f"| {row.name} | {r['ours_ms']:.3f} | {r['torch_ms']:.3f} | {r['ratio']:.2f} | "
            f"{r['ours_gflops']:.1f} | {limit_text(r)} |")


def roof_keeper(measure, roofs):
    """run_rows' roof_of: the GEMM roof of a row's dtype (kept in `roofs`), measured by
    measure(dtype) the first time and again, keeping the better, whenever a row runs faster
    than it. A roof is what the machine can reach, so a row above it means a stall on a shared
    machine pulled that measurement down (a VM once measured 58 GFLOP/s against 205 in the
    run before, and put rows at 250 % of it)."""
    def roof_of(row):
        dtype = getattr(torch, row.dtype)
        if dtype not in roofs or row.results.get("ours_gflops", 0.0) > roofs[dtype]:
            roofs[dtype] = max(roofs.get(dtype, 0.0), measure(dtype))
        return roofs[dtype]
    return roof_of


def run_rows(rows, measure_row, roof_of, after_row=lambda done: None):
    """Measures every row, printing each line as it lands and handing the rows done so far to
    `after_row` (which writes the reports, so that a run stopped by a time limit keeps what it
    measured). A row that fails (an unsupported dtype in the baseline, out of memory, a kernel
    error) records its error and the run goes on, so that one bad row does not cost the rows
    after it (a GPU run may be one call)."""
    for index, row in enumerate(rows):
        try:
            row.results = measure_row(row)
            roof = roof_of(row)
            # Earlier rows of the dtype too, where the roof was measured again.
            for done in rows[:index + 1]:
                if done.dtype == row.dtype and "ours_gflops" in done.results:
                    done.results["roof_gflops"] = roof
                    done.results["roof_fraction"] = done.results["ours_gflops"] / roof
        except RuntimeError as error:
            first_line = (str(error).strip().splitlines() or [""])[0]
            row.results = {"error": f"{type(error).__name__}: {first_line[:200]}"}
        after_row(rows[:index + 1])
        print(f"{row_line(row)}{split_text(row.results)} {row.results.get('error', '')}".rstrip(),
              flush=True)


def baseline_counts(rows):
    """How many measured rows ran against each baseline kernel."""
    counts = {}
    for row in rows:
        if "baseline_kernel" in row.results:
            kernel = row.results["baseline_kernel"]
            counts[kernel] = counts.get(kernel, 0) + 1
    return counts


def write_atomically(path, text):
    """Replaces `path` in one step, so that a run killed mid-write leaves the previous report."""
    temporary = f"{path}.partial"
    with open(temporary, "w") as file:
        file.write(text)
    os.replace(temporary, path)


def load_report(path):
    """A saved JSON report: its rows (as Rows, with their results) and everything else."""
    with open(path) as file:
        report = json.load(file)
    names = {f.name for f in dataclasses.fields(Row)}
    rows = [Row(**{key: value for key, value in entry.items() if key in names})
            for entry in report["rows"]]
    return rows, report


def describe(rows, report):
    """One line on a saved run: rows measured, rows failed, the baseline kernels, the groups."""
    device_type = "cuda" if report["machine"].get("gpu") else "cpu"
    errors = [row for row in rows if "error" in row.results]
    kernels = ", ".join(f"{kernel} {count}" for kernel, count in baseline_counts(rows).items())
    groups = "; ".join(f"{entry['group']} {entry['median_ratio']:.2f}"
                       for entry in summarize(rows, device_type))
    planned = report.get("rows_planned", len(rows))
    return (f"{len(rows)} of {planned} rows" + (f", {len(errors)} failed" if errors else "")
            + (f"; torch ran {kernels}" if kernels else "") + (f"; median ratios: {groups}"
                                                                 if groups else ""))


def write_reports(rows, planned, args, machine, command, roofs, device_type):
    """The JSON and markdown reports of the rows measured so far (`planned` in all)."""
    summary = summarize(rows, device_type)
    if args.json:
        write_atomically(args.json, json.dumps({
            "machine": machine, "command": command, "complete": len(rows) == planned,
            "rows_planned": planned,
            "roofs_gflops": {str(k): v for k, v in roofs.items()},
            "summary": summary, "baseline_kernels": baseline_counts(rows),
            "rows": [dict(asdict(r), name=r.name, groups=groups_of(r, device_type))
                     for r in rows]}, indent=2))
    if args.markdown:
        text = table(rows, summary, machine, command)
        if len(rows) < planned:
            text += f"\nIncomplete: {len(rows)} of {planned} rows measured.\n"
        write_atomically(args.markdown, text)


def chart(rows, path, machine):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if "error" not in row.results]
    names = [row.name for row in rows]
    ratios = [row.results["ratio"] for row in rows]
    figure, axes = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.5))
    colors = ["tab:green" if r >= 1 else "tab:red" for r in ratios]
    axes.barh(range(len(rows)), ratios, color=colors)
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_yticks(range(len(rows)), names, fontsize=7)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlabel("torch.nn.LSTM time / lstm_ext time (log scale; right of 1: lstm_ext faster)")
    axes.set_title(f"lstm_ext vs torch.nn.LSTM, {machine['device']}, torch {machine['torch']}",
                   fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a few small rows, in seconds")
    parser.add_argument("--suite", action="append", choices=sorted(SUITES),
                        help="run only these suites (repeatable; default: all)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per row (default: 5, more where 5 would take less "
                             f"than {MIN_TIMED_S:g} s, up to {MAX_REPEATS})")
    parser.add_argument("--tf32", action="store_true",
                        help="CUDA fp32: allow TF32 in matmuls and cuDNN (both implementations)")
    parser.add_argument("--profile", action="store_true",
                        help="also split each row's time into GEMM, elementwise and other")
    parser.add_argument("--json", help="write rows, summary and machine details here")
    parser.add_argument("--markdown", help="write the report as a markdown table here")
    parser.add_argument("--png", help="write a chart of the ratios here")
    parser.add_argument("--save", action="store_true",
                        help="write JSON, markdown and chart to benchmarks/results/ under this "
                             "machine's name (cpu-<vendor>-<model>-<microarchitecture>.*)")
    parser.add_argument("--report", metavar="JSON",
                        help="measure nothing: describe the run saved in this JSON in one line, "
                             "and write its --markdown/--png if asked")
    args = parser.parse_args()

    if args.report:
        rows, report = load_report(args.report)
        print(describe(rows, report))
        if args.markdown:
            device_type = "cuda" if report["machine"].get("gpu") else "cpu"
            with open(args.markdown, "w") as file:
                file.write(table(rows, summarize(rows, device_type), report["machine"],
                                 report["command"]))
        if args.png:
            chart(rows, args.png, report["machine"])
        return

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    if args.quick:
        rows = QUICK
    else:
        rows = [row for name in (args.suite or CPU_SUITES) for row in SUITES[name]]
    repeats = args.repeats or (3 if args.quick else 5)
    machine = machine_details(device)
    command = " ".join(["python benchmarks/bench_lstm.py", *sys.argv[1:]])
    print(f"# lstm_ext vs torch.nn.LSTM on {args.device} ({machine['device']}, torch "
          f"{machine['torch']}, {machine['threads']} threads); ratio = torch time / ours\n")
    if not machine["gpu"]:
        print(cpu_line(machine) + "\n")
    print("| row | ours ms | torch ms | ratio | GFLOP/s | limit |")
    print("|---|---:|---:|---:|---:|---:|")
    roofs = {}
    roof_of = roof_keeper(lambda dtype: gemm_roof(dtype, device), roofs)

    if args.save:
        stem = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            result_name(machine) if not machine["gpu"] else "gpu")
        args.json, args.markdown, args.png = (args.json or stem + ".json",
                                              args.markdown or stem + ".md",
                                              args.png or stem + ".png")
    # A given --repeats (or --quick) is the count; otherwise at least MIN_TIMED_S per row.
    min_timed_s = 0.0 if args.repeats or args.quick else MIN_TIMED_S
    run_rows(rows, lambda row: measure(row, device, repeats, warmup=1 if args.quick else 2,
                                       profile=args.profile, min_timed_s=min_timed_s), roof_of,
             lambda done: write_reports(done, len(rows), args, machine, command, roofs,
                                        device.type))
    summary = summarize(rows, device.type)
    print()
    for entry in summary:
        target = f" (target {entry['target']:.1f})" if entry["target"] else ""
        print(f"{entry['group']}: median ratio {entry['median_ratio']:.2f} over "
              f"{entry['rows']} rows{target}")
    print("baseline kernels: " + ", ".join(f"{kernel} {count} rows" for kernel, count in
                                           baseline_counts(rows).items()))
    if args.png:
        chart(rows, args.png, machine)


if __name__ == "__main__":
    main()
