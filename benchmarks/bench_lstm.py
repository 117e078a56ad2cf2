"""lstm_ext.LSTM against torch.nn.LSTM (oneDNN on the CPU, cuDNN on CUDA), side by side.

Each row runs both implementations on the same weights and inputs, interleaved (ours, theirs,
ours, ...) after a warm-up, and reports medians, the ratio (baseline time / our time, so > 1
means we are faster), GFLOP/s and the fraction of this machine's GEMM roof measured in the same
run with a large torch.mm in the row's dtype. Absolute times on a shared machine move between
runs; the ratios measured side by side are what to compare.

    python benchmarks/bench_lstm.py --quick              # a few rows, seconds
    python benchmarks/bench_lstm.py --json out.json      # the default suite
"""

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import lstm_ext


@dataclass
class Row:
    mode: str                  # "inference" (no_grad), "training" (forward + backward), "decode"
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
        return " ".join(parts)


QUICK = [
    Row("inference", 256, 16, 25),
    Row("training", 256, 16, 25),
]

DEFAULT = [
    *[Row("training", h, b, t) for h in (256, 512, 1024) for b in (16, 64) for t in (25, 150)],
    *[Row("inference", h, b, 50) for h in (256, 512, 1024) for b in (1, 4)],
    Row("training", 650, 20, 35, layers=2),
    Row("training", 512, 64, 128, input_size=64, layers=2),
    Row("training", 512, 32, 100, packed=True),
    Row("training", 512, 32, 50, dtype="bfloat16", autocast=True),
    Row("training", 512, 32, 50, dtype="float64"),
    Row("training", 512, 32, 50, proj_size=128),
    Row("training", 256, 16, 50, bidirectional=True),
    Row("decode", 512, 1, 1, layers=2),
]


def flops(row, rows_of_data):
    """FLOPs of the forward pass: 2·N·4H·(I+R) per layer and direction, + 2·N·H·P for
    projections, where N is the number of (step, sequence) pairs; training counts 3×."""
    state = row.proj_size or row.hidden
    directions = 2 if row.bidirectional else 1
    total = 0
    input_size = row.input_size or row.hidden
    for _ in range(row.layers):
        per_direction = 2 * rows_of_data * 4 * row.hidden * (input_size + state)
        if row.proj_size:
            per_direction += 2 * rows_of_data * row.hidden * row.proj_size
        total += directions * per_direction
        input_size = state * directions
    return total * (3 if row.mode == "training" else 1)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_roof(dtype, device, size=2048, repeats=5):
    """GFLOP/s of a large square torch.mm in this dtype, on this device, now."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times[1:]) / 1e9


def build(row, device, generator):
    dtype = getattr(torch, row.dtype)
    module_dtype = torch.float32 if row.autocast else dtype
    input_size = row.input_size or row.hidden
    torch.manual_seed(0)
    baseline = nn.LSTM(input_size, row.hidden, row.layers, bidirectional=row.bidirectional,
                       proj_size=row.proj_size, device=device, dtype=module_dtype)
    ours = lstm_ext.LSTM.from_torch(baseline)
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
        make_input = lambda: x  # noqa: E731
        rows_of_data = row.steps * row.batch
    return baseline, ours, make_input, rows_of_data


def step_function(row, module, make_input, device):
    autocast = torch.autocast(device.type, dtype=getattr(torch, row.dtype), enabled=row.autocast)
    if row.mode == "inference":
        def run():
            with torch.no_grad(), autocast:
                module(make_input())
    elif row.mode == "training":
        def run():
            module.zero_grad(set_to_none=True)
            with autocast:
                output, (h, c) = module(make_input())
            data = output.data if hasattr(output, "batch_sizes") else output
            (data.float().sum() + h.float().sum()).backward()
    else:  # decode: one token at a time, state carried, as in generation
        x = make_input()[:1]
        state = [None]

        def run():
            with torch.no_grad():
                _, state[0] = module(x, state[0])
    return run


def measure(row, device, repeats, warmup):
    generator = torch.Generator().manual_seed(0)
    baseline, ours, make_input, rows_of_data = build(row, device, generator)
    runs = {"ours": step_function(row, ours, make_input, device),
            "torch": step_function(row, baseline, make_input, device)}
    inner = 100 if row.mode == "decode" else 1  # decode steps are too short to time one by one
    times = {name: [] for name in runs}
    for iteration in range(warmup + repeats):
        for name, run in runs.items():  # interleaved, so both see the same machine state
            synchronize(device)
            start = time.perf_counter()
            for _ in range(inner):
                run()
            synchronize(device)
            if iteration >= warmup:
                times[name].append((time.perf_counter() - start) / inner)
    ours_s, torch_s = statistics.median(times["ours"]), statistics.median(times["torch"])
    return {
        "ours_ms": ours_s * 1e3,
        "torch_ms": torch_s * 1e3,
        "ratio": torch_s / ours_s,
        "ours_gflops": flops(row, rows_of_data) / ours_s / 1e9,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a couple of rows, in seconds")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row")
    parser.add_argument("--json", help="write the rows and machine details to this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    rows = QUICK if args.quick else DEFAULT
    repeats = args.repeats or (3 if args.quick else 7)
    roofs = {}
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(f"# lstm_ext vs torch.nn.LSTM on {args.device} ({machine['device']}, torch "
          f"{machine['torch']}, {machine['threads']} threads); ratio = torch time / ours\n")
    print("| row | ours ms | torch ms | ratio | GFLOP/s | % of GEMM roof |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        dtype = getattr(torch, row.dtype)
        if dtype not in roofs:
            roofs[dtype] = gemm_roof(dtype, device)
        row.results = measure(row, device, repeats, warmup=1 if args.quick else 2)
        row.results["roof_gflops"] = roofs[dtype]
        row.results["roof_fraction"] = row.results["ours_gflops"] / roofs[dtype]
        r = row.results
        print(f"| {row.name} | {r['ours_ms']:.3f} | {r['torch_ms']:.3f} | {r['ratio']:.2f} | "
              f"{r['ours_gflops']:.1f} | {100 * r['roof_fraction']:.0f} % |", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"machine": machine, "rows": [dict(asdict(r), name=r.name) for r in rows]},
                      file, indent=2)


if __name__ == "__main__":
    main()
