"""A small, deterministic LoRA training loop shared by the offload parity tests.

`lora_run(model, family, batches)` wraps `model` with PEFT LoRA (r=8, alpha=16, no dropout) on the family's
attention projections and dense / shared-expert MLP linears (never the routed experts), seeds the LoRA init,
trains with AdamW on the given fixed batches (causal-LM loss computed by the model from `labels`) and
records what the parity tests compare: the initial LoRA weights, the flattened LoRA gradient of step 1, and
the loss of every step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model

# LoRA targets per family: attention + dense-layer / shared-expert MLP linears, all plain nn.Linear.
# Not the routers: qwen/mixtral routers are not nn.Linear, and deepseek_v2's `mlp.gate` is an nn.Linear
# whose weight the MoE block reads directly (F.linear(x, self.gate.weight)), so LoRA on it would be bypassed.
_MLP = ["gate_proj", "up_proj", "down_proj"]
LORA_TARGETS = {
    "qwen2_moe": ["q_proj", "k_proj", "v_proj", "o_proj", *_MLP, "shared_expert_gate"],
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj", *_MLP],
    "deepseek_v2": ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", *_MLP],
    "deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", *_MLP],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "glm4_moe": ["q_proj", "k_proj", "v_proj", "o_proj", *_MLP],
    "lfm2_moe": ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"],  # attention, conv, dense
}


@dataclass
class Run:
    losses: list[float]
    lora_init: dict[str, torch.Tensor]  # name -> LoRA A/B weights before the first step
    grad_step1: torch.Tensor  # all LoRA gradients of step 1, flattened in named_parameters order
    grad_names: list[str]
    attn_calls_step1: int  # self_attn forwards in step 1: one per layer, two with checkpointing (recompute)


def make_batches(n: int, *, distinct: int = 4, batch: int = 2, seq: int = 12, vocab: int = 128, pad_id: int = 0,
                 seed: int = 1234):
    """n steps cycling over `distinct` fixed batches (so 20 steps visibly learn them): random ids, row 1
    left-padded by 1..4 tokens, labels = ids with the padding set to -100."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(distinct):
        ids = torch.randint(3, vocab, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        pad = int(torch.randint(1, 5, (1,), generator=gen))
        mask[1, :pad] = 0
        ids = ids.masked_fill(mask == 0, pad_id)
        out.append((ids, mask, ids.masked_fill(mask == 0, -100)))
    return [out[i % distinct] for i in range(n)]


def lora_run(model, family: str, batches, *, lr: float = 1e-3, seed: int = 0,
             gradient_checkpointing: dict | None = None) -> Run:
    """gradient_checkpointing: None (off) or the gradient_checkpointing_kwargs, e.g. {"use_reentrant": False}."""
    model.train()
    if gradient_checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing)
        model.enable_input_require_grads()  # reentrant checkpointing needs inputs that require grad
        assert model.is_gradient_checkpointing
    torch.manual_seed(seed)  # LoRA A init (kaiming) draws from the global RNG, in module order
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS[family])
    peft_model = get_peft_model(model, cfg)
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert named and all("lora_" in n for n, _ in named), "only LoRA weights may train"
    lora_init = {n: p.detach().clone() for n, p in named}
    opt = torch.optim.AdamW([p for _, p in named], lr=lr)
    calls = [0]
    hooks = [m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for n, m in peft_model.named_modules() if n.endswith(".self_attn")]
    losses, grad_step1, calls_step1 = [], None, 0
    for ids, mask, labels in batches:
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        if grad_step1 is None:
            grad_step1 = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten()
                                    for _, p in named])
            calls_step1 = calls[0]
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    for h in hooks:
        h.remove()
    return Run(losses, lora_init, grad_step1, [n for n, _ in named], calls_step1)


def adamw_losses(model, batches, lr: float) -> list[float]:
    """AdamW steps of `model` (training mode) on its trainable parameters, one per batch (model kwargs, labels
    included): the loss of each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
