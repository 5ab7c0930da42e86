"""Vision-language MoE families (tiny_models.VL_FAMILIES: qwen3_vl_moe, qwen3_5_moe, glm4v_moe), loaded with the class
LLaMA-Factory uses (AutoModelForImageTextToText): the vision tower and projector stay stock modules, the language
model's routed experts run on the engine. Against stock transformers + PEFT on the same checkpoint, with images:

  * fp32 logits of a left-padded batch with one 32x32 image per row
  * 8 LoRA steps on images + text, LoRA on every linear (vision tower included: its gradients pass through the
    engine's backward at the image tokens) and on the routed experts
  * greedy generation with the image and the trained adapters
Qwen3-VL-MoE's checkpoint stores its experts transposed ([E, H, 2I]) as the Hub's do. ~3 s per family on 2 cores.
"""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft import get_peft_model as stock_get_peft_model
from transformers import AutoModelForImageTextToText

import kt_sft
from kt_sft.models.expert_lora import get_peft_model
from lora_train import adamw_losses
from moe_reference import rel_err
from tiny_models import IMAGE_GRID, IMAGE_TOKENS, PATCH, VL_FAMILIES, VL_TOKENS, experts_path

RTOL = 1e-4
STEPS = 8
SEQ = 14


def vl_batch(seed: int, rows: int = 2) -> dict:
    """`rows` rows of SEQ tokens, each with one image (start, IMAGE_TOKENS image tokens, end) after two text tokens,
    row 1 left-padded by 3; random pixels; labels = the text tokens (padding and image markers -100)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VL_TOKENS["image"], (rows, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    image = [VL_TOKENS["start"], *[VL_TOKENS["image"]] * IMAGE_TOKENS, VL_TOKENS["end"]]
    for r in range(rows):
        pad = 3 if r == 1 else 0
        mask[r, :pad] = 0
        ids[r, :pad] = 0
        ids[r, pad + 2: pad + 2 + len(image)] = torch.tensor(image)
    patches = rows * IMAGE_GRID[0] * IMAGE_GRID[1] * IMAGE_GRID[2]
    labels = ids.masked_fill((mask == 0) | (ids >= VL_TOKENS["image"]), -100)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(patches, 3 * 2 * PATCH * PATCH,
                                                                              generator=gen),
                image_grid_thw=torch.tensor([IMAGE_GRID] * rows), mm_token_type_ids=(ids == VL_TOKENS["image"]).long(),
                labels=labels)


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
    experts = experts_path(family)
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                        exclude_modules=r".*\.(gate|router)$",
                        target_parameters=[f"{experts}.gate_up_proj", f"{experts}.down_proj"])
    return wrap(model, config)


def _train(model) -> list[float]:
    return adamw_losses(model, (vl_batch(100 + step % 4) for step in range(STEPS)), lr=2e-3)


@torch.no_grad()
def _generate(model):
    batch = vl_batch(7)
    batch.pop("labels")
    out = model.eval().generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_vision_language_family_matches_stock(family, tiny_checkpoint):
    path = tiny_checkpoint(family)
    stock, ours = _stock(path), _ours(path)
    assert type(ours) is type(stock) and ours.kt_summary.startswith("kt-sft: ")
    batch = vl_batch(3)
    batch.pop("labels")
    with torch.no_grad():
        ref, got = stock.eval()(**batch).logits, ours.eval()(**batch).logits
        text_only = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert rel_err(got, ref) <= RTOL, f"{family} logits: {rel_err(got, ref):.2e}"
    assert rel_err(text_only, ref) > 1e-2  # the image matters

    stock, ours = _lora(stock, family, stock_get_peft_model), _lora(ours, family, get_peft_model)
    stock_losses, our_losses = _train(stock), _train(ours)
    dev = max(abs(a - b) / abs(b) for a, b in zip(our_losses, stock_losses))
    print(f"[vlm] {family}: logits rel {rel_err(got, ref):.1e}, {STEPS} LoRA steps max rel {dev:.1e}, "
          f"loss {stock_losses[0]:.3f} -> {stock_losses[-1]:.3f}")
    assert dev <= RTOL and our_losses[4] < our_losses[0]
    vision_b = [p for n, p in ours.named_parameters() if "visual" in n and "lora_B" in n]
    assert vision_b and all(p.abs().max() > 0 for p in vision_b), "the vision tower's LoRA must have trained"
    assert torch.equal(_generate(ours), _generate(stock))


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
