"""The benchmark scripts still run (tiny sizes, CPU) and what they compare agrees, so a device session never
starts with a broken script: bench_moe's engine rows match its naive torch loop, bench_e2e's smoke mode trains,
bench_decode generates. Their --json rows carry what the run measured and --record appends the same rows to the
results dir; BENCHMARKS.md's tables are exactly what benchmarks/report.py renders from the committed rows."""
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import report  # noqa: E402
import results  # noqa: E402


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # A clean environment, except that kt_sft must import as it does here (installed, or on PYTHONPATH as on
    # the device, where the checkout is not installed).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"KT_SFT_THREADS": "2", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
                               "PYTHONPATH": path, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _json_rows(stdout: str, bench: str) -> list[dict]:
    """--json: stdout carries the rows only, one JSON object a line, all of one run."""
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert rows and {r["bench"] for r in rows} == {bench} and len({r["run"] for r in rows}) == 1, stdout
    return rows


def _recorded(results_dir: Path, bench: str) -> list[dict]:
    with (results_dir / f"{bench}.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == results.SCHEMAS[bench].columns
        return list(reader)


def _same(recorded: dict, row: dict) -> None:
    """A recorded CSV row holds the JSON row's values (numbers to the CSV's 6 significant digits)."""
    for key, value in row.items():
        if key == "bench" or value is None:
            continue
        if isinstance(value, float):
            assert math.isclose(float(recorded[key]), value, rel_tol=1e-5), (key, recorded[key], value)
        elif isinstance(value, dict):
            assert json.loads(recorded[key]).keys() == value.keys(), key
        else:
            assert recorded[key] == str(int(value) if isinstance(value, bool) else value), (key, recorded[key])


@pytest.mark.slow
def test_bench_moe_small_rows_agree_with_the_naive_loop(tmp_path):
    proc = _run("benchmarks/bench_moe.py", "--small", "--int8", "--lora-rank", "4", "--iters", "1", "--json",
                "--record", "--results-dir", str(tmp_path), env={"KT_SFT_COMMIT": "abc1234"})
    out = proc.stderr  # the human report, under --json
    for name in ("kt-sft (", "kt-sft + LoRA r=4", "kt-sft int8 weights", "kt-sft int8 GEMMs", "naive torch loop"):
        assert re.search(rf"^{re.escape(name)}.*\s\d+\s*$", out, re.M), (name, out)
    y, dx = map(float, re.search(r"rel diff y ([\d.e-]+), dx ([\d.e-]+)", out).groups())
    assert y < 2e-2 and dx < 2e-2, out  # bf16 engine vs bf16 torch loop: same math
    assert re.search(r"weight memory 0\.\d+ GiB vs 0\.\d+ GiB", out)
    printed = float(re.search(r"^ratio \(ours / naive tokens/s\): ([\d.]+)x", out, re.M).group(1))

    rows = {r["variant"]: r for r in _json_rows(proc.stdout, "bench_moe")}
    assert set(rows) == {"ours bf16", "ours bf16 + LoRA r=4", "ours int8", "ours int8-gemm", "naive"}
    ours = rows["ours bf16"]
    assert ours["commit"] == "abc1234"  # KT_SFT_COMMIT: the device's copy of the tree has no .git
    assert ours["command"].startswith("KT_SFT_THREADS=2 python benchmarks/bench_moe.py --small")
    assert (ours["experts"], ours["topk"], ours["tokens"], ours["threads"]) == (8, 2, 256, 2)
    assert ours["ratio_of"] == "ours/naive" and math.isclose(ours["ratio"], printed, abs_tol=6e-3)
    assert math.isclose(ours["ratio"], ours["tokens_per_s"] / rows["naive"]["tokens_per_s"], rel_tol=1e-3)
    assert math.isclose(ours["err_y"], y, rel_tol=1e-2) and math.isclose(ours["err_dx"], dx, rel_tol=1e-2)
    for r in rows.values():  # one timed round: the median, slowest and fastest are that round
        assert r["tokens_per_s"] > 0 and math.isclose(r["tokens_per_s_min"], r["tokens_per_s_max"])
        assert math.isclose(r["tokens_per_s"], 256 / (r["fwd_ms"] + r["bwd_ms"]) * 1e3, rel_tol=1e-6)
    assert rows["ours int8-gemm"]["ratio_of"] == "int8-gemm/bf16" and rows["ours int8-gemm"]["weight_gib"] > 0
    assert rows["ours bf16 + LoRA r=4"]["ratio_of"] == "LoRA overhead"

    recorded = _recorded(tmp_path, "bench_moe")
    assert [r["variant"] for r in recorded] == list(rows)
    for rec in recorded:
        _same(rec, rows[rec["variant"]])


@pytest.mark.slow
def test_bench_moe_against_another_build_runs_both_in_one_process():
    """--against loads a second copy of the engine (here: this same checkout) under another package name; both
    rows and their ratio are printed, for the bf16 layer and every other format timed (--int8's two, --formats), each
    against ours of the same format; --kchunk adds ours with a forced K chunk, against ours the same way. --evict-mb
    rewrites memory between pairs without changing the results."""
    out = _run("benchmarks/bench_moe.py", "--small", "--iters", "1", "--no-baseline", "--evict-mb", "8", "--int8",
               "--formats", "int4-gemm", "--against", str(REPO), "--kchunk", "64").stdout
    name = re.escape(REPO.name[:12])
    assert re.search(rf"^{name} \(\w+\)\s.*\s\d+\s*$", out, re.M), out
    assert re.search(rf"^kt-sft \(\w+\) / {name} \(\w+\) tokens/s: [\d.]+x", out, re.M), out
    for ours in ("int8 weights", "int8 GEMMs", "int4-gemm"):
        assert re.search(rf"^{name} {ours}\s.*\s\d+\s*$", out, re.M), out
        assert re.search(rf"^kt-sft {ours} / {name} {ours} tokens/s: [\d.]+x.*; outputs bitwise equal$", out, re.M), out
    assert re.search(r"^kt-sft \(\w+\) / kt-sft kchunk=64 tokens/s: [\d.]+x", out, re.M), out
    assert re.search(r"^kt-sft int8 GEMMs / kt-sft int8 kchunk=64 tokens/s: [\d.]+x", out, re.M), out
    assert "8 MB rewritten before each pair" in out


@pytest.mark.slow
def test_bench_moe_shape_table_smoke_puts_each_row_against_the_hosts_ceilings(tmp_path):
    """bench_moe --smoke: the shape table's small version (2 shapes, 8 of their experts, T = 64 forward + backward
    and T = 1 forward only) measures this host's ceilings in the same run; every row's TF/s, floor and binding
    ceiling follow from its own fields, the subset keeps the full layer's rows per expert and says so."""
    proc = _run("benchmarks/bench_moe.py", "--smoke", "--json", "--record", "--results-dir", str(tmp_path),
                env={"KT_SFT_COMMIT": "abc1234"})
    rows = _json_rows(proc.stdout, "bench_moe_shapes")
    assert [(r["shape"], r["tokens"], r["variant"]) for r in rows] == [
        (shape, T, v) for shape in ("DeepSeek-V2-Lite", "Qwen3-30B-A3B") for T in (64, 1)
        for v in ("ours bf16", "ours int8-gemm")]
    amx = rows[0]["isa"] == "amx"
    for r in rows:
        # CI builds the engine, so g++ is there; int8 GEMMs have a ceiling on AMX only (None: left out of JSON)
        assert r["bf16_ceiling_tflops"] > 0 and r["bandwidth_gbs"] > 0 and ("int8_ceiling_tflops" in r) == amx
        T, train = r["tokens_run"], r["tokens"] > 32
        assert r["experts_run"] == 8 and T == max(1, round(r["tokens"] * 8 / r["experts"]))
        assert r["note"].startswith(f"subset: 8 of {r['experts']} experts on {T} of {r['tokens']} tokens")
        assert r["pass"] == ("fwd+bwd" if train else "fwd") and ("bwd_ms" in r) == train
        seconds = (r["fwd_ms"] + r.get("bwd_ms", 0.0)) / 1e3
        flops = (2 if train else 1) * 6.0 * T * r["topk"] * r["hidden"] * r["intermediate"]
        assert math.isclose(r["achieved_tflops"], flops / seconds / 1e12, rel_tol=1e-6)
        assert math.isclose(r["pct_ceiling"], 100 * r["floor_ms"] / 1e3 / seconds, rel_tol=1e-6)
        ceiling = r.get("ceiling_tflops")
        assert ceiling == (r.get("int8_ceiling_tflops") if r["variant"] == "ours int8-gemm" else r["bf16_ceiling_tflops"])
        compute_ms = flops / (ceiling * 1e12) * 1e3 if ceiling else 0.0
        assert r["floor_ms"] >= compute_ms * (1 - 1e-9)  # the floor is the larger of the two bounds
        assert r["binding"] == "bandwidth" or math.isclose(r["floor_ms"], compute_ms, rel_tol=1e-9)
    out = proc.stderr  # the human report: the ceilings line, then a line per row
    assert re.search(r"^ceiling \(\w+\): bf16 GEMM loop [\d.]+ TF/s", out, re.M), out
    assert len(re.findall(r"^(DeepSeek-V2-Lite|Qwen3-30B-A3B) .* (compute|bandwidth)  subset: ", out, re.M)) == 8
    recorded = _recorded(tmp_path, "bench_moe_shapes")
    for rec, row in zip(recorded, rows, strict=True):
        _same(rec, row)


def test_host_ceilings_never_run_an_instruction_the_cpu_lacks():
    """Each ceiling probe runs on the engine's ISA paths this CPU has and answers -1 (n/a) on AMX elsewhere;
    measure() gives each path the ceilings of its GEMM loops (int8 GEMMs: AMX only)."""
    import host_ceiling
    import kt_sft.engine as ke

    lib, why = host_ceiling.library()
    assert lib is not None, why
    isas = ke.available_isas()
    for isa, probes in host_ceiling.PROBES.items():
        for name in filter(None, probes):
            value = getattr(lib, name)(1, 0.002)
            if isa in isas:
                assert value > 0, (name, value)
            elif isa == "amx":  # no AMX here (or no permission for its tiles): the probe must not touch them
                assert value == -1, (name, value)
    for isa in isas:
        c = host_ceiling.measure(isa, 2, seconds=0.002, read_bytes=8 * 2**20)
        assert (c.bf16_tflops is not None, c.int8_tflops is not None) == (isa != "scalar", isa == "amx"), c
        assert c.bandwidth_gbs > 0 and c.compute_tflops(ke.get_format("int8-gemm")) == c.int8_tflops


def test_shape_plan_keeps_the_full_layers_rows_per_expert():
    """A shape that does not fit runs as many experts as fit on T * E' / E tokens (a decode call: at least 1);
    one where not even top-k experts fit is refused; the floor is the larger of the compute and memory bounds."""
    import kt_sft.engine as ke
    import moe_shapes

    v3 = moe_shapes.find("deepseek-v3")
    formats = [ke.get_format("bf16"), ke.get_format("int8-gemm")]
    whole = moe_shapes.plan(v3, formats, 0, 4096, 2, budget=2**40)
    assert (whole.experts_run, whole.subset, whole.note(4096)) == (256, False, "")
    need = moe_shapes.plan(v3, formats, 0, 4096, 2, budget=2**40, max_experts=100)
    assert need.experts_run == 100 and need.tokens_run(4096) == 1600 and need.tokens_run(1) == 1
    fit = moe_shapes.plan(v3, formats, 0, 4096, 2, budget=10 * 2**30)
    assert 8 <= fit.experts_run < 256 and abs(fit.tokens_run(4096) * 8 / fit.experts_run - 128) < 8 / fit.experts_run
    assert "rows per expert; the full layer 128" in fit.note(4096)
    with pytest.raises(SystemExit, match="top-8 experts fit"):
        moe_shapes.plan(v3, formats, 0, 4096, 2, budget=2**30)
    assert moe_shapes.floor_seconds(1e12, 1e9, 2.0, 100.0) == (0.5, "compute")
    assert moe_shapes.floor_seconds(1e9, 1e11, 2.0, 100.0) == (1.0, "bandwidth")
    assert moe_shapes.floor_seconds(1e9, 1e11, None, None) == (None, "n/a")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["bf16", "int8-gemm"])
