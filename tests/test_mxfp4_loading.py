"""MXFP4 checkpoints (gpt-oss's layout, tests/mxfp4_checkpoints.py): routed experts decoded to bf16 a few at a time
and packed into any expert format, against a reference quantizer / decoder written from the MX spec and against
stock transformers' own Mxfp4 dequantization.

  * decode_mxfp4 is bit-equal to the reference and to transformers' `_convert_moe_packed_tensors`
  * a silu-glu family (qwen3_5_moe_text, fused experts on disk, hidden 48 / experts' width 20: partial last groups)
    stored as MXFP4: fp32 logits equal stock's on the reference dequantization; every expert format packs what it
    packs from the dequantized bf16 weights; bf16 by default; the RAM check counts the target format
  * gpt-oss (transposed experts modules, interleaved gate/up, biases): the engine's packed weights equal stock
    transformers' dequantized parameters (weights level: the engine's gpt-oss math comes from the mathvar branch);
    its model-level comparison is skipped, naming what is missing, until the family loads
  * bad MXFP4 input fails before loading, naming the tensor
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, Mxfp4Config

import kt_sft
from kt_sft import loader
from kt_sft.checkpoint_formats import CheckpointFormatError, decode_mxfp4
from kt_sft.engine import ExpertLayer
from kt_sft.engine.gpu_share import panels_to_matrix
from moe_reference import rel_err
from mxfp4_checkpoints import dequantize_mxfp4, quantize_mxfp4, write_mxfp4
from tiny_models import VOCAB, make_tiny_model

RTOL = 1e-4


def _load(path, **kw):
    return kt_sft.load_model(path, **{"device": "cpu", "dtype": torch.float32, "progress": False, **kw})


def _ids():
    return torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(7))


def _gpt_oss_model():
    """A tiny gpt-oss (sizes multiples of 32: transformers' dequantizer needs whole groups)."""
    config = AutoConfig.for_model("gpt_oss", vocab_size=VOCAB, hidden_size=64, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, num_hidden_layers=2, num_local_experts=5,
                                  intermediate_size=32, num_experts_per_tok=2, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.normal_(0, 0.5 if p.dim() > 1 else 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    """family -> (MXFP4 checkpoint, its fp32 reference dequantized, {fused parameter: reference [E, out, in]})."""
    root, made = tmp_path_factory.mktemp("mxfp4"), {}

    def get(family: str):
        if family not in made:
            model = _gpt_oss_model() if family == "gpt_oss" else make_tiny_model(family)
            q, ref = root / family, root / f"{family}-ref"
            made[family] = q, ref, write_mxfp4(model, q, ref)
        return made[family]

    return get


# ------------------------------------------------------------------ decoding
def test_decode_is_the_reference_and_transformers_dequantization():
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (3, 7, 2, 16), generator=gen, dtype=torch.uint8)
    blocks[0, 0, 0] = torch.arange(0, 256, 16, dtype=torch.uint8) + torch.arange(16, dtype=torch.uint8)
    scales = torch.randint(0, 255, (3, 7, 2), generator=gen, dtype=torch.uint8)  # 0 (2^-127) .. 254, no NaN
    scales[1, :, 0], scales[1, :, 1] = 0, 254
    ours = decode_mxfp4(blocks, scales, 64)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours.float(), dequantize_mxfp4(blocks, scales, 64))
    assert torch.equal(ours, _convert_moe_packed_tensors(blocks, scales).transpose(1, 2))
    assert torch.equal(decode_mxfp4(blocks, scales, 40), ours[..., :40])  # a partial last group
    with pytest.raises(CheckpointFormatError, match=r"do not hold \[\.\.\., 7, 70\] weights"):
        decode_mxfp4(blocks, scales, 70)


def test_reference_quantizer_round_trips_e2m1_values():
    w = torch.tensor([[0.0, 0.5, -1.0, 1.5, 3.0, -4.0, 6.0, -6.0] * 4]) * 2.0 ** -3
    blocks, scales = quantize_mxfp4(w)
    assert torch.equal(dequantize_mxfp4(blocks, scales, 32), w) and scales.tolist() == [[124]]


# ------------------------------------------------------------------ a silu-glu family stored as MXFP4
def test_fp32_experts_match_stock_on_the_dequantized_checkpoint(mxfp4):
    q, ref, _ = mxfp4("qwen3_5_moe_text")
    ours = _load(q)
    assert "fp32 from mxfp4)" in ours.kt_summary and "quantization_config" not in ours.config.to_dict()
    stock = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    with torch.no_grad():
        got, want = ours.eval()(input_ids=_ids()).logits, stock(input_ids=_ids()).logits
    assert rel_err(got, want) <= RTOL


def _panels(layer) -> list[torch.Tensor]:
    """gate, up, down of every expert as the engine holds them ([E, rows, cols], padding cut off)."""
    shapes = [layer.projection_shape(p) for p in ("gate", "up", "down")]
    return [panels_to_matrix(p.raw, layer.num_experts, p.layout, layer.format, p.scales)[:, :r, :c]
            for p, (r, c) in zip(layer.panels().projections, shapes)]


def _engine_layers(model) -> dict[str, ExpertLayer]:
    return {n: m.kt_layer for n, m in model.named_modules() if hasattr(m, "kt_layer")}


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "fp8"])
def test_every_format_packs_what_it_packs_from_the_decoded_weights(mxfp4, fmt):
    """bf16 holds the reference dequantization exactly; int8 / int4 / fp8 quantize the same bf16 values as a layer
    loaded from them."""
    q, _, decoded = mxfp4("qwen3_5_moe_text")
    for name, layer in _engine_layers(_load(q, dtype=torch.bfloat16, format=fmt)).items():
        gate_up, down = decoded[f"{name}.gate_up_proj"], decoded[f"{name}.down_proj"]
        twin = ExpertLayer(layer.num_experts, layer.hidden_size, layer.intermediate_size, layer.format)
        twin.load_fused(gate_up.bfloat16(), down.bfloat16())
        for got, want in zip(_panels(layer), _panels(twin)):
            assert torch.equal(got, want), name
        if fmt == "bf16":
            I = layer.intermediate_size
            for got, want in zip(_panels(layer), (gate_up[:, :I], gate_up[:, I:], down)):
                assert torch.equal(got.float(), want), name


