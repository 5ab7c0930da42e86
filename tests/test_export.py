"""Merged checkpoints (kt_sft.export: `python -m kt_sft export`, `USE_KT=1 llamafactory-cli export`) against stock
transformers + PEFT's `merge_and_unload` of the same adapters, on the tiny checkpoints of conftest.py.

  * every family of tiny_models.ALL_FAMILIES (per-expert and fused experts on disk, key prefixes): a stock PEFT
    adapter with LoRA on every linear and on the routed experts, exported in several shards, loads in stock
    transformers with the logits of stock merge_and_unload (fp32, <= RTOL); ERNIE-4.5-VL's two experts sets too
  * PEFT's features: router LoRA (target_parameters on a 2-D weight), embedding LoRA, modules_to_save, rslora,
    rank / alpha patterns, two adapters merged one after the other (LLaMA-Factory's order)
  * a bf16 base stays bf16 (untouched tensors byte for byte); block-FP8 / FP8-channel / INT4 bases dequantized
    (odd block [5, 7] and group 5 sizes); FP8 output requantized on the base's blocks as a plain-torch reference
    quantizes, untouched FP8 weights byte for byte
  * shards honour the size, the index is complete; bad input fails before anything is written, and a failure
    mid-export (a full disk) leaves no directory behind
  * peak RSS (slow): a multi-shard checkpoint exports within two shards' worth of memory
  * LLaMA-Factory: the hook's export equals stock `llamafactory-cli export` file for file (in process; the real
    CLI in a slow test)
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig

import kt_sft.export as kx
from kt_sft.adapter_merge import AdapterError
from kt_sft.models.derive import model_class
from moe_reference import rel_err
from quantized_checkpoints import dequantized_checkpoint, quantize_checkpoint
from tiny_models import (ALL_FAMILIES, VOCAB, experts_path, experts_paths, make_tiny_checkpoint, make_tiny_model,
                         vl_batch)

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "examples" / "demo" / "model"
RTOL = 1e-5           # fp32 logits vs stock merge_and_unload (measured 0 on most families, <= 1e-6 on jamba)
BF16_RTOL = 2e-2      # bf16 checkpoints: stock rounds W + bf16(delta) in bf16, the export fl(W + delta) once
FP8_RTOL = 5e-2       # FP8 output vs the fp32 merge: e4m3's 3-bit mantissa on the merged weights
BLOCK, GROUP = (5, 7), 5
# peak memory test: allocator and Python overhead beyond two input shards (measured: 24.7 MB of RSS growth with
# 16.8 MB shards of a 102 MB model, i.e. within 1.5 shards)
SLACK = 16 << 20


def _stock(path, dtype=torch.float32):
    """Stock transformers, through the auto class LLaMA-Factory uses (mistral4: AutoModelForImageTextToText)."""
    return model_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=dtype)


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return model.eval()(input_ids=ids, attention_mask=mask).logits.float()


def _lora_config(family: str, **overrides) -> LoraConfig:
    experts = experts_path(family)
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False,
                  exclude_modules=r".*\.(gate|router)$",  # routers: stock PEFT cannot wrap phimoe's (see families)
                  target_parameters=[f"{experts}.gate_up_proj", f"{experts}.down_proj"])
    return LoraConfig(**{**kwargs, **overrides})


def _adapter(base, family: str, out: Path, dtype=torch.float32, seed: int = 3, **overrides):
    """A stock PEFT adapter on the stock model of `base` (non-zero B everywhere), saved to `out`."""
    torch.manual_seed(seed)
    peft = get_peft_model(_stock(base, dtype), _lora_config(family, **overrides))
    peft.save_pretrained(out)
    return peft


def _export(base, adapters, out, **kwargs):
    return kx.export_checkpoint(base, adapters, out, progress=False, **kwargs)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_merged_checkpoint_equals_stock_merge(family, tiny_checkpoint, tmp_path):
    base = tiny_checkpoint(family)
    peft = _adapter(base, family, tmp_path / "adapter")
    expected = _logits(peft.merge_and_unload())
    plan = _export(base, tmp_path / "adapter", tmp_path / "out", shard_size="40KB")
    assert len(plan.shards) > 1 and any(e.experts for e in plan.edits.values())
    got = _logits(_stock(tmp_path / "out"))
    assert rel_err(got, expected) <= RTOL
    assert rel_err(_logits(_stock(base)), expected) > 1e-3  # the adapter matters


def test_merged_checkpoint_of_two_experts_sets_equals_stock_merge(tiny_checkpoint, tmp_path):
    """ERNIE-4.5-VL: LoRA on its text and on its vision experts, whose experts share one per-expert list on disk
    (vision from E on), merged into their own keys; logits with an image (the vision experts take its tokens)."""
    family, base = "ernie4_5_vl_moe", tiny_checkpoint("ernie4_5_vl_moe")
    experts = [f"{path}.{p}" for path in experts_paths(family) for p in ("gate_up_proj", "down_proj")]
    peft = _adapter(base, family, tmp_path / "adapter", target_parameters=experts)
    batch = vl_batch(family, 3)
    batch.pop("labels")
    with torch.no_grad():
        expected = peft.merge_and_unload().eval()(**batch).logits
        plan = _export(base, tmp_path / "adapter", tmp_path / "out", shard_size="40KB")
        got = _stock(tmp_path / "out").eval()(**batch).logits
        unmerged = _stock(base).eval()(**batch).logits
    assert sum(1 for e in plan.edits.values() if e.experts) == len(experts) * 2  # 2 MoE layers
    assert rel_err(got, expected) <= RTOL and rel_err(unmerged, expected) > 1e-3


def test_peft_features_and_several_adapters_in_order(tiny_checkpoint, tmp_path):
    """Router LoRA (target_parameters on mlp.gate.weight), embedding LoRA, modules_to_save (lm_head, trained),
    rslora, rank / alpha patterns; then a second adapter on the merged model: the export of both equals stock's
    merge of the first, then of the second."""
    base = tiny_checkpoint("qwen3_moe")
    first = _adapter(base, "qwen3_moe", tmp_path / "a1", target_modules=["q_proj", "embed_tokens"],
                     exclude_modules=None, target_parameters=["mlp.experts.down_proj", "mlp.gate.weight"],
                     modules_to_save=["lm_head"], use_rslora=True, rank_pattern={"down_proj": 6},
                     alpha_pattern={"q_proj": 3})
    with torch.no_grad():
        first.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    first.save_pretrained(tmp_path / "a1")
    torch.manual_seed(4)
    second = get_peft_model(first.merge_and_unload(), LoraConfig(r=2, lora_alpha=5, target_modules=["o_proj",
                                                                                                     "down_proj"],
                                                                 init_lora_weights=False))
    second.save_pretrained(tmp_path / "a2")
    expected = _logits(second.merge_and_unload())
    plan = _export(base, [tmp_path / "a1", tmp_path / "a2"], tmp_path / "out")
    assert plan.edits["lm_head.weight"].replacement is not None
    assert rel_err(_logits(_stock(tmp_path / "out")), expected) <= RTOL


def test_resized_vocabulary(tiny_checkpoint, tmp_path):
    """New tokens: embeddings resized and saved whole (modules_to_save), config.json's vocab_size follows."""
    base = tiny_checkpoint("mixtral")
    model = _stock(base)
    model.resize_token_embeddings(VOCAB + 3)
    torch.manual_seed(5)
    peft = get_peft_model(model, _lora_config("mixtral", modules_to_save=["embed_tokens", "lm_head"]))
    with torch.no_grad():
        peft.base_model.model.lm_head.modules_to_save["default"].weight[VOCAB:].normal_()
    peft.save_pretrained(tmp_path / "adapter")
    expected = _logits(peft.merge_and_unload())
    _export(base, tmp_path / "adapter", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == VOCAB + 3
    got = _logits(_stock(tmp_path / "out"))
    assert got.shape[-1] == VOCAB + 3 and rel_err(got, expected) <= RTOL


def test_bf16_base_stays_bf16(tmp_path):
    base = tmp_path / "base"
    make_tiny_checkpoint("deepseek_v3", base, dtype=torch.bfloat16)
    peft = _adapter(base, "deepseek_v3", tmp_path / "adapter", dtype=torch.bfloat16)
    expected = _logits(peft.merge_and_unload())
    plan = _export(base, tmp_path / "adapter", tmp_path / "out", shard_size="1GB")
    assert [[e.name for i in s for e in i.outputs] for s in plan.shards] and plan.shard_name(0) == "model.safetensors"
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in out.values() if t.is_floating_point()} == {torch.bfloat16}
    untouched = [i.key for s in plan.shards for i in s if i.action == "copy"]
    stored = _tensors(base)
    assert untouched and all(torch.equal(out[k], stored[k]) for k in untouched)
    assert rel_err(_logits(_stock(tmp_path / "out", torch.bfloat16)), expected) <= BF16_RTOL


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tmp_path_factory):
    """scheme -> (quantized tiny deepseek_v3, its dequantized fp32 copy), block [5, 7] / group 5."""
    root, made = tmp_path_factory.mktemp("export_quantized"), {}

    def get(scheme: str):
        if scheme not in made:
            q = quantize_checkpoint(tiny_checkpoint("deepseek_v3"), root / scheme, scheme, block=BLOCK, group=GROUP)
            made[scheme] = q, dequantized_checkpoint(q, root / f"{scheme}-ref")
        return made[scheme]

    return get