def test_bench_e2e_smoke_mode_trains(tmp_path, fmt):
    proc = _run("benchmarks/bench_e2e.py", "--tiny", "--dir", str(tmp_path / "ckpt"), "--format", fmt,
                "--json", "--record", "--results-dir", str(tmp_path / "results"))
    [row] = _json_rows(proc.stdout, "bench_e2e")
    assert row["variant"] == f"ours {fmt}" and (row["layers"], row["batch"], row["seq"]) == (3, 2, 64)
    # tokens/s is the timed steps' median: batch x seq over the median step wall, within the steps' range
    assert math.isclose(row["tokens_per_s"] * row["step_ms"] / 1e3, 2 * 64, rel_tol=1e-9)
    assert row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
    # a random model's first loss is about ln(vocab = 1024) = 6.93; the engine ran in every timed step
    assert abs(row["loss_first"] - math.log(1024)) < 1.0 and math.isfinite(row["loss_last"])
    assert row["cpu_experts_ms"] > 0 and row["isa"] and row["threads"] == 2
    phases = row["phases_ms"]
    assert phases and all(ms >= 0 for ms in phases.values())
    assert any("quantize" in name for name in phases) == (fmt == "int8-gemm"), phases  # int8 GEMMs ran
    # the human report (stderr under --json) prints the same measurement
    printed = re.search(r"^kt-sft \(ours[^)]*\)\s+(\d+)\s.*\s([\d.]+)\s*$", proc.stderr, re.M)
    assert printed, proc.stderr
    assert int(printed.group(1)) == round(row["tokens_per_s"])
    assert float(printed.group(2)) == round(row["loss_first"], 4)
    [recorded] = _recorded(tmp_path / "results", "bench_e2e")
    _same(recorded, row)