def test_default_format_is_bf16_and_the_ram_check_counts_the_target(mxfp4, monkeypatch):
    q, _, _ = mxfp4("qwen3_5_moe_text")
    plan = loader.plan_load(q, device="cpu", dtype=torch.bfloat16)
    assert plan.source.name == "mxfp4" and plan.format.name == "bf16"
    assert "holds mxfp4's weights without rounding them again" in plan.format_reason
    assert loader.plan_load(q, device="cpu", dtype=torch.float32).format.name == "fp32"
    need = {f.name: loader._host_need(plan.expert_bytes(f), plan.dense_bytes, 0, torch.device("cpu"))
            for f in loader._formats_for(plan)}
    assert need["int4"] < need["int8"] < need["bf16"]
    monkeypatch.setattr(loader, "_free_host_bytes", lambda: (need["int8"] + need["bf16"]) // 2)
    monkeypatch.setattr(loader.CheckpointFiles, "largest_shard", property(lambda self: 0))
    with pytest.raises(MemoryError, match=r"with bf16 experts needs .* use kt_backend .*INT4.*INT8"):
        _load(q, dtype=torch.bfloat16)
    assert "int8 from mxfp4" in _load(q, dtype=torch.bfloat16, format="int8").kt_summary


# ------------------------------------------------------------------ gpt-oss
def _stock_gpt_oss(path):
    """Stock transformers on the MXFP4 checkpoint: its Mxfp4 quantizer dequantizes on CPU (as LLaMA-Factory asks)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                quantization_config=Mxfp4Config(dequantize=True)).eval()


def test_gpt_oss_engine_weights_equal_stock_dequantization(mxfp4):
    """The engine holds exactly the experts stock transformers dequantizes from the same MXFP4 checkpoint (its
    [E, H, 2I] transposes undone, gate / up rows interleaved) and stock's biases (gate even / up odd columns of
    gate_up_proj_bias), and so it does from a plain checkpoint of those values (transposed experts modules' fused
    tensors)."""
    q, ref_path, _ = mxfp4("gpt_oss")
    stock = dict(_stock_gpt_oss(q).named_modules())
    for path in (q, ref_path):  # MXFP4, and the fp32 checkpoint of its values ([E, H, 2I] as stock saves them)
        ours = _load(path, dtype=torch.bfloat16)
        for name, layer in _engine_layers(ours).items():
            ref = stock[name]
            gate_up, down = ref.gate_up_proj.transpose(1, 2), ref.down_proj.transpose(1, 2)
            for got, want in zip(_panels(layer), (gate_up[:, 0::2], gate_up[:, 1::2], down)):
                assert torch.equal(got.float(), want), (path.name, name)
            biases, bias_gu = layer.biases(), ref.gate_up_proj_bias.float()
            for got, want in zip(biases.values(), (bias_gu[:, 0::2], bias_gu[:, 1::2], ref.down_proj_bias.float())):
                assert torch.equal(got, want), (path.name, name)


def test_gpt_oss_from_mxfp4_matches_stock(mxfp4):
    """Logits and greedy generation of gpt-oss loaded from MXFP4 into fp32 experts equal stock transformers' on the
    fp32 checkpoint of the same values. (Stock on the MXFP4 checkpoint itself dequantizes to bf16 experts and computes
    in bf16: 2.3e-3 from both; the values, exact in bf16, are compared in the test above.)"""
    q, ref_path, _ = mxfp4("gpt_oss")
    ours, stock = _load(q, format="fp32"), AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32).eval()
    with torch.no_grad():
        got, want = ours.eval()(input_ids=_ids()).logits, stock(input_ids=_ids()).logits
    assert rel_err(got, want) <= RTOL
    args = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(_ids(), **args), stock.generate(_ids(), **args))


# ------------------------------------------------------------------ bad input
def _rewrite(path, change) -> None:
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if change(tensors):
            save_file(tensors, str(shard), metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    weight_map = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            weight_map.update({k: shard.name for k in f.keys()})
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _blocks_on_a_dense_weight(t):
    key = "model.layers.1.self_attn.o_proj.weight"
    if key not in t:
        return False
    blocks, scales = quantize_mxfp4(t.pop(key)[None])  # as if one expert
    t[key + "_blocks"], t[key + "_scales"] = blocks, scales
    return True


def _drop(suffix):
    def change(t):
        keys = [k for k in t if k.startswith("model.layers.1.") and k.endswith(suffix)]
        for k in keys:
            del t[k]
        return bool(keys)
    return change


def _narrow_blocks(t):
    key = "model.layers.2.mlp.experts.down_proj_blocks"
    if key in t:
        t[key] = t[key][..., :8].contiguous()
    return key in t


BAD = {
    "dense_weight": (_blocks_on_a_dense_weight, ValueError,
                     r"self_attn.o_proj.weight_blocks .*not a routed experts' fused weight"),
    "scales_missing": (_drop("gate_up_proj_scales"), CheckpointFormatError,
                       r"experts.gate_up_proj_scales is missing: the mxfp4 weight .*gate_up_proj_blocks"),
    "blocks_shape": (_narrow_blocks, CheckpointFormatError, r"down_proj_blocks: expected MXFP4 blocks \[experts, out, "
                                                            r"in / 32, 16\] \(uint8\), got \[6, 48, 1, 8\]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_mxfp4_input_fails_before_loading(mxfp4, tmp_path, monkeypatch, case):
    import shutil

    q, _, _ = mxfp4("qwen3_5_moe_text")
    path = tmp_path / case
    shutil.copytree(q, path)
    change, error, match = BAD[case]
    _rewrite(path, change)
    monkeypatch.setattr(loader, "_stream_shards", lambda *a: pytest.fail("read weights before refusing"))
    with pytest.raises(error, match=match):
        _load(path)
