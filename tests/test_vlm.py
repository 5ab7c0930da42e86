"""Vision-language MoE families (tiny_models.VL_FAMILIES: qwen3_vl_moe, qwen3_5_moe, glm4v_moe, ernie4_5_vl_moe),
loaded with the class LLaMA-Factory uses (AutoModelForImageTextToText): the vision tower and projector stay stock
modules, the language model's routed experts run on the engine. Against stock transformers + PEFT on the same
checkpoint, with images:

  * fp32 logits of a left-padded batch with one 32x32 image per row (every experts module gets tokens: ERNIE-4.5-VL's
    vision experts take the image tokens and their markers, its text experts the rest), and of its text alone
  * 8 LoRA steps on images + text, LoRA on every linear (vision tower included: its gradients pass through the
    engine's backward at the image tokens) and on the routed experts (every experts module)
  * greedy generation with the image and the trained adapters
Qwen3-VL-MoE's checkpoint stores its experts transposed ([E, H, 2I]) as the Hub's do; ERNIE-4.5-VL's stores text and
vision experts as one per-expert list. ~3 s per family on 2 cores.
"""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft import get_peft_model as stock_get_peft_model
from transformers import AutoModelForImageTextToText

import kt_sft
from kt_sft.models.expert_lora import engine_experts_modules, get_peft_model, resolve_expert_targets
from lora_train import adamw_losses
from moe_reference import rel_err
from tiny_models import VL_FAMILIES, experts_paths, vl_batch

RTOL = 1e-4
STEPS = 8


def test_qwen3_vl_moe_checkpoint_stores_its_experts_transposed(tiny_checkpoint):
    """As the Hub's Qwen3-VL-MoE checkpoints: gate_up_proj [E, H, 2I] on disk, [E, 2I, H] in the model."""
    from safetensors import safe_open

    from tiny_models import expert_keys_on_disk, tiny_config

    path, text = tiny_checkpoint("qwen3_vl_moe"), tiny_config("qwen3_vl_moe").text_config
    key, shard = next((k, f) for k, f in expert_keys_on_disk(path).items() if k.endswith("gate_up_proj"))
    with safe_open(str(path / shard), "pt") as f:
        assert f.get_slice(key).get_shape() == [text.num_experts, text.hidden_size, 2 * text.moe_intermediate_size]


def _stock(path):
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)


def _ours(path):
    return kt_sft.load_model(path, device="cpu", dtype=torch.float32, progress=False)


def _lora(model, family, wrap):
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                        exclude_modules=r".*\.(gate|router)$",
                        target_parameters=[f"{path}.{p}" for path in experts_paths(family)
                                           for p in ("gate_up_proj", "down_proj")])
    return wrap(model, config)


def _train(model, family) -> list[float]:
    return adamw_losses(model, (vl_batch(family, 100 + step % 4) for step in range(STEPS)), lr=2e-3)


@torch.no_grad()
def _tokens_per_experts_module(model, batch) -> dict[str, int]:
    """The tokens each engine experts module computes in one forward of `batch`."""
    counts = {}
    hooks = [m.register_forward_pre_hook(lambda _, args, n=name: counts.__setitem__(n, counts.get(n, 0) +
                                                                                        args[0].shape[0]))
             for name, m in engine_experts_modules(model).items()]
    model(**batch)
    for hook in hooks:
        hook.remove()
    return counts


