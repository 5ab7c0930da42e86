"""Preference training (DPO / KTO) on the engine, in process: the reference forward is the policy under PEFT's
disable_adapter, which switches the engine's expert LoRA terms off too (the base model's logits), and neither it
nor KTO's no_grad KL forward leaves saved activations in the engine. Parity with stock LLaMA-Factory through the
real CLI: test_llamafactory_preference.py."""
import pytest
import torch
from peft import LoraConfig

import kt_sft
from kt_sft.models import expert_lora

FAMILY = "qwen3_moe"
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _policy(path, modules=("q_proj", "v_proj"), **load):
    """The tiny model with LoRA on `modules` and on the routed experts, every factor non-zero."""
    model = kt_sft.load_model(path, device="cpu", dtype=torch.float32, progress=False, **load)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(modules) or None,
                        target_parameters=EXPERTS, init_lora_weights=False)
    return expert_lora.get_peft_model(model, config)


def _layers(model):
    return [m.kt_layer for m in model.modules() if getattr(m, "kt_layer", None) is not None]


def _ids(seed=1, batch=2, seq=12):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("modules", [(), ("q_proj", "v_proj")], ids=["experts_only", "attention_and_experts"])
def test_disable_adapter_gives_the_base_models_logits(tiny_checkpoint, modules):
    from transformers import AutoModelForCausalLM

    path, ids = tiny_checkpoint(FAMILY), _ids()
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(input_ids=ids).logits
        policy = _policy(path, modules).eval()
        adapted = policy(input_ids=ids).logits
        with policy.disable_adapter():
            reference = policy(input_ids=ids).logits
        again = policy(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-3 * base.abs().max()  # the adapter (the expert LoRA alone, too) acts
    assert (reference - base).abs().max() <= 1e-5 * base.abs().max()
    assert torch.equal(again, adapted)  # back on after the context


def _logps(logits, ids):
    return logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)


def _dpo_step(policy, ids):
    """LLaMA-Factory's DPO order: policy forward (grad), reference forward (no_grad, adapter disabled), KTO's KL
    forward (no_grad, adapter on), then backward. Returns the saved forwards per layer after each phase."""
    layers = _layers(policy)
    saved = {}
    chosen = _logps(policy(input_ids=ids).logits, ids)
    saved["policy"] = [layer.saved_forwards for layer in layers]
    with torch.no_grad(), policy.disable_adapter():
        reference = _logps(policy(input_ids=ids).logits, ids)
    with torch.no_grad():
        policy(input_ids=ids)
    saved["reference"] = [layer.saved_forwards for layer in layers]
    saved["retained"] = [len(layer.retained.entries) for layer in layers]
    torch.nn.functional.logsigmoid(0.1 * (chosen - reference)).sum().neg().backward()
    saved["backward"] = [layer.saved_forwards for layer in layers]
    return saved


def _enable_checkpointing(model, by: str) -> None:
    """Reentrant gradient checkpointing as transformers enables it, or as LLaMA-Factory does (its own
    checkpoint function, which checkpoints only layers with trainable parameters)."""
    model.enable_input_require_grads()
    if by == "transformers":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        return
    from llamafactory.model.model_utils.checkpointing import _gradient_checkpointing_enable

    _gradient_checkpointing_enable(model.get_base_model(), {"use_reentrant": True})


@pytest.mark.parametrize("by", ["transformers", "llamafactory"])
def test_reference_forward_saves_nothing_under_reentrant_checkpointing(tiny_checkpoint, by):
    """Reentrant checkpointing (LLaMA-Factory's default): the policy's first pass keeps one forward per layer for
    the recompute; the reference and KL forwards, also no_grad in training mode, keep nothing."""
    policy = _policy(tiny_checkpoint(FAMILY))
    _enable_checkpointing(policy, by)
    saved = _dpo_step(policy.train(), _ids())
    moe_layers = len(_layers(policy))
    assert saved == {"policy": [1] * moe_layers, "reference": [1] * moe_layers, "retained": [1] * moe_layers,
                     "backward": [0] * moe_layers}


def test_reference_forward_keeps_the_policys_saved_chunks(tiny_checkpoint):
    """No checkpointing, chunk_size splitting the batch into as many calls as the layer has slots: the policy's
    forward fills every slot; reference / KL forwards that saved would evict them before the backward."""
    path, ids = tiny_checkpoint(FAMILY), _ids(seq=20)
    policy = _policy(path, chunk_size=8)  # 40 tokens: 5 calls per layer, max_saved 4 grows to 5
    saved = _dpo_step(policy.train(), ids)
    moe_layers = len(_layers(policy))
    assert saved["policy"] == saved["reference"] == [5] * moe_layers and saved["backward"] == [0] * moe_layers
    grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    whole = _policy(path)
    _dpo_step(whole.train(), ids)
    for name, param in whole.named_parameters():
        if param.grad is not None:
            assert torch.allclose(grads[name], param.grad, rtol=1e-5, atol=1e-7), name
