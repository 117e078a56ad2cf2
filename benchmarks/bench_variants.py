"""Each LSTM variant of lstm_ext (its keyword options beyond nn.LSTM) against plain
lstm_ext.LSTM and against the pure-PyTorch cell loop with the same variant (what one writes
without a fused kernel: lstm_ext.ops.reference_layer_forward, torch ops step by step),
forward + backward, eager and under torch.compile, interleaved in one run.

Targets (issue 13): the variant costs at most 1.3x plain lstm_ext.LSTM, and runs at least 10x
faster than the eager cell loop, at H 256-512. Each row also says how far the GEMM roof
(measured in the same run) lets any implementation get: the variant's % of the roof, and the
loop's time over the time of the row's products at the roof, the most any fused kernel could
be faster than the loop there.

    python benchmarks/bench_variants.py --quick --no-compile   # seconds
    python benchmarks/bench_variants.py --save                 # benchmarks/results/variants-*.md
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import lstm_ext
from lstm_ext import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lstm  # noqa: E402  (the machine's description and the report helpers)

def _keep(shape, p, like):
    """1 / (1 - p) with probability 1 - p, else 0: the module's own draw (on the CPU the
    library's bernoulli_mask, which the loop then gets as fast as the module does)."""
    return ops.bernoulli_mask(shape, 1 - p, 1 / (1 - p), like.dtype, like.device)


def _zones(x, module):
    """Zoneout's d of c and of h, (T * B, H) each, 1 with probability 0.1 and 0.05."""
    rows = x.shape[0] * x.shape[1]
    return [ops.bernoulli_mask((rows, module.hidden_size), z, 1.0, x.dtype, x.device)
            for z in (0.1, 0.05)]


def _weights(module):
    return module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0


def _reference_loop(module, x, weights, **options):
    """ops.reference_layer_forward (torch ops step by step) from zero states."""
    zeros = x.new_zeros(x.shape[1], module.hidden_size)
    output, h, c = ops.reference_layer_forward(x, zeros, zeros, *weights, **options)
    return output, (h, c)


def _weight_drop_loop(module, x):
    w_ih, w_hh, b_ih, b_hh = _weights(module)
    return _reference_loop(module, x, (w_ih, w_hh * _keep(w_hh.shape, 0.3, w_hh), b_ih, b_hh))


def _recurrent_dropout_loop(module, x):
    mask = _keep((x.shape[1], module.hidden_size), 0.25, x)
    return _reference_loop(module, x, _weights(module), recurrent_mask=mask)


def _zoneout_loop(module, x):
    kept = _zones(x, module)
    return _reference_loop(module, x, _weights(module), zoneout_cell=kept[0],
                           zoneout_hidden=kept[1])


def _layer_norm_loop(module, x, zones=None):
    """The LayerNorm LSTM cell in torch ops, step by step (the input products' norm once);
    with zones (the per-row keep masks of c and h, (T * B, H) each), zoneout as well."""
    w_ih, w_hh, b_ih, b_hh = _weights(module)

    def norm(value, part):
        return F.layer_norm(value, value.shape[-1:],
                            getattr(module, f"layer_norm_{part}_weight_l0"),
                            getattr(module, f"layer_norm_{part}_bias_l0"))

    gates_x = norm(x @ w_ih.t(), "ih") + b_ih + b_hh
    h = c = x.new_zeros(x.shape[1], module.hidden_size)
    outputs = []
    for t in range(x.shape[0]):
        i, f, g, o = (gates_x[t] + norm(h @ w_hh.t(), "hh")).chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(norm(c_new, "cell"))
        if zones is not None:
            rows = slice(t * x.shape[1], (t + 1) * x.shape[1])
            d_c, d_h = zones[0][rows], zones[1][rows]
            c_new = d_c * c + (1 - d_c) * c_new
            h_new = d_h * h + (1 - d_h) * h_new
        h, c = h_new, c_new
        outputs.append(h)
    return torch.stack(outputs), (h, c)


def _layer_norm_zoneout_loop(module, x):
    return _layer_norm_loop(module, x, _zones(x, module))


