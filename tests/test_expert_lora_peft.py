"""LoRA on the routed experts through PEFT's `target_parameters`, computed by the engine, against stock
transformers + PEFT (fp32), for every family (conftest.py `family`, `ckpt`): loading a vanilla adapter, 20 training
steps, saving in PEFT's own format, and the `experts` alias resolving to the family's experts module (registry
`experts_module`: mlp.experts, lfm2_moe feed_forward.experts)."""
import pytest
import torch
from peft import LoraConfig, PeftModel
from peft import get_peft_model as stock_get_peft_model

import kt_sft
from kt_sft.models import expert_lora
from lora_train import LORA_TARGETS, make_batches
from moe_reference import rel_err
from tiny_models import MOE_LAYERS, experts_path


def expert_params(family):
    """PEFT target_parameters naming the family's fused expert weights."""
    return [f"{experts_path(family)}.gate_up_proj", f"{experts_path(family)}.down_proj"]


def _stock(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _ours(path):
    return kt_sft.load_model(path, device="cpu", dtype=torch.float32, progress=False)


def _config(family, targets=None, **kwargs):
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[family][:4],
                      target_parameters=targets or expert_params(family), **kwargs)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_vanilla_adapter_loads_onto_the_engine(ckpt, family, tmp_path):
    path = ckpt
    torch.manual_seed(0)
    stock = stock_get_peft_model(_stock(path), _config(family, init_lora_weights=False))  # non-zero B everywhere
    stock.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    ours = expert_lora.load_adapter(_ours(path), tmp_path / "adapter")
    assert all(m.lora_A["default"].weight.device.type == "cpu" for m in ours.modules() if hasattr(m, "parameter_name"))
    expected, got = _logits(stock.eval(), ids), _logits(ours.eval(), ids)
    base = _logits(_stock(path).eval(), ids)
    assert (expected - base).abs().max() > 1e-3  # the expert LoRA matters
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def _train(peft_model, steps=20):
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in named], lr=2e-3)
    losses, grads = [], None
    peft_model.train()
    for ids, mask, labels in make_batches(steps):
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        if grads is None:
            grads = {n: p.grad.detach().clone() for n, p in named if "experts" in n}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads


def test_training_matches_stock_and_saves_peft_format(ckpt, family, tmp_path):
    path = ckpt
    torch.manual_seed(3)
    stock = stock_get_peft_model(_stock(path), _config(family))
    torch.manual_seed(3)
    ours = expert_lora.get_peft_model(_ours(path), _config(family))
    stock_losses, stock_grads = _train(stock)
    our_losses, our_grads = _train(ours)
    assert our_grads.keys() == stock_grads.keys() and len(our_grads) == 4 * len(MOE_LAYERS[family])
    for name in stock_grads:  # step 1: lora_B starts at zero, so every lora_A gradient is exactly zero
        if stock_grads[name].abs().max() == 0:
            assert our_grads[name].abs().max() == 0, name
            continue
        cos = torch.nn.functional.cosine_similarity(our_grads[name].flatten(), stock_grads[name].flatten(), dim=0)
        assert cos >= 0.999, name
    for a, b in zip(our_losses, stock_losses):
        assert a == pytest.approx(b, rel=1e-4)
    assert our_losses[-1] < our_losses[0]

    ours.save_pretrained(tmp_path / "ours")  # vanilla PEFT on stock transformers reproduces our logits
    reloaded = PeftModel.from_pretrained(_stock(path), tmp_path / "ours").eval()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    expected = _logits(reloaded, ids)
    assert (_logits(ours.eval(), ids) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_experts_alias_follows_the_experts_path(ckpt, family):
    """`experts` resolves to the family's own experts parameters, and a LoRA config naming it trains them (the
    resolved target_parameters are the full names PEFT saves), with stock PEFT's gradients on those names."""
    ours = _ours(ckpt)
    assert expert_lora.resolve_expert_targets(ours, ["experts"]) == expert_params(family)
    torch.manual_seed(5)
    stock = stock_get_peft_model(_stock(ckpt), _config(family, init_lora_weights=False))
    torch.manual_seed(5)
    trained = expert_lora.get_peft_model(ours, _config(family, ["experts"], init_lora_weights=False))
    assert trained.peft_config["default"].target_parameters == expert_params(family)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (stock.train(), trained.train()):
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if ".experts." in n and p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4 * len(MOE_LAYERS[family])  # A, B x 2 params
    for name, g in grads[0].items():
        assert rel_err(grads[1][name], g) <= 1e-4, name


def test_unknown_expert_target_lists_the_expert_parameters(tiny_checkpoint):
    model = _ours(tiny_checkpoint("qwen3_moe"))
    with pytest.raises(ValueError, match=r"matches no routed-expert parameter.*model\.layers\.1\.mlp\.experts\."
                                         r"gate_up_proj"):
        expert_lora.get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["w13"]))


def test_merge_is_refused(tiny_checkpoint):
    ours = expert_lora.get_peft_model(_ours(tiny_checkpoint("qwen3_moe")), _config("qwen3_moe"))
    with pytest.raises(NotImplementedError, match="serve the adapter unmerged"):
        ours.merge_and_unload()