@pytest.mark.slow
def test_bench_e2e_dpo_smoke_mode_trains(tmp_path):
    """--loss dpo: LLaMA-Factory's DPO step (chosen + rejected halves in one forward, the reference under
    disable_adapter) with expert LoRA; step 1 is ln 2 (the reference is the policy with a zero adapter)."""
    proc = _run("benchmarks/bench_e2e.py", "--tiny", "--dir", str(tmp_path / "ckpt"), "--loss", "dpo",
                "--expert-lora", "--json")
    [row] = _json_rows(proc.stdout, "bench_e2e")
    assert row["variant"] == "ours bf16 + expert LoRA DPO"
    assert abs(row["loss_first"] - math.log(2)) < 1e-3 and math.isfinite(row["loss_last"])
    assert row["cpu_experts_ms"] > 0


@pytest.mark.slow
def test_bench_e2e_deepseek_v3_tiny_trains_each_format_from_block_fp8(tmp_path):
    """--family deepseek_v3 --tiny: the block-FP8 writer's checkpoint (stock key names, e4m3 codes that are never
    NaN, fp32 scales on the 40 x 40 block grid, the rest bf16) trains in each default format, one child each; the
    rows' layer times add up to the step and project to 61 layers as printed."""
    import v3_checkpoint
    from safetensors import safe_open

    ckpt = tmp_path / "ckpt"
    proc = _run("benchmarks/bench_e2e.py", "--family", "deepseek_v3", "--tiny", "--dir", str(ckpt), "--json",
                "--record", "--results-dir", str(tmp_path / "results"))
    rows = _json_rows(proc.stdout, "bench_e2e_v3")
    assert [r["variant"] for r in rows] == ["ours fp8", "ours int4-gemm", "ours int8-gemm"]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [40, 40]}
    assert v3_checkpoint.holds(ckpt, v3_checkpoint.v3_config(3, 40, **v3_checkpoint.TINY_SIZES))  # reused next time
    stored = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            stored.update({k: f.get_tensor(k) for k in f.keys()})
    assert {"model.layers.2.mlp.experts.11.down_proj.weight", "model.layers.0.mlp.gate_proj.weight"} <= set(stored)
    for key, t in stored.items():
        if t.dtype == torch.float8_e4m3fn:
            assert ((t.view(torch.uint8) & 0x7F) != 0x7F).all(), key  # no NaN code
            scale = stored[key.replace(".weight", ".weight_scale_inv")]
            assert scale.dtype == torch.float32 and scale.shape == (-(-t.shape[0] // 40), -(-t.shape[1] // 40)), key
        elif not key.endswith(("weight_scale_inv", "e_score_correction_bias")):
            assert t.dtype == torch.bfloat16 and (t.dim() == 1 or "embed" in key or "lm_head" in key
                                                  or key.endswith("mlp.gate.weight")), key
    for row in rows:
        assert (row["layers"], row["moe_layers"], row["batch"], row["seq"]) == (3, 2, 1, 64)
        assert math.isclose(row["tokens_per_s"] * row["step_ms"] / 1e3, 64, rel_tol=1e-9)
        # two timed steps: the median step is their mean, the sum of the layers and the rest
        layers_ms = row["dense_layer_ms"] + 2 * row["moe_layer_ms"]
        assert math.isclose(row["rest_ms"] + layers_ms, row["step_ms"], rel_tol=1e-6)
        full_ms = row["rest_ms"] + row["dense_layer_ms"] + 60 * row["moe_layer_ms"]  # tiny: 1 dense + 60 MoE
        assert math.isclose(row["projected_tokens_per_s"], 64e3 / full_ms, rel_tol=1e-9)
        assert row["ratio"] == round(row["projected_tokens_per_s"] / 40.35, 3)
        assert math.isclose(row["load_gb_per_s"] * row["load_s"], row["checkpoint_gb"], rel_tol=1e-9)
        assert abs(row["loss_first"] - math.log(1000)) < 1.0 and math.isfinite(row["loss_last"])
        assert row["cpu_experts_ms"] > 0 and row["phases_ms"] and row["threads"] == 2
    assert "no stock baseline" in proc.stderr
    assert len(re.findall(r"x KTransformers' published 40.35 tokens/s", proc.stderr)) == 3, proc.stderr
    for rec, row in zip(_recorded(tmp_path / "results", "bench_e2e_v3"), rows, strict=True):
        _same(rec, row)


@pytest.mark.slow
def test_bench_decode_rows_on_a_tiny_checkpoint(tmp_path):
    """bench_decode (ours only: no GPU here) on a toy V2-Lite-structured checkpoint: prefill and decode rows."""
    from bench_e2e import tiny_config
    from bench_load import write_checkpoint

    write_checkpoint(tmp_path / "ckpt", 3, 2**20, config=tiny_config(3))
    proc = _run("benchmarks/bench_decode.py", "--dir", str(tmp_path / "ckpt"), "--layers", "3", "--prompt", "16",
                "--new-tokens", "8", "--batches", "1", "2", "--skip-stock", "--json", "--record", "--results-dir",
                str(tmp_path / "results"))
    rows = _json_rows(proc.stdout, "bench_decode")
    assert [(r["variant"], r["phase"], r["batch"]) for r in rows] == [
        ("ours", "prefill", 1), ("ours", "decode", 1), ("ours", "decode", 2)]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert all(0 < r["experts_share"] <= 1 for r in rows if r["phase"] == "decode")
    assert "ratio" not in rows[0]  # no stock side: no ours/stock
    recorded = _recorded(tmp_path / "results", "bench_decode")
    for rec, row in zip(recorded, rows, strict=True):
        _same(rec, row)


def test_benchmarks_md_tables_are_generated_from_the_committed_rows():
    """Every table between BENCHMARKS.md's markers is what benchmarks/report.py renders from
    benchmarks/results/*.csv, byte for byte (run `python benchmarks/report.py` after recording rows)."""
    text = report.DOC.read_text()
    specs = [m.group("spec") for m in report.MARKER.finditer(text)]
    assert {s.split()[0] for s in specs} >= {"bench_moe", "bench_e2e", "bench_decode"}, specs
    assert report.render_document(text) == text


def test_results_rows_append_render_and_add_once(tmp_path):
    """Rows append under one header (a file with other columns is refused, unknown columns too); report.py
    renders a table from them and --add skips runs already present."""
    run = {**results.provenance("amx", 2, gpu=""), "experts": 8, "topk": 2, "hidden": 64, "intermediate": 32,
           "tokens": 16, "routing": "uniform", "evict_mb": 0, "iters": 1}
    rows = [{**run, "variant": "naive", "tokens_per_s": 100.0},
            {**run, "variant": "ours bf16", "tokens_per_s": 250.0, "ratio": 2.5, "ratio_of": "ours/naive"}]
    results.append_rows("bench_moe", rows, tmp_path)
    results.append_rows("bench_moe", rows[:1], tmp_path)
    assert len(_recorded(tmp_path, "bench_moe")) == 3
    with pytest.raises(KeyError, match="no column speed"):
        results.check_row("bench_moe", {**rows[0], "speed": 1})
    (tmp_path / "bench_e2e.csv").write_text("run,date,tokens_per_s\n")
    with pytest.raises(ValueError, match="differ from the schema"):
        results.append_rows("bench_e2e", [{"variant": "stock"}], tmp_path)

    table = report.render_table("bench_moe", tmp_path)
    assert f"- commit: {run['commit']}" in table and "| naive | ours bf16 | ratios |" in table
    assert "| 100 | 250 | ours/naive 2.5× |" in table, table
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"bench": "bench_moe", **r}) + "\n" for r in rows))
    added = tmp_path / "added"
    report.add_rows([jsonl], added)
    report.add_rows([jsonl, tmp_path / "bench_moe.csv"], added)
    assert [r["variant"] for r in _recorded(added, "bench_moe")] == ["naive", "ours bf16"]


