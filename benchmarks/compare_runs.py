"""Compare language-model runs of `lstm-ext train` (e.g. --impl ext against --impl torch):
validation loss over wall-clock time, training speed, and how long each took to reach a loss.

    python benchmarks/compare_runs.py runs/shakespeare-ext runs/shakespeare-torch \
        --target-loss 1.50 --markdown out.md --png out.png

The first run is the one the ratios are about: `tokens/s ratio` is its training speed over each
other run's, `time ratio` is each other run's time to reach the target over its own.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path


def load_history(folder):
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {folder} an `lstm-ext train --out` "
                                f"folder?)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no evaluation yet")
    return records


def time_to_reach(history, loss):
    """Seconds of training until the first evaluation at or below `loss` (None if never)."""
    for record in history:
        if record["valid_loss"] <= loss:
            return record["elapsed_s"]
    return None


def summarize(folder, history, target):
    # The first window's rate includes start-up; the median of the rest is the steady speed.
    rates = [r["tokens_per_s"] for r in history[1:]] or [history[0]["tokens_per_s"]]
    return {"run": str(folder), "steps": history[-1]["step"],
            "minutes": history[-1]["elapsed_s"] / 60,
            "final_valid_loss": history[-1]["valid_loss"],
            "best_valid_loss": min(r["valid_loss"] for r in history),
            "tokens_per_s": statistics.median(rates),
            "reached_target_s": None if target is None else time_to_reach(history, target)}


def markdown(rows, target):
    head = rows[0]
    lines = ["| run | steps | minutes | final valid loss | best valid loss | tokens/s | "
             "tokens/s ratio | " + (f"time to ≤ {target:.2f} | time ratio |" if target else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if target else "")]
    for row in rows:
        cells = [row["run"], str(row["steps"]), f"{row['minutes']:.1f}",
                 f"{row['final_valid_loss']:.4f}", f"{row['best_valid_loss']:.4f}",
                 f"{row['tokens_per_s']:.0f}", f"{head['tokens_per_s'] / row['tokens_per_s']:.2f}"]
        if target:
            reached, own = row["reached_target_s"], head["reached_target_s"]
            cells.append("never" if reached is None else f"{reached / 60:.1f} min")
            cells.append(f"{reached / own:.2f}" if reached and own else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(histories, path, target):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for folder, history in histories:
        axes.plot([r["elapsed_s"] / 60 for r in history], [r["valid_loss"] for r in history],
                  marker=".", label=Path(folder).name)
    if target:
        axes.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"{target:.2f}")
    axes.set_xlabel("minutes of training")
    axes.set_ylabel("validation loss (nats per token)")
    axes.set_ylim(top=min(3.0, max(r["valid_loss"] for _, h in histories for r in h)))
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="`lstm-ext train --out` folders")
    parser.add_argument("--target-loss", type=float, default=None)
    parser.add_argument("--markdown", default=None, help="also write the table here")
    parser.add_argument("--png", default=None, help="plot validation loss over minutes here")
    args = parser.parse_args(argv)
    try:
        histories = [(folder, load_history(folder)) for folder in args.runs]
    except (FileNotFoundError, ValueError) as error:
        print(f"compare_runs: error: {error}", file=sys.stderr)
        return 2
    rows = [summarize(folder, history, args.target_loss) for folder, history in histories]
    table = markdown(rows, args.target_loss)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.png:
        plot(histories, args.png, args.target_loss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