# Each variant: the module's keyword options, and the same computation as a pure-PyTorch cell
# loop of one layer and direction, loop(module, x (T, B, I)) -> (output, (h_n, c_n)), drawing
# any masks as the module does.
VARIANTS = {
    "weight_drop=0.3": ({"weight_drop": 0.3}, _weight_drop_loop),
    "recurrent_dropout=0.25": ({"recurrent_dropout": 0.25}, _recurrent_dropout_loop),
    "zoneout=(0.1,0.05)": ({"zoneout": (0.1, 0.05)}, _zoneout_loop),
    "layer_norm": ({"layer_norm": True}, _layer_norm_loop),
    "layer_norm+zoneout=(0.1,0.05)": ({"layer_norm": True, "zoneout": (0.1, 0.05)},
                                      _layer_norm_zoneout_loop),
}
# (H, B, T), one layer, input size H. At B 32 the loop's per-step products are most of its
# time; at B 4 its per-op overhead is, and at B 1 (online learning) all but a tenth of it.
SHAPES = [(256, 32, 50), (512, 32, 50), (256, 4, 50), (512, 4, 50), (256, 1, 50), (512, 1, 50)]
QUICK_SHAPES = [(64, 8, 10)]
TARGET_COST = 1.3      # variant time / plain time, at most
TARGET_SPEEDUP = 10.0  # eager cell-loop time / variant time, at least
# Without --repeats, a row is timed at least this long in all (every contender's calls, the
# untimed ones too), up to bench_lstm.MAX_REPEATS iterations: with ten, plain H 256 B 4 took
# 3.2-5.4 ms in different rows of one run on an Emerald Rapids, and layer_norm with zoneout
# cost 1.38x there against 1.26x over 100 interleaved iterations.
MIN_TIMED_S = 3.0


def cell_loop(module, loop):
    """The variant's pure-PyTorch cell loop on the module's parameters, as a callable."""
    return lambda x: loop(module, x)


def step(model, x, parameters):
    for parameter in parameters:
        parameter.grad = None
    output, (h, c) = model(x)
    (output.sum() + h.sum()).backward()


def measure(contenders, repeats, warmup, min_timed_s=0.0):
    """Seconds of each contender (name -> zero-argument callable) per iteration, interleaved:
    name -> list of times, `repeats` of them, or more where that many iterations would take
    less than min_timed_s (the warm-up's last iteration tells), up to bench_lstm.MAX_REPEATS.
    Each timed call follows an untimed call of the same contender, in an order shuffled every
    iteration (the same for every run): in a fixed order, the contender after the loop ran
    15-25 % slower at B 1 on a Zen 4 than in its own place, 10 % even after a call of its own,
    which favoured the one after it."""
    times = {name: [] for name in contenders}
    order = random.Random(0)
    iteration = 0
    while iteration < warmup + repeats:
        names = list(contenders)
        order.shuffle(names)
        iteration_start = time.perf_counter()
        for name in names:
            run = contenders[name]
            run()
            start = time.perf_counter()
            run()
            if iteration >= warmup:
                times[name].append(time.perf_counter() - start)
        iteration += 1
        if iteration == warmup:
            repeats = bench_lstm.sized_repeats(repeats, min_timed_s,
                                               time.perf_counter() - iteration_start)
    return times


def training_flops(shape):
    """FLOPs of one layer's forward + backward with input size H and an input that does not
    require grad (bench_lstm.flops: 3x the forward's products, less the input's gradient)."""
    hidden, batch, steps = shape
    return bench_lstm.flops(bench_lstm.Row("training", hidden, batch, steps), batch * steps)


def roof_limits(results, shape, roof_gflops):
    """The variant's fraction of the roof, and the loop's time over the products' time at the
    roof: no kernel doing these FLOPs could be faster than the loop by more than that."""
    at_roof_ms = training_flops(shape) / (roof_gflops * 1e9) * 1e3
    return {"roof_fraction": at_roof_ms / results["variant_ms"],
            "loop_ceiling": results["loop_ms"] / at_roof_ms}


def measure_variant(name, shape, compile_too, repeats, warmup, min_timed_s=0.0):
    options, weights_for = VARIANTS[name]
    hidden, batch, steps = shape
    torch.manual_seed(0)
    plain = lstm_ext.LSTM(hidden, hidden)
    variant = lstm_ext.LSTM(hidden, hidden, **options)
    variant.load_state_dict({**variant.state_dict(), **plain.state_dict()})
    loop = cell_loop(variant, weights_for)
    x = torch.randn(steps, batch, hidden)
    parameters = list(variant.parameters())
    contenders = {
        "plain": lambda: step(plain, x, plain.parameters()),
        "variant": lambda: step(variant, x, parameters),
        "loop": lambda: step(loop, x, parameters),
    }
    if compile_too:
        # Dynamo allows LSTM.forward 8 compiled versions in all (an error with fullgraph=True),
        # and every variant and shape is one more: each starts from empty caches.
        torch._dynamo.reset()
        compiled_variant = torch.compile(variant, fullgraph=True)
        compiled_loop = torch.compile(loop)
        contenders["variant compiled"] = lambda: step(compiled_variant, x, parameters)
        contenders["loop compiled"] = lambda: step(compiled_loop, x, parameters)
    times = measure(contenders, repeats, warmup, min_timed_s)
    result = {key.replace(" ", "_") + "_ms": statistics.median(values) * 1e3
              for key, values in times.items()}
    result["times_ms"] = bench_lstm.times_in_ms(times)
    result["cost"] = bench_lstm.paired_ratio(times, "variant", "plain")
    result["speedup"] = bench_lstm.paired_ratio(times, "loop", "variant")
    if compile_too:
        result["compiled_speedup"] = bench_lstm.paired_ratio(times, "loop compiled",
                                                             "variant compiled")
    result["met"] = result["cost"] <= TARGET_COST and result["speedup"] >= TARGET_SPEEDUP
    return result