@pytest.mark.slow
def test_bench_load_quantized_checkpoint_and_tensor_profile(tmp_path):
    """bench_load writes a block-FP8 checkpoint and loads it into another expert format (--steps 0: load only), its
    row with the checkpoint's GB/s; --profile times one tensor for every source -> format pair that can load."""
    from bench_e2e import tiny_config
    from bench_load import SOURCES, write_source_checkpoint
    from kt_sft.engine.formats import FORMATS

    write_source_checkpoint(tmp_path / "ckpt", "fp8-block", 3, 2**20, config=tiny_config(3))
    proc = _run("benchmarks/bench_load.py", "--dir", str(tmp_path / "ckpt"), "--source", "fp8-block", "--format",
                "int8-gemm", "--steps", "0", "--json", "--record", "--results-dir", str(tmp_path / "results"))
    (row,) = _json_rows(proc.stdout, "bench_load")
    assert row["variant"] == "ours fp8-block -> int8-gemm" and row["load_gb_per_s"] > 0 and "tokens_per_s" not in row
    _same(_recorded(tmp_path / "results", "bench_load")[0], row)
    proc = _run("benchmarks/bench_load.py", "--profile", "--iters", "1", "--shapes", "33x45", "--json", "--record",
                "--results-dir", str(tmp_path / "results"))
    rows = _json_rows(proc.stdout, "bench_load_tensors")
    assert [r["variant"] for r in rows] == [f"{s} -> {f}" for s in SOURCES for f in FORMATS if
                                            (s, f) != ("int4-group", "fp8")]
    # no torch decode on the loader's path: the engine decodes (or keeps) every expert tensor as it packs it
    assert all(r["tensor_ms"] > 0 and r["pack_ms"] > 0 and r["decode_ms"] == 0 and r["gb_per_s"] > 0 for r in rows)
    for rec, r in zip(_recorded(tmp_path / "results", "bench_load_tensors"), rows, strict=True):
        _same(rec, r)


