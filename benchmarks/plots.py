"""The figures of BENCHMARKS.md, drawn from the benchmarks' ``--json`` output.

    python benchmarks/plots.py --delay delay.json --priority priority.json \
        --publish publish.json [--out docs/img]

Writes ``lateness-cdf.png`` (bench_delay.py), ``high-latency.png`` (bench_priority.py) and
``throughput-vs-batch.png`` (bench_publish.py); each input is optional.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def lateness_cdf(report: dict[str, Any], out: Path) -> Path:
    """Lateness CDF per run: the body from the half-percentiles, the last 1 % in full."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, runs in report["lateness"].items():
        for i, run in enumerate(runs):
            q = np.array(run["quantiles"][:199]) * 1000  # up to p99
            tail = np.array(run["tail"]) * 1000
            xs = np.concatenate([q, tail])
            ys = np.concatenate([np.arange(199) / 200,
                                 0.99 + 0.01 * np.arange(1, len(tail) + 1) / len(tail)])
            ax.plot(xs, ys, lw=1.2, label=f"{name}, run {i + 1}" if len(runs) > 1 else name)
    ax.axvline(100, color="grey", ls="--", lw=0.8)
    ax.text(101, 0.05, "p99 target 100 ms", color="grey", fontsize=8)
    ax.axhline(0.99, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("lateness: arrival at a read_committed consumer - due time (ms)")
    ax.set_ylabel("share of messages")
    ax.set_ylim(0, 1.0)
    ax.set_xlim(left=0)
    ax.set_title("Delayed delivery at 2,000 msg/s, delays 0.5-10 s (bench_delay.py)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, out / "lateness-cdf.png")


def high_latency(report: dict[str, Any], out: Path) -> Path:
    """HIGH publish latency CDF, unloaded and under a NORMAL flood, per niceness."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"unloaded": "-", "flood": "--"}
    for i, (variant, by_load) in enumerate(report["latencies_ms"].items()):
        for load, runs in by_load.items():
            xs = np.sort(np.concatenate([np.array(r) for r in runs]))
            ys = np.arange(1, len(xs) + 1) / len(xs)
            ax.plot(xs, ys, styles[load], color=f"C{i}", lw=1.2,
                    label=f"{variant}, {'under flood' if load == 'flood' else load}")
    ax.set_xscale("log")
    # plain millisecond labels at chosen ticks (the log axis' own minor labels overlap)
    ticks = [t for t in (1, 2, 3, 5, 10, 20, 50, 100, 200, 500)
             if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axhline(0.99, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("HIGH publish latency, ray.get(handle.publish.remote(...)) (ms, log)")
    ax.set_ylabel("share of publishes")
    ax.set_title("HIGH lane while NORMAL floods, all runs pooled (bench_priority.py)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out / "high-latency.png")


def throughput_vs_batch(report: dict[str, Any], out: Path) -> Path:
    """publish_batch throughput against batch size (median and per-run range), with the
    in-process aiokafka baselines of the same runs."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    sizes = sorted(int(s) for s in report["curve"])
    med = [float(np.median(report["curve"][str(s)])) for s in sizes]
    lo = [min(report["curve"][str(s)]) for s in sizes]
    hi = [max(report["curve"][str(s)]) for s in sizes]
    ax.plot(sizes, med, "o-", label=f"athomic publish_batch, {report['in_flight']} in flight")
    ax.fill_between(sizes, lo, hi, alpha=0.2)
    runs = report["runs"]
    for name, label, style in [("aiokafka_batch", "aiokafka send(), batches of 1,000", "--"),
                               ("aiokafka_record_batch",
                                "aiokafka send_batch(), batches of 1,000", ":")]:
        if runs.get(name):
            ax.axhline(float(np.median(runs[name])), ls=style, color="grey", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("messages per publish_batch call (log)")
    ax.set_ylabel("msg/s (1 KiB JSON, acks=all, idempotent)")
    ax.set_title("Publishing throughput against batch size (bench_publish.py)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out / "throughput-vs-batch.png")


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delay", help="bench_delay.py --json output")
    parser.add_argument("--priority", help="bench_priority.py --json output")
    parser.add_argument("--publish", help="bench_publish.py --json output")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = parser.parse_args()
    out = Path(args.out)
    for source, draw in [(args.delay, lateness_cdf), (args.priority, high_latency),
                         (args.publish, throughput_vs_batch)]:
        if source:
            report = json.loads(Path(source).read_text())
            if draw is lateness_cdf and "lateness" not in report:
                continue
            print(f"wrote {draw(report, out)}")


if __name__ == "__main__":
    main()