def table(rows, machine, command, roof_gflops):
    lines = [f"# lstm_ext variants — {machine.get('device', 'cpu')}", "",
             f"`{command}` on {machine['date']}: torch {machine['torch']}, "
             f"{machine['threads']} threads. Forward + backward of one layer (input size H), "
             f"interleaved; times are medians, and each ratio is the median of the ratios of "
             f"back-to-back runs. cost = variant / plain lstm_ext.LSTM (target ≤ "
             f"{TARGET_COST}); speedup = eager pure-PyTorch cell loop / variant (target ≥ "
             f"{TARGET_SPEEDUP:g}); compiled speedup = both under torch.compile. roof = the "
             f"variant's FLOP/s (fwd+bwd products, bench_lstm.flops) as a share of the fp32 GEMM "
             f"roof measured in this run ({roof_gflops:.0f} GFLOP/s); ceiling = loop time / the "
             f"time of the same products at that roof, the most any kernel could be faster "
             f"than the loop (rows whose ceiling is below {TARGET_SPEEDUP:g} cannot meet the "
             f"speedup target on this machine).",
             bench_lstm.cpu_line(machine), "",
             "| variant | H | B | T | plain ms | variant ms | loop ms | cost | speedup | "
             "compiled speedup | roof | ceiling | met |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for row in rows:
        r = row["results"]
        compiled = f"{r['compiled_speedup']:.1f}" if "compiled_speedup" in r else ""
        lines.append(
            f"| {row['variant']} | {row['hidden']} | {row['batch']} | {row['steps']} | "
            f"{r['plain_ms']:.2f} | {r['variant_ms']:.2f} | {r['loop_ms']:.2f} | "
            f"{r['cost']:.2f} | {r['speedup']:.1f} | {compiled} | "
            f"{r['roof_fraction']:.0%} | {r['loop_ceiling']:.1f} | "
            f"{'yes' if r['met'] else 'no'} |")
    reachable = sum(row["results"]["loop_ceiling"] >= TARGET_SPEEDUP for row in rows)
    lines += ["", f"{reachable} of {len(rows)} rows have a ceiling of at least "
              f"{TARGET_SPEEDUP:g}x here."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, seconds")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile columns (compiling the loop takes minutes)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="iterations per row (default: 10, or more where a row would run "
                             f"less than {MIN_TIMED_S:g} s, up to {bench_lstm.MAX_REPEATS})")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--save", action="store_true",
                        help="write JSON and markdown to benchmarks/results/variants-<cpu>.*")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 10)
    # A given --repeats (or --quick) is the count; otherwise at least MIN_TIMED_S per row.
    min_timed_s = 0.0 if args.repeats or args.quick else MIN_TIMED_S
    machine = bench_lstm.machine_details(torch.device("cpu"))
    command = "python benchmarks/bench_variants.py " + " ".join(argv or sys.argv[1:])
    rows = []
    roofs = {}
    roof_of = bench_lstm.roof_keeper(
        lambda dtype: bench_lstm.gemm_roof(dtype, torch.device("cpu")), roofs)
    for name in VARIANTS:
        for hidden, batch, steps in QUICK_SHAPES if args.quick else SHAPES:
            results = measure_variant(name, (hidden, batch, steps), args.compile, repeats,
                                      warmup=2, min_timed_s=min_timed_s)
            # The roof again (keeping the better) wherever a row runs faster than it.
            gflops = training_flops((hidden, batch, steps)) / results["variant_ms"] / 1e6
            roof_of(bench_lstm.Row("training", hidden, batch, steps,
                                   results={"ours_gflops": gflops}))
            rows.append({"variant": name, "hidden": hidden, "batch": batch, "steps": steps,
                         "results": results})
            print(f"{name} H{hidden} B{batch} T{steps}: cost {results['cost']:.2f}, speedup "
                  f"{results['speedup']:.1f}", flush=True)
    roof_gflops = roofs[torch.float32]
    for row in rows:
        row["results"].update(roof_limits(row["results"], (row["hidden"], row["batch"],
                                                           row["steps"]), roof_gflops))
    report = table(rows, machine, command.strip(), roof_gflops)
    print(report)
    paths = {"json": args.json, "markdown": args.markdown}
    if args.save:
        base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            "variants-" + bench_lstm.result_name(machine))
        paths = {"json": base + ".json", "markdown": base + ".md"}
    if paths["json"]:
        bench_lstm.write_atomically(paths["json"], json.dumps(
            {"machine": machine, "command": command, "roof_gflops": roof_gflops, "rows": rows},
            indent=1))
    if paths["markdown"]:
        bench_lstm.write_atomically(paths["markdown"], report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
