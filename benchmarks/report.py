"""BENCHMARKS.md's tables and plots, generated from the rows in benchmarks/results/*.csv (benchmarks/results.py).

    python benchmarks/report.py                 # rewrite the tables between BENCHMARKS.md's markers + the plots
    python benchmarks/report.py --check         # exit 1 when BENCHMARKS.md's tables differ from the rows
    python benchmarks/report.py --add FILE...   # first append rows recorded elsewhere (the device's --record
                                                # CSVs, or --json lines), skipping runs already present

A table is a marker pair in BENCHMARKS.md; everything between the two is generated:

    <!-- table:BENCH [layout=runs|rows] [value=COL[/COL]] [last=N] [FILTER ...] -->
    <!-- /table -->

FILTER keeps the rows where a column equals (`col=v`), differs from (`col!=v`), contains (`col~v`) or lacks
(`col!~v`) a value; quote values with spaces. layout=runs (default) gives one line per run with one column per
variant (cell: `value`, default tokens/s; the median, or the slowest–fastest range when only that is known), the
run's printed ratios and notes; layout=rows gives one line per row with the benchmark's measured fields. Machine,
date, commit, command and settings go into the table's caption when the same for every run, else into columns
(machines and commands as keys explained in the caption; settings only where a run differs from the most common).
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import re
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402  (the row schemas)

DOC = results.REPO / "BENCHMARKS.md"
MARKER = re.compile(r"(<!-- table:(?P<spec>[^\n]*?) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)
FILTER = re.compile(r"^(\w+)(!=|!~|=|~)(.*)$")
NUMBER = re.compile(r"[\d,.e+\-–/ ]+")  # right-aligned: numbers, ranges (a–b) and pairs (a / b)
# layout=rows: what each benchmark shows per row (column, header, format). Computed ones: "spread" = slowest–fastest
# tokens/s, "tflops" = forward / backward TFLOPS of bench_moe (each pass does 6·T·k·H·I flops).
FIELDS = {
    "bench_moe": [("fwd_ms", "fwd ms", ".1f"), ("bwd_ms", "bwd ms", ".1f"), ("tflops", "TF/s fwd / bwd", ".2f"),
                  ("tokens_per_s", "tokens/s", ",.0f"),
                  ("spread", "tokens/s range", ",.0f"), ("err_y", "rel err y", ".1e"), ("weight_gib", "GiB", ".2f")],
    "bench_e2e": [("tokens_per_s", "tokens/s", ",.0f"), ("step_ms", "step ms", ",.0f"),
                  ("gpu_compute_ms", "GPU compute ms", ",.0f"), ("gpu_copy_ms", "copies ms", ",.0f"),
                  ("cpu_experts_ms", "CPU experts ms", ",.0f"), ("gpu_idle", "GPU idle %", "%"),
                  ("peak_gpu_gb", "peak GPU GB", ".2f"), ("peak_rss_gb", "peak RSS GB", ".1f"),
                  ("loss_first", "loss step 1", ".4f")],
    "bench_e2e_v3": [("load_s", "load s", ".1f"), ("load_gb_per_s", "load GB/s", ".2f"),
                     ("tokens_per_s", "tokens/s", ",.0f"), ("step_ms", "step ms", ",.0f"),
                     ("moe_layer_ms", "ms per MoE layer", ",.0f"), ("dense_layer_ms", "ms per dense layer", ",.0f"),
                     ("cpu_experts_ms", "CPU experts ms per MoE layer", ",.0f"),
                     ("projected_tokens_per_s", "61 layers tokens/s (projected)", ",.1f"),
                     ("peak_gpu_gb", "peak GPU GB", ".2f"), ("peak_rss_gb", "peak RSS GB", ".1f"),
                     ("projected_gpu_gb", "61 layers GPU GB", ".0f"), ("projected_rss_gb", "61 layers RAM GB", ".0f"),
                     ("loss_first", "loss step 1", ".4f")],
    "bench_moe_shapes": [("shape", "shape", ""), ("tokens", "T", ".0f"), ("pass", "pass", ""),
                         ("fwd_ms", "fwd ms", ",.1f"), ("bwd_ms", "bwd ms", ",.1f"),
                         ("tokens_per_s", "tokens/s", ",.0f"),
                         ("achieved_tflops", "TF/s", ".2f"), ("ceiling_tflops", "ceiling TF/s", ".2f"),
                         ("floor_ms", "floor ms", ",.1f"), ("pct_ceiling", "% of floor", ".0f"),
                         ("binding", "binds", "")],
    "bench_decode": [("phase", "phase", ""), ("batch", "batch", ".0f"), ("tokens_per_s", "tokens/s", ",.1f"),
                     ("experts_share", "in experts calls", "%")],
    "bench_decode_layer": [("tokens", "T", ".0f"), ("experts_read", "experts read", ".0f"),
                           ("engine_us", "engine µs", ",.0f"), ("gb_per_s", "GB/s", ".0f"),
                           ("from_cuda_us", "from CUDA tensors µs", ",.0f")],
    "bench_load": [("load_s", "load s", ".1f"), ("rss_before_gb", "RSS before GB", ".1f"),
                   ("peak_rss_gb", "peak RSS GB", ".1f"), ("rss_bound_gb", "RSS bound GB", ".1f"),
                   ("gpu_after_load_gb", "GPU after load GB", ".2f"), ("gpu_peak_gb", "GPU peak GB", ".2f"),
                   ("tokens_per_s", "train tokens/s", ",.0f"), ("saved_activation_gb", "saved activations GB", ".2f")],
    "bench_load_tensors": [("rows", "rows", ".0f"), ("cols", "cols", ".0f"), ("read_ms", "read ms", ".2f"),
                           ("decode_ms", "decode ms", ".2f"), ("pack_ms", "pack ms", ".2f"),
                           ("tensor_ms", "whole ms", ".2f"), ("gb_per_s", "GB/s", ".2f")],
    "amx_gemm_probe": [("gate_up_tflops", "gate_up TFLOPS", ".2f"), ("down_tflops", "down TFLOPS", ".2f")],
    "llamafactory_demo": [("train_runtime_s", "train_runtime s", ".1f"), ("wall_s", "wall s", ".0f"),
                          ("loss_first", "first loss", ".2f"), ("loss_last", "last loss", ".2f")],
}
FORMATS = {col: fmt for fields in FIELDS.values() for col, _, fmt in fields}


def fmt(value: str, spec: str) -> str:
    if value == "" or not spec:
        return value
    number = float(value)
    return f"{number * 100:.1f}" if spec == "%" else format(number, spec)


def machine(row: dict) -> str:
    return f"{row['cpu']}, {row['cores']} cores" + (f" + {row['gpu']}" if row["gpu"] else "")


def keep(row: dict, filters: list[tuple[str, str, str]]) -> bool:
    for col, op, value in filters:
        cell = row.get(col, "")
        ok = {"=": cell == value, "!=": cell != value, "~": value in cell, "!~": value not in cell}[op]
        if not ok:
            return False
    return True


def parse_spec(spec: str) -> tuple[str, dict, list]:
    """`BENCH key=value ...` into the benchmark, the options (layout, value, last) and the row filters."""
    bench, *terms = shlex.split(spec)
    if bench not in results.SCHEMAS:
        raise SystemExit(f"BENCHMARKS.md: table marker names an unknown benchmark {bench!r} "
                         f"(known: {', '.join(results.SCHEMAS)})")
    options, filters = {"layout": "runs", "value": "tokens_per_s", "last": "0"}, []
    for term in terms:
        m = FILTER.match(term)
        if m is None:
            raise SystemExit(f"BENCHMARKS.md: table:{spec}: {term!r} is not an option or a filter (col=v, col!=v, "
                             "col~v, col!~v)")
        if m.group(1) in options and m.group(2) == "=":
            options[m.group(1)] = m.group(3)
        elif m.group(1) in results.SCHEMAS[bench].columns:
            filters.append(m.groups())
        else:
            raise SystemExit(f"BENCHMARKS.md: table:{spec}: {bench} has no column {m.group(1)!r}")
    return bench, options, filters


def runs_of(rows: list[dict]) -> list[list[dict]]:
    """Rows grouped by run id, runs in the order of their first row."""
    grouped = collections.OrderedDict()
    for row in rows:
        grouped.setdefault(row["run"], []).append(row)
    return list(grouped.values())


def keyed(values: list[str], prefix: str) -> dict[str, str]:
    """Distinct values in order of appearance -> keys M1, M2... (or C1, C2...)."""
    return {v: f"{prefix}{i + 1}" for i, v in enumerate(dict.fromkeys(values))}


class Provenance:
    """Which of machine / date / commit / command / settings a table shows per run and which in its caption."""

    def __init__(self, bench: str, runs: list[list[dict]]) -> None:
        firsts = [run[0] for run in runs]
        self.machines = keyed([machine(r) for r in firsts], "M")
        self.commands = keyed([r["command"] for r in firsts], "C")
        self.dates = list(dict.fromkeys(r["date"][:10] for r in firsts))
        self.commits = list(dict.fromkeys(r["commit"] for r in firsts))
        settings = ("isa", "threads", *results.SCHEMAS[bench].config)
        self.usual = {k: collections.Counter(r[k] for r in firsts).most_common(1)[0][0] for k in settings}
        self.deviating = any(self.settings(r) for r in firsts)

    def settings(self, first: dict) -> str:
        return " ".join(f"{k}={first[k]}" for k, usual in self.usual.items() if first[k] != usual)

    def header(self) -> list[str]:
        return ([h for h, many in (("date", self.dates), ("commit", self.commits)) if len(many) > 1]
                + (["machine"] if len(self.machines) > 1 else []) + (["command"] if len(self.commands) > 1 else [])
                + (["settings"] if self.deviating else []))

    def cells(self, first: dict) -> list[str]:
        cells = [c for c, many in ((first["date"][:10], self.dates), (first["commit"], self.commits)) if len(many) > 1]
        cells += [self.machines[machine(first)]] if len(self.machines) > 1 else []
        cells += [self.commands[first["command"]]] if len(self.commands) > 1 else []
        return cells + ([self.settings(first)] if self.deviating else [])

    def caption(self, bench: str) -> str:
        lines = [f"Generated by `python benchmarks/report.py` from `benchmarks/results/{bench}.csv`."]
        for name, keys in (("machine", self.machines), ("command", self.commands)):
            quote = "`" if name == "command" else ""
            if len(keys) == 1:
                lines.append(f"- {name}: {quote}{next(iter(keys))}{quote}")
            else:
                lines.append(f"- {name}s:" + "".join(f"\n  - {k}: {quote}{v}{quote}" for v, k in keys.items()))
        for name, many in (("date", self.dates), ("commit", self.commits)):
            if len(many) == 1:
                lines.append(f"- {name}: {many[0]}")
        lines.append("- settings" + (" (unless the row says otherwise)" if self.deviating else "") + ": "
                     + ", ".join(f"{k}={v}" for k, v in self.usual.items() if v != ""))
        return "\n".join(lines)


def markdown(header: list[str], lines: list[list[str | None]]) -> str:
    """A markdown table; columns empty on every line are dropped. Cells: "" = no value (–), None = as above."""
    used = [i for i in range(len(header)) if any(line[i] for line in lines)]
    cell = lambda s: "" if s is None else s.replace("|", "\\|") or "–"  # noqa: E731
    numeric = {i for i in used if header[i] != "date" and all(NUMBER.fullmatch(line[i] or "–") for line in lines)}
    out = ["| " + " | ".join(header[i] for i in used) + " |",
           "|" + "".join(" ---: |" if i in numeric else " --- |" for i in used)]
    out += ["| " + " | ".join(cell(line[i]) for i in used) + " |" for line in lines]
    return "\n".join(out)


def value_cell(row: dict | None, value: str) -> str:
    """One variant's cell in layout=runs: the value (or values, `a/b`), else the tokens/s range."""
    if row is None:
        return ""
    cols = value.split("/")
    if all(row.get(c) for c in cols):
        return " / ".join(fmt(row[c], FORMATS.get(c, ",.0f")) for c in cols)
    if value == "tokens_per_s" and row.get("tokens_per_s_min"):
        return f"{fmt(row['tokens_per_s_min'], ',.0f')}–{fmt(row['tokens_per_s_max'], ',.0f')}"
    return ""