@torch.no_grad()
def _generate(model, family):
    batch = vl_batch(family, 7)
    batch.pop("labels")
    out = model.eval().generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_vision_language_family_matches_stock(family, tiny_checkpoint):
    path = tiny_checkpoint(family)
    stock, ours = _stock(path), _ours(path)
    assert type(ours) is type(stock) and ours.kt_summary.startswith("kt-sft: ")
    batch = vl_batch(family, 3)
    batch.pop("labels")
    text = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        ref, got = stock.eval()(**batch).logits, ours.eval()(**batch).logits
        text_ref, text_got = stock(**text).logits, ours(**text).logits
    assert rel_err(got, ref) <= RTOL, f"{family} logits: {rel_err(got, ref):.2e}"
    assert rel_err(text_got, text_ref) <= RTOL, f"{family} text-only logits: {rel_err(text_got, text_ref):.2e}"
    assert rel_err(text_ref, ref) > 1e-2  # the image matters
    tokens = _tokens_per_experts_module(ours, batch)
    assert len(tokens) == len(engine_experts_modules(ours)) and min(tokens.values()) > 0, tokens
    targets = [f"{path}.{p}" for path in experts_paths(family) for p in ("gate_up_proj", "down_proj")]
    assert resolve_expert_targets(ours, ["experts"]) == targets  # lora_target `experts`: every experts module

    stock, ours = _lora(stock, family, stock_get_peft_model), _lora(ours, family, get_peft_model)
    stock_losses, our_losses = _train(stock, family), _train(ours, family)
    dev = max(abs(a - b) / abs(b) for a, b in zip(our_losses, stock_losses))
    print(f"[vlm] {family}: logits rel {rel_err(got, ref):.1e}, {STEPS} LoRA steps max rel {dev:.1e}, "
          f"loss {stock_losses[0]:.3f} -> {stock_losses[-1]:.3f}")
    assert dev <= RTOL and our_losses[4] < our_losses[0]
    vision_b = [p for n, p in ours.named_parameters() if (".visual." in n or ".vision_tower." in n) and "lora_B" in n]
    assert vision_b and all(p.abs().max() > 0 for p in vision_b), "the vision tower's LoRA must have trained"
    expert_b = [p for n, p in ours.named_parameters() if ".experts." in n and "lora_B" in n]
    assert len(expert_b) == 2 * len(engine_experts_modules(ours)) and all(p.abs().max() > 0 for p in expert_b)
    assert torch.equal(_generate(ours, family), _generate(stock, family))


def test_llamafactory_lora_targets_of_a_vision_language_model(tiny_checkpoint):
    """LLaMA-Factory turns a VLM's lora_target into full module names outside the frozen vision tower (substring
    matches); with the hook, the routed experts skip that (no `act_fn` child as a module target) and `all` next
    to them expands to every language-model linear first, as `all` alone does."""
    import types

    import peft
    pytest.importorskip("llamafactory", reason="LLaMA-Factory is not installed (make test-tfnew's venv)")
    from llamafactory.hparams import FinetuningArguments
    from llamafactory.model.model_utils.misc import find_all_linear_modules
    from llamafactory.model.model_utils.visual import patch_target_modules

    from kt_sft.llamafactory.patches import patch_adapter

    model = _ours(tiny_checkpoint("qwen3_vl_moe"))
    adapter = types.SimpleNamespace(get_peft_model=peft.get_peft_model, PeftModel=peft.PeftModel,
                                    patch_target_modules=patch_target_modules)
    patch_adapter(adapter)
    args = FinetuningArguments(finetuning_type="lora")
    alone = patch_target_modules(model, args, find_all_linear_modules(model, args.freeze_vision_tower))
    assert alone and not any("visual" in n or "experts" in n for n in alone)
    assert adapter.patch_target_modules(model, args, ["all", "experts"]) == [*alone, "experts"]
    assert adapter.patch_target_modules(model, args, ["q_proj", "mlp.experts"]) == \
        [n for n in alone if n.endswith("q_proj")] + ["mlp.experts"]


def test_rule_file_names_further_experts_modules_under_more(tiny_checkpoint, tmp_path):
    """A rule file (kt_optimize_rule) describes ERNIE-4.5-VL's vision experts under `more`, numbered on disk from
    expert_block x E: written from the derived rule, it loads a model with the derived rule's logits."""
    import yaml

    from kt_sft.models.registry import load_family_file
    from tiny_models import derived_family

    keys = ("experts_module", "checkpoint", "fused_checkpoint", "activation", "gated", "expert_block")
    derived, path = derived_family("ernie4_5_vl_moe"), tiny_checkpoint("ernie4_5_vl_moe")
    text, *more = [{k: getattr(rule, k) for k in keys} for rule in derived.experts_sets]
    rule = tmp_path / "ernie.yaml"
    rule.write_text(yaml.safe_dump({"model_type": "ernie4_5_vl_moe", **text, "more": more}))
    assert [r.expert_block for r in load_family_file(rule).experts_sets] == [0, 1]
    batch = vl_batch("ernie4_5_vl_moe", 3)
    batch.pop("labels")
    with torch.no_grad():
        ref = _ours(path).eval()(**batch).logits
        got = kt_sft.load_model(path, device="cpu", dtype=torch.float32, progress=False, rule=rule).eval()(**batch)
    assert torch.equal(got.logits, ref)
