"""Benchmark results as data: one CSV per benchmark under benchmarks/results/, one row per measured variant.

Every row carries where and how it was measured (run id, UTC date, kt-sft commit, CPU model and physical cores,
GPU, engine ISA and threads, the exact command), the run's settings (the shape and options: the same on every row
of one run), then what that variant measured, and last the ratio the script prints for it (`ratio`, named by
`ratio_of`, e.g. "ours/naive") and a free-text note. The columns of each benchmark are fixed here, so rows from
any checkout append to the same file; benchmarks/report.py renders BENCHMARKS.md's tables and plots from them.

The scripts record only when asked (`--record`: append to `--results-dir`, default benchmarks/results/), so a
casual or smoke run never touches the committed history; `--json` prints each row as one JSON line on stdout and
sends the human report to stderr. On the device, whose copy of the tree has no .git, pass the commit in
KT_SFT_COMMIT and `--record --results-dir $OUT`, then here `python benchmarks/report.py --add <that csv>`.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
PROVENANCE = ("run", "date", "commit", "cpu", "cores", "gpu", "isa", "threads", "command")
TRAILER = ("ratio", "ratio_of", "note")
# Columns holding text; every other column holds a number (or is empty).
TEXT_COLUMNS = {"run", "date", "commit", "cpu", "gpu", "isa", "command", "variant", "routing", "phase", "ratio_of",
                "note", "phases_ms", "shape", "pass", "binding"}


@dataclass(frozen=True)
class Schema:
    config: tuple[str, ...]  # the run's settings: the same on every row of one run
    fields: tuple[str, ...]  # what one variant measured

    @property
    def columns(self) -> tuple[str, ...]:
        return PROVENANCE + self.config + ("variant",) + self.fields + TRAILER


SPREAD = ("tokens_per_s", "tokens_per_s_min", "tokens_per_s_max")  # p50, then the slowest and fastest iteration
SCHEMAS = {
    "bench_moe": Schema(
        config=("experts", "topk", "hidden", "intermediate", "tokens", "routing", "evict_mb", "iters"),
        fields=("fwd_ms", "bwd_ms", *SPREAD, "err_y", "err_dx", "weight_gib", "phases_ms")),
    "bench_e2e": Schema(
        config=("layers", "batch", "seq", "lora_rank", "gpu_experts", "steps"),
        fields=(*SPREAD, "step_ms", "gpu_compute_ms", "gpu_copy_ms", "gpu_idle", "cpu_experts_ms", "peak_gpu_gb",
                "peak_rss_gb", "load_s", "loss_first", "loss_last", "loss_diff", "phases_ms")),
    # bench_e2e.py --family deepseek_v3: one row per expert format; cpu_experts_ms and phases_ms per MoE layer,
    # layer times per layer (forward + backward), projected_* for the whole 61-layer model.
    "bench_e2e_v3": Schema(
        config=("layers", "moe_layers", "batch", "seq", "lora_rank", "gpu_experts", "steps", "checkpoint_gb"),
        fields=(*SPREAD, "step_ms", "load_s", "load_gb_per_s", "moe_layer_ms", "dense_layer_ms", "rest_ms",
                "cpu_experts_ms", "peak_gpu_gb", "peak_rss_gb", "projected_tokens_per_s", "projected_gpu_gb",
                "projected_rss_gb", "loss_first", "loss_last", "phases_ms")),
    # bench_moe.py --shapes: one row per (shape, T, variant), beside this host's ceilings measured in the same run
    # (benchmarks/host_ceiling.py); pct_ceiling = 100 x floor_ms / the measured time, binding = which ceiling sets
    # the floor (compute or bandwidth); experts_run / tokens_run < experts / tokens: a subset (moe_shapes.Plan).
    "bench_moe_shapes": Schema(
        config=("bf16_ceiling_tflops", "int8_ceiling_tflops", "bandwidth_gbs"),
        fields=("shape", "experts", "topk", "hidden", "intermediate", "tokens", "experts_run", "tokens_run", "pass",
                "iters", "fwd_ms", "bwd_ms", *SPREAD, "achieved_tflops", "ceiling_tflops", "floor_ms",
                "pct_ceiling", "binding", "phases_ms")),
    "bench_decode": Schema(
        config=("layers", "prompt", "new_tokens"),
        fields=("phase", "batch", "tokens_per_s", "experts_share")),
    "bench_decode_layer": Schema(
        config=("experts", "topk", "hidden", "intermediate", "iters"),
        fields=("tokens", "experts_read", "engine_us", "gb_per_s", "from_cuda_us")),
    "bench_load": Schema(
        config=("layers", "seq", "steps"),
        fields=("load_s", "rss_before_gb", "peak_rss_gb", "rss_bound_gb", "gpu_after_load_gb", "gpu_peak_gb",
                "tokens_per_s", "saved_activation_gb", "loss", "checkpoint_gb", "load_gb_per_s")),
    # bench_load.py --profile: one expert tensor at a time, per source -> format pair (the variant).
    "bench_load_tensors": Schema(
        config=("iters",),
        fields=("rows", "cols", "read_ms", "decode_ms", "pack_ms", "tensor_ms", "gb_per_s")),
    # Written by hand from the C++ probe's output (it prints TFLOPS per variant; it has no recorder).
    "amx_gemm_probe": Schema(config=("rounds",), fields=("gate_up_tflops", "down_tflops")),
    # benchmarks/device_llamafactory.sh and `make demo`: the embedded demo through llamafactory-cli.
    "llamafactory_demo": Schema(config=("steps", "batch"),
                                fields=("train_runtime_s", "wall_s", "loss_first", "loss_last")),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("results (benchmarks/results.py)")
    g.add_argument("--json", action="store_true",
                   help="print each result row as one JSON line on stdout; the human report goes to stderr")
    g.add_argument("--record", action="store_true", help="append the rows to <results-dir>/<benchmark>.csv")
    g.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="default: benchmarks/results/")


def human_output(args: argparse.Namespace):
    """The human report: stdout, or stderr under --json (stdout then carries the JSON rows only)."""
    return contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()


def commit() -> str:
    """KT_SFT_COMMIT if set (the device's copy of the tree has no .git), else git's short HEAD, "+dirty" with
    uncommitted changes to tracked files; "unknown" without either."""
    if os.environ.get("KT_SFT_COMMIT"):
        return os.environ["KT_SFT_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "") if head else "unknown"


def cpu_model_and_cores() -> tuple[str, int]:
    """The CPU's model name and physical cores (distinct physical id / core id pairs) from /proc/cpuinfo."""
    model, cores, physical = "unknown", set(), "0"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and model == "unknown":
                model = value
            elif key == "physical id":
                physical = value
            elif key == "core id":
                cores.add((physical, value))
    return model, len(cores) or os.cpu_count() or 0


def gpu_name() -> str:
    """The GPUs' names from nvidia-smi (asked outside this process: no CUDA context here), "" without one."""
    if shutil.which("nvidia-smi") is None:
        return ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    names = [n.strip() for n in out.splitlines() if n.strip()]
    return "" if not names else names[0] if len(names) == 1 else f"{len(names)}x {names[0]}"


def command(argv: list[str] | None = None) -> str:
    """The command line that reproduces the run: KT_SFT_* settings, the script, its arguments minus the
    recording flags (they change where rows go, not what is measured)."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    args, skip = [], False
    for arg in argv[1:]:
        if skip or arg in ("--json", "--record") or arg.startswith("--results-dir"):
            skip = arg == "--results-dir"
            continue
        args.append(arg)
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("KT_SFT_") and k != "KT_SFT_COMMIT"]
    rel = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return shlex.join([*env, "python", str(rel), *args])


def provenance(isa: str = "", threads: int | str = "", gpu: str | None = None) -> dict:
    """The provenance columns of one run (one call per run: every row of it shares the run id and date)."""
    cpu, cores = cpu_model_and_cores()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"run": uuid.uuid4().hex[:8], "date": date, "commit": commit(), "cpu": cpu, "cores": cores,
            "gpu": gpu_name() if gpu is None else gpu, "isa": isa, "threads": threads, "command": command()}


def spread(tokens: int, seconds: list[float]) -> dict:
    """tokens/s of the median, slowest and fastest of the timed iterations."""
    return {"tokens_per_s": tokens / statistics.median(seconds), "tokens_per_s_min": tokens / max(seconds),
            "tokens_per_s_max": tokens / min(seconds)}


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return format(value, ".6g")
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def check_row(bench: str, row: dict) -> dict:
    """`row` with every column of `bench` (missing ones empty), as CSV text; unknown columns are an error."""
    columns = SCHEMAS[bench].columns
    unknown = sorted(set(row) - set(columns))
    if unknown:
        raise KeyError(f"{bench}: no column {', '.join(unknown)} in benchmarks/results.py SCHEMAS "
                       f"(columns: {', '.join(columns)})")
    return {c: _cell(row.get(c)) for c in columns}


def append_rows(bench: str, rows: list[dict], results_dir: Path = RESULTS_DIR) -> Path:
    """Append `rows` to <results_dir>/<bench>.csv (header written once; an existing file must have the schema's
    columns, or appending would misalign them)."""
    columns = SCHEMAS[bench].columns
    path = Path(results_dir) / f"{bench}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        with path.open(newline="") as f:
            header = tuple(next(csv.reader(f), ()))
        if header != columns:
            raise ValueError(f"{path}: columns {header} differ from the schema in benchmarks/results.py "
                             f"{columns}; convert the file before appending")
        new = False
    else:
        new = True
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerows(check_row(bench, r) for r in rows)
    return path


def read_rows(bench: str, results_dir: Path = RESULTS_DIR) -> list[dict]:
    """The rows of <results_dir>/<bench>.csv as text (empty list without the file)."""
    path = Path(results_dir) / f"{bench}.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def emit(bench: str, rows: list[dict], args: argparse.Namespace) -> None:
    """The rows of one run: JSON lines on stdout under --json, appended to the results CSV under --record."""
    checked = [check_row(bench, r) for r in rows]
    if args.json:
        for row in rows:
            print(json.dumps({"bench": bench, **{k: v for k, v in row.items() if v is not None}}), flush=True)
    if args.record and checked:
        path = append_rows(bench, rows, args.results_dir)
        print(f"recorded {len(checked)} rows in {path}", file=sys.stderr)