def variant_rank(name: str) -> int:
    """Baselines (naive, stock, kt-kernel...) first, then ours, then --against builds."""
    return 1 if name.startswith("ours") else 2 if name.startswith("against") else 0


def variant_order(rows: list[dict]) -> list[str]:
    """The variants of `rows` by rank, each rank in order of appearance."""
    return sorted(dict.fromkeys(r["variant"] for r in rows), key=variant_rank)


def ratios(run: list[dict]) -> str:
    return "; ".join(f"{r['ratio_of']} {r['ratio']}×" for r in run if r["ratio"])


def notes(run: list[dict]) -> str:
    """The run's note (on its first row), then any variant's own, named."""
    parts = [run[0]["note"]] if run[0]["note"] else []
    return "; ".join(parts + [f"{r['variant']}: {r['note']}" for r in run[1:] if r["note"]])


def table_runs(prov: Provenance, runs: list[list[dict]], value: str) -> str:
    variants = variant_order([r for run in runs for r in run])
    header = prov.header() + variants + ["ratios", "note"]
    lines = []
    for run in runs:
        by_variant = {r["variant"]: r for r in run}
        lines.append(prov.cells(run[0]) + [value_cell(by_variant.get(v), value) for v in variants]
                     + [ratios(run), notes(run)])
    return markdown(header, lines)