@pytest.mark.slow
def test_bench_e2e_gpu_experts_variants_and_sweep(tmp_path):
    """--gpu-experts 0 auto --sweep: per batch x seq one load and a row per value, trained from the same LoRA init
    (the same first loss); the share's rows carry its breakdown; the sweep table lists every run. On the CPU the
    share computes on the CPU device (--tiny: calls of any size use it)."""
    proc = _run("benchmarks/bench_e2e.py", "--tiny", "--dir", str(tmp_path / "ckpt"), "--gpu-experts", "0", "auto",
                "--sweep", "1x32", "2x48", "--json")
    rows = _json_rows(proc.stdout, "bench_e2e")
    assert [(r["batch"], r["seq"], r["gpu_experts"]) for r in rows] == [
        (1, 32, "0"), (1, 32, "auto"), (2, 48, "0"), (2, 48, "auto")]
    for plain, auto in (rows[:2], rows[2:]):
        assert abs(plain["loss_first"] - auto["loss_first"]) < 1e-2  # same init and batch: bf16 noise only
        assert "note" not in plain and re.search(r"GPU share \d+ ms/step over \d+ calls, [\d.]+ experts per call",
                                                 auto["note"])
    assert re.search(r"^sweep over tokens per step", proc.stderr, re.M)
    assert len(re.findall(r"^\s+\d+ x \d+ kt-sft", proc.stderr, re.M)) == 4


