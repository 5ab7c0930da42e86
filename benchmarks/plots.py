"""One plot per benchmark from benchmarks/results/*.csv, written by benchmarks/report.py next to the CSVs
(<bench>.png, matplotlib's Agg backend): ours against the baselines across the recorded runs (commits), or across
the measured shapes where a benchmark has a single run."""
from __future__ import annotations

import collections
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import report  # noqa: E402  (runs_of, variant_order)
import results  # noqa: E402

MARKERS = "os^Dv<>Pp*hX"
STYLES: dict[str, dict] = {}  # series name -> colour and marker, the same in every panel of a figure


def style(name: str) -> dict:
    if name not in STYLES:
        i = len(STYLES)
        STYLES[name] = {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)]}
    return STYLES[name]


def num(cell: str) -> float:
    return float(cell) if cell else math.nan


def main_shape(runs: list[list[dict]], keys: tuple[str, ...]) -> list[list[dict]]:
    """The runs of the most common setting of `keys` (other shapes would make the line jump, not the code)."""
    shape = lambda run: tuple(run[0][k] for k in keys)  # noqa: E731
    usual = collections.Counter(shape(run) for run in runs).most_common(1)[0][0]
    return [run for run in runs if shape(run) == usual]


def plot_runs(ax, runs: list[list[dict]], series) -> None:
    """One line per series (`series(row)`, None = left out): x = runs in recorded order, labelled by commit;
    y = tokens/s (median; a vertical bar spans the slowest–fastest round where recorded)."""
    rows = [r for run in runs for r in run if series(r)]
    names = sorted(dict.fromkeys(series(r) for r in rows), key=report.variant_rank)
    for name in names:
        by_run = [next((r for r in run if series(r) == name), None) for run in runs]
        ys = [num(r["tokens_per_s"]) if r else math.nan for r in by_run]
        ax.plot(range(len(runs)), ys, markersize=4, linewidth=1, label=name, **style(name))
        for x, r in enumerate(by_run):
            if r and r.get("tokens_per_s_min"):
                ax.vlines(x, num(r["tokens_per_s_min"]), num(r["tokens_per_s_max"]), color=style(name)["color"],
                          linewidth=2, alpha=0.5)
    ax.set_xticks(range(len(runs)), [run[0]["commit"] for run in runs], rotation=90, fontsize=7)
    ax.set_xlim(-0.7, len(runs) - 0.3)
    ax.grid(True, alpha=0.3)
    ax.set_ylabel("tokens/s")


def figure(**kwargs):
    STYLES.clear()  # each figure assigns its own colours, in the order its series appear
    return plt.subplots(**kwargs)


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: same rows, same bytes
    plt.close(fig)
    return path


def plot_bench_moe(rows: list[dict], path: Path) -> Path:
    """A panel per machine: ours and the naive loop per run, kt-kernel's field notes on that machine (dashed)."""
    shape = ("isa", "experts", "topk", "hidden", "intermediate", "tokens", "routing", "evict_mb")
    panels = []
    by_cores = sorted(dict.fromkeys((-int(r["cores"]), report.machine(r)) for r in rows), key=lambda m: m[0])
    for _, name in by_cores:
        mine = [r for r in rows if report.machine(r) == name]
        runs = [run for run in report.runs_of([r for r in mine if r["commit"] != "n/a"])
                if any(r["tokens_per_s"] or r["tokens_per_s_min"] for r in run)]  # ratio-only runs: no point
        if runs:
            panels.append((name, main_shape(runs, shape), [r for r in mine if r["commit"] == "n/a"]))
    fig, axes = figure(nrows=1, ncols=len(panels), figsize=(15, 6.5), squeeze=False,
                             gridspec_kw={"width_ratios": [max(8, len(runs)) for _, runs, _ in panels]})
    for ax, (name, runs, notes) in zip(axes[0], panels):
        plot_runs(ax, runs, lambda r: None if r["variant"].startswith("against") else r["variant"])
        for r in (r for r in notes if r["variant"] != "naive"):
            ax.axhline(num(r["tokens_per_s"]), linestyle="--", linewidth=1, label=f"{r['variant']} (field notes)",
                       color=style(r["variant"])["color"])
        first = runs[0][0]
        ax.set_title(f"{name.replace(' + ', chr(10))}\nisa={first['isa']} T={first['tokens']}\nE={first['experts']} "
                     f"k={first['topk']} H={first['hidden']} I={first['intermediate']}", fontsize=8)
    legend = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=4, fontsize=8)  # one style per series
    fig.suptitle("bench_moe: one MoE layer, forward + backward, per recorded run (x: kt-sft commit)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return save(fig, path)


def plot_bench_e2e(rows: list[dict], path: Path) -> Path:
    """Every end-to-end run: ours (CPU engine, or with the GPU share F) and stock, log scale."""
    runs = main_shape(report.runs_of(rows), ("layers", "batch", "seq"))
    fig, ax = figure(figsize=(12, 5))
    share = lambda r: r["variant"] + (f", GPU share {r['gpu_experts']}"  # noqa: E731  (a fraction or "auto")
                                      if not r["variant"].startswith("stock") and r["gpu_experts"] not in ("", "0")
                                      else "")
    plot_runs(ax, runs, share)
    ax.set_yscale("log")
    first = runs[0][0]
    ax.set_title(f"bench_e2e: LoRA training tokens/s, DeepSeek-V2-Lite shape ({first['layers']} layers, batch "
                 f"{first['batch']} x {first['seq']} tokens), per recorded run (x: kt-sft commit)", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return save(fig, path)


def plot_bench_decode(rows: list[dict], path: Path) -> Path:
    """The latest run: prefill and decode at each batch, ours against stock (bars, log scale)."""
    run = report.runs_of(rows)[-1]
    labels = list(dict.fromkeys(f"{r['phase']}\nbatch {r['batch']}" for r in run))
    variants = list(dict.fromkeys(r["variant"] for r in run))
    fig, ax = figure(figsize=(8, 4.5))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        cell = {f"{r['phase']}\nbatch {r['batch']}": num(r["tokens_per_s"]) for r in run if r["variant"] == variant}
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, [cell.get(label, math.nan) for label in labels], width, label=variant)
        ax.bar_label(bars, fmt="{:,.1f}", fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s")
    ax.grid(True, axis="y", alpha=0.3)
    first = run[0]
    ax.set_title(f"bench_decode: {first['layers']}-layer V2-Lite shape, prompt {first['prompt']}\n"
                 f"{report.machine(first)}, commit {first['commit']}, {first['date'][:10]}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


PLOTS = {"bench_moe": plot_bench_moe, "bench_e2e": plot_bench_e2e, "bench_decode": plot_bench_decode}


def write_all(results_dir: Path = results.RESULTS_DIR) -> list[Path]:
    written = []
    for bench, plot in PLOTS.items():
        rows = results.read_rows(bench, results_dir)
        if rows:
            written.append(plot(rows, Path(results_dir) / f"{bench}.png"))
    return written