def tflops(row: dict, spec: str) -> str:
    if not row["fwd_ms"]:
        return ""
    flops = 6 * math.prod(float(row[k]) for k in ("tokens", "topk", "hidden", "intermediate"))
    return " / ".join(format(flops / float(row[k]) / 1e9, spec) for k in ("fwd_ms", "bwd_ms"))


def row_cells(bench: str, row: dict) -> list[str]:
    cells = []
    for col, _, spec in FIELDS[bench]:
        if col == "spread":
            cells.append(f"{fmt(row['tokens_per_s_min'], spec)}–{fmt(row['tokens_per_s_max'], spec)}"
                         if row.get("tokens_per_s_min") else "")
        elif col == "tflops":
            cells.append(tflops(row, spec))
        else:
            cells.append(fmt(row[col], spec))
    return cells


def table_rows(bench: str, prov: Provenance, runs: list[list[dict]]) -> str:
    header = prov.header() + ["variant"] + [h for _, h, _ in FIELDS[bench]] + ["ratio", "note"]
    lines = []
    for run in runs:
        for i, row in enumerate(run):
            lead = prov.cells(row) if i == 0 else [None] * len(prov.header())
            ratio = f"{row['ratio']}× {row['ratio_of']}" if row["ratio"] else ""
            lines.append(lead + [row["variant"]] + row_cells(bench, row) + [ratio, row["note"]])
    return markdown(header, lines)