@pytest.mark.slow
def test_bench_overlap_tiny_runs():
    """bench_overlap's CPU smoke run prints, per format, the engine alone and after a torch op (the rows that need
    no GPU), each with its ratio to alone."""
    proc = _run("benchmarks/bench_overlap.py", "--tiny", "--formats", "bf16")
    rows = re.findall(r"^  (alone|after torch op)\s+([\d.]+) ms\s+([\d.]+)x alone", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["alone", "after torch op"] and float(rows[0][2]) == 1.0, proc.stdout


def test_busy_breakdown_splits_a_step_into_gpu_and_engine_time():
    """bench_e2e's profiled-step breakdown on hand-made intervals (us): kernels 0-10 and 20-30, a copy 5-25, the
    engine 8-40, a 50 us step: kernels alone 10, copies alone 10, both 10, GPU idle 20; the engine 32 busy, 22 of
    it with the GPU busy, 10 alone; neither busy 10 (40-50)."""
    from bench_e2e import busy_breakdown

    got = busy_breakdown([(0, 10), (20, 30)], [(5, 25)], [(8, 40)], 0.05)
    want = dict(kernels_only_ms=0.01, copies_only_ms=0.01, kernels_and_copies_ms=0.01, gpu_idle_ms=0.02,
                engine_busy_ms=0.032, engine_and_gpu_ms=0.022, engine_alone_ms=0.01, neither_ms=0.01)
    assert got.keys() == want.keys() and all(math.isclose(got[k], v, abs_tol=1e-12) for k, v in want.items()), got
    assert busy_breakdown([(0, 10)], [], [], 0.01)["engine_busy_ms"] == 0


@pytest.mark.slow
def test_bench_ddp_tiny_two_ranks_share_the_store(tmp_path):
    """bench_ddp.py under torchrun (2 ranks, toy V2-Lite shape on the CPU): one row with both ranks' memory."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _run("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                "benchmarks/bench_ddp.py", "--tiny", "--dir", str(tmp_path / "ckpt"), "--json",
                env={"KT_SFT_THREADS": "1", "OMP_NUM_THREADS": "1"})
    [row] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert row["bench"] == "bench_ddp" and row["ranks"] == 2 and row["tokens_per_s"] > 0
    assert "experts shared by 2 rank(s) of this host" in row["summary"]
    assert all(r["store_pss_gb"] > 0 for r in row["per_rank"])