@pytest.mark.parametrize("scheme", ["fp8-block", "fp8-channel", "int4-group"])
def test_quantized_base_is_dequantized(scheme, quantized, tmp_path):
    base, ref = quantized(scheme)
    expected = _logits(_adapter(ref, "deepseek_v3", tmp_path / "adapter").merge_and_unload())
    _export(base, tmp_path / "adapter", tmp_path / "fp32", dtype=torch.float32)
    assert rel_err(_logits(_stock(tmp_path / "fp32")), expected) <= RTOL
    _export(base, tmp_path / "adapter", tmp_path / "bf16", shard_size="40KB")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    with open(tmp_path / "bf16" / "model.safetensors.index.json") as f:
        keys = json.load(f)["weight_map"]
    assert not [k for k in keys if k.endswith(("_packed", "_scale", "_scale_inv", "_shape"))]
    assert rel_err(_logits(_stock(tmp_path / "bf16")), expected) <= BF16_RTOL


def _reference_fp8(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 of fp32 w, block by block: s = max |w| / 448, codes = e4m3(w / s) (s = 0: 0)."""
    (n, k), (bn, bk) = w.shape, block
    scale = torch.zeros(-(-n // bn), -(-k // bk))
    codes = torch.zeros(n, k)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            part = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            scale[i, j] = part.abs().max() / 448
            if scale[i, j] > 0:
                codes[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = part / scale[i, j]
    return codes.to(torch.float8_e4m3fn), scale


def test_fp8_output_keeps_the_base_blocks(quantized, tmp_path):
    """format fp8: untouched FP8 weights byte for byte, merged ones the reference quantization of the fp32 merge
    (the fp32 export, equal to stock merge_and_unload above) on the base's [5, 7] blocks; quantization_config kept."""
    base, ref = quantized("fp8-block")
    peft = _adapter(ref, "deepseek_v3", tmp_path / "adapter", target_modules=["o_proj", "gate_proj"],
                    target_parameters=["mlp.experts.gate_up_proj"])  # attention's other linears, experts' down kept
    _export(base, tmp_path / "adapter", tmp_path / "fp32", dtype=torch.float32)
    plan = _export(base, tmp_path / "adapter", tmp_path / "out", format="fp8")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == list(BLOCK)
    out, stored, merged = _tensors(tmp_path / "out"), _tensors(base), _tensors(tmp_path / "fp32")
    actions = {i.key: i.action for s in plan.shards for i in s}
    fp8 = [k for k, t in stored.items() if t.dtype == torch.float8_e4m3fn]
    assert {actions[k] for k in fp8} == {"copy", "fp8"}
    for key in fp8:
        scale = key + "_scale_inv"
        if actions[key] == "copy":
            codes, s = stored[key], stored[scale]
        else:
            codes, s = _reference_fp8(merged[key], BLOCK)
        assert torch.equal(out[key].view(torch.uint8), codes.view(torch.uint8)) and torch.equal(out[scale], s), key
    dequantized_checkpoint(tmp_path / "out", tmp_path / "out-ref")
    assert rel_err(_logits(_stock(tmp_path / "out-ref")), _logits(peft)) <= FP8_RTOL


def _tensors(path: Path) -> dict:
    out = {}
    for shard in path.glob("*.safetensors"):
        out.update(load_file(shard))
    return out


def test_shards_honour_the_size_and_the_index_is_complete(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("mixtral")
    _adapter(base, "mixtral", tmp_path / "adapter")
    limit = 30_000
    plan = _export(base, tmp_path / "adapter", tmp_path / "out", shard_size=limit)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted({f for f in index["weight_map"].values()})
    assert files == [plan.shard_name(i) for i in range(len(plan.shards))] and len(files) > 2
    total, seen = 0, {}
    for name in files:
        with safe_open(str(tmp_path / "out" / name), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
            nbytes = sum(f.get_tensor(k).nbytes for k in f.keys())
            seen.update({k: name for k in f.keys()})
        assert nbytes <= limit or len(sizes) == 1
        total += nbytes
    assert seen == index["weight_map"] and index["metadata"]["total_size"] == total


def test_experts_from_a_separate_directory(tiny_checkpoint, tmp_path):
    """expert_path (kt_expert_checkpoint_path): routed experts read only from there, the rest only from the base
    (whose stale expert copies are ignored); the output is the export of the whole checkpoint."""
    from safetensors.torch import save_file

    whole = tiny_checkpoint("qwen3_moe")
    _adapter(whole, "qwen3_moe", tmp_path / "adapter")
    dense, experts = tmp_path / "dense", tmp_path / "experts"
    dense.mkdir()
    experts.mkdir()
    (dense / "config.json").write_bytes((whole / "config.json").read_bytes())
    tensors = _tensors(whole)
    stale = {k: (torch.zeros_like(v) if ".experts." in k else v) for k, v in tensors.items()}
    save_file(stale, dense / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".experts." in k}, experts / "experts.safetensors")
    _export(whole, tmp_path / "adapter", tmp_path / "a")
    _export(dense, tmp_path / "adapter", tmp_path / "b", expert_path=experts)
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- bad input

def _nothing_left(parent: Path, name: str = "out") -> bool:
    return not (parent / name).exists() and not [p for p in parent.iterdir() if "kt-sft-export" in p.name]


def test_bad_input_fails_before_writing(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("qwen3_moe")
    _adapter(base, "qwen3_moe", tmp_path / "adapter")
    _adapter(tiny_checkpoint("mixtral"), "mixtral", tmp_path / "other")
    with pytest.raises(ValueError, match="no adapter given"):
        _export(base, [], tmp_path / "out")
    with pytest.raises(AdapterError, match=r"adapter .*other \(trained on .*\) does not fit the base model .*: it "
                                           r"has LoRA weights for model\.layers\.0\.mlp\.experts, which this model "
                                           "does not have"):
        _export(base, tmp_path / "other", tmp_path / "out")
    with pytest.raises(ValueError, match="fp8.*stored as bf16; use bf16"):
        _export(base, tmp_path / "adapter", tmp_path / "out", format="fp8")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        _export(base, tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="shard size"):
        _export(base, tmp_path / "adapter", tmp_path / "out", shard_size="lots")
    assert _nothing_left(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        _export(base, tmp_path / "adapter", tmp_path / "full")
    assert os.listdir(tmp_path / "full") == ["x"]


def test_adapter_of_another_size_names_both_sides(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("qwen3_moe")
    small = tmp_path / "small"
    make_tiny_model("qwen3_moe", hidden_size=32).save_pretrained(small)
    _adapter(small, "qwen3_moe", tmp_path / "adapter")
    with pytest.raises(AdapterError, match=r"adapter .*adapter \(trained on .*small\) does not fit the base model "
                                           r".*qwen3_moe: its LoRA factors of .* are A \[.*\], but the model's"):
        _export(base, tmp_path / "adapter", tmp_path / "out")
    assert _nothing_left(tmp_path)


def test_full_disk_mid_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    base = tiny_checkpoint("qwen3_moe")
    _adapter(base, "qwen3_moe", tmp_path / "adapter")
    real_write, calls = kx.SafetensorsWriter.write, []

    def write(self, name, pieces):
        calls.append(name)
        if len(calls) == 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, pieces)

    monkeypatch.setattr(kx.SafetensorsWriter, "write", write)
    with pytest.raises(OSError, match="No space left on device.*new/out was not written"):
        _export(base, tmp_path / "adapter", tmp_path / "new" / "out", shard_size="40KB")
    assert len(calls) == 20 and not (tmp_path / "new").exists()


def test_command_line(tiny_checkpoint, tmp_path, capsys):
    """`python -m kt_sft export ...` (its main, in process: the subcommand dispatch and the arguments)."""
    from kt_sft.env import main

    base = tiny_checkpoint("qwen2_moe")
    peft = _adapter(base, "qwen2_moe", tmp_path / "adapter")
    argv = ["export", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out"),
            "--shard-size", "50KB", "--quiet"]
    assert main(argv) == 0
    assert rel_err(_logits(_stock(tmp_path / "out")), _logits(peft.merge_and_unload())) <= RTOL
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    assert main(argv) == 1 and "kt-sft export: error: export directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- peak memory

_MEASURE = """
import json, sys, torch
from kt_sft.export import export_checkpoint, plan_export
base, adapter, out = sys.argv[1:4]
plan_export(base, adapter, out, shard_size="10MB")  # imports and the model on meta: not the export's memory
def rss(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := the current RSS
before = rss("VmRSS")
export_checkpoint(base, adapter, out, shard_size="10MB", progress=False)
print(json.dumps({"before": before, "peak": rss("VmHWM")}))
"""


@pytest.mark.slow
def test_peak_memory_stays_within_two_shards(tmp_path):
    """A 100 MB fp32 checkpoint in ~10 MB shards (32 experts of 256 x 256 per layer, every layer MoE), LoRA on every
    linear and the routed experts: the export's peak RSS grows by at most two input shards + SLACK over the RSS
    before it starts (the whole model would be 100 MB)."""
    base = tmp_path / "base"
    make_tiny_model("qwen3_moe", hidden_size=256, moe_intermediate_size=256, num_experts=32, num_hidden_layers=4,
                    decoder_sparse_step=1).save_pretrained(base, max_shard_size="10MB")
    _adapter(base, "qwen3_moe", tmp_path / "adapter")
    shards = list(base.glob("*.safetensors"))
    model_bytes, shard_bytes = sum(s.stat().st_size for s in shards), max(s.stat().st_size for s in shards)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(base), str(tmp_path / "adapter"), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    grown = rss["peak"] - rss["before"]
    print(f"model {model_bytes / 1e6:.0f} MB, largest shard {shard_bytes / 1e6:.1f} MB, peak RSS growth "
          f"{grown / 1e6:.1f} MB")
    assert model_bytes > 5 * shard_bytes and grown <= 2 * shard_bytes + SLACK


# ---------------------------------------------------------------------------------------------- LLaMA-Factory

def _demo_adapter(out: Path) -> Path:
    """A stock PEFT adapter of the demo model with attention and routed-expert LoRA (what a kt-sft run saves)."""
    torch.manual_seed(0)
    peft = get_peft_model(_stock(DEMO_MODEL), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                                         target_parameters=["mlp.experts.gate_up_proj",
                                                                            "mlp.experts.down_proj"],
                                                         init_lora_weights=False))
    peft.save_pretrained(out)
    return out


def _export_args(adapter: Path, out: Path, use_kt: bool = True, **extra) -> dict:
    return dict(model_name_or_path=str(DEMO_MODEL), adapter_name_or_path=str(adapter), template="qwen3_nothink",
                finetuning_type="lora", export_dir=str(out), export_size=1, use_kt=use_kt, **extra)


def _same_checkpoints(ours: Path, stock: Path) -> None:
    assert sorted(os.listdir(ours)) == sorted(os.listdir(stock))
    for name in os.listdir(stock):
        if name.endswith(".safetensors"):
            a, b = load_file(ours / name), load_file(stock / name)
            assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b), name
        elif name == "config.json":
            assert json.loads((ours / name).read_text()) == json.loads((stock / name).read_text())
        else:
            assert (ours / name).read_bytes() == (stock / name).read_bytes(), name


def test_llamafactory_export_equals_stock(tmp_path):
    """In process: the hook's export (use_kt) writes what stock LLaMA-Factory's export writes for the same adapter
    (weights, config, tokenizer, Modelfile), and its refusals come before anything is written."""
    pytest.importorskip("llamafactory")  # the newer-transformers job (make test-tfnew) has none
    from kt_sft.llamafactory.config import KTConfigError
    from kt_sft.llamafactory.startup import activate

    activate()
    from llamafactory.train.tuner import export_model

    adapter = _demo_adapter(tmp_path / "adapter")
    export_model(_export_args(adapter, tmp_path / "ours"))
    export_model(_export_args(adapter, tmp_path / "stock", use_kt=False))
    _same_checkpoints(tmp_path / "ours", tmp_path / "stock")
    with pytest.raises(KTConfigError, match="export_hub_model_id with use_kt"):
        export_model(_export_args(adapter, tmp_path / "x", export_hub_model_id="me/model"))
    with pytest.raises(ValueError, match="fp8.*use bf16"):
        export_model(_export_args(adapter, tmp_path / "x", kt_export_format="fp8"))
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_model(_export_args(adapter, tmp_path / "ours"))
    with pytest.raises(KTConfigError, match="kt_export_format: expected bf16 or fp8"):
        export_model(_export_args(adapter, tmp_path / "x", kt_export_format="int4"))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_llamafactory_cli_export(tmp_path):
    """The real `USE_KT=1 llamafactory-cli export cfg.yaml` (subprocess) against stock `llamafactory-cli export`."""
    pytest.importorskip("llamafactory")
    import yaml

    from llamafactory_run import llamafactory_cli

    adapter = _demo_adapter(tmp_path / "adapter")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    logs = {}
    for use_kt, name in ((True, "ours"), (False, "stock")):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(_export_args(adapter, tmp_path / name, use_kt)))
        env = {**os.environ, "USE_KT": "1" if use_kt else "0", "PYTHONPATH": path}
        done = subprocess.run(llamafactory_cli("export", str(cfg)), env=env, capture_output=True, text=True,
                              timeout=600)
        logs[name] = done.stdout + done.stderr
        assert done.returncode == 0, logs[name][-3000:]
    _same_checkpoints(tmp_path / "ours", tmp_path / "stock")
    assert "kt-sft: merged" in logs["ours"] and "kt-sft: merged" not in logs["stock"]