def render_table(spec: str, results_dir: Path) -> str:
    bench, options, filters = parse_spec(spec)
    runs = runs_of([r for r in results.read_rows(bench, results_dir) if keep(r, filters)])
    if int(options["last"]) > 0:
        runs = runs[-int(options["last"]):]
    if not runs:
        return f"(no rows in benchmarks/results/{bench}.csv match this table)\n"
    prov = Provenance(bench, runs)
    if options["layout"] == "rows":
        table = table_rows(bench, prov, runs)
    else:
        table = table_runs(prov, runs, options["value"])
    return f"{prov.caption(bench)}\n\n{table}\n"


def render_document(text: str, results_dir: Path = results.RESULTS_DIR) -> str:
    """`text` with every marker pair's contents regenerated from the rows."""
    return MARKER.sub(lambda m: m.group(1) + render_table(m.group("spec"), results_dir) + m.group(4), text)


def read_added(path: Path) -> dict[str, list[dict]]:
    """Rows of a recorded CSV (named after its benchmark) or of --json lines (each names its benchmark)."""
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return {path.stem: list(csv.DictReader(f))}
    added = collections.defaultdict(list)
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            added[row.pop("bench")].append(row)
    return added


def add_rows(paths: list[Path], results_dir: Path) -> None:
    files = [f for p in paths for f in (sorted(p.glob("*.csv")) if p.is_dir() else [p])]
    for path in files:
        for bench, rows in read_added(path).items():
            have = {r["run"] for r in results.read_rows(bench, results_dir)}
            new = [r for r in rows if r["run"] not in have]
            if new:
                results.append_rows(bench, new, results_dir)
            print(f"{path}: {len(new)} new rows for {bench} ({len(rows) - len(new)} already present)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when BENCHMARKS.md is stale")
    p.add_argument("--add", type=Path, nargs="+", default=[], metavar="FILE", help="recorded CSVs / JSON lines")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--results-dir", type=Path, default=results.RESULTS_DIR)
    a = p.parse_args()
    text = DOC.read_text()
    if a.check:
        if render_document(text, a.results_dir) != text:
            sys.exit("BENCHMARKS.md's tables differ from benchmarks/results/*.csv: run python benchmarks/report.py")
        return
    add_rows(a.add, a.results_dir)
    DOC.write_text(render_document(text, a.results_dir))
    if not a.no_plots:
        import plots  # matplotlib only here: the check above needs none

        for path in plots.write_all(a.results_dir):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
