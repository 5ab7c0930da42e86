"""Causal-LM training loss without the full [tokens, vocab] logits.

NOTE (why): in LoRA training the largest GPU tensors are not the model's activations but the loss's. Stock
transformers computes `logits = lm_head(hidden)` for every token ([B, T, V] in bf16: 0.84 GB for DeepSeek-V2-Lite
at 2 x 2048 tokens, V = 102400), then ForCausalLMLoss upcasts it (`.float()`, 1.7 GB), log-softmaxes it (1.7 GB,
kept for backward) and backward adds gradients of the same sizes; the bf16 logits also stay alive in the output
until the step ends. That is most of the GPU peak of a kt-sft step, since the routed experts live on the CPU.

NOTE (how): `install_chunked_loss(model, chunk_tokens)` (done by `kt_sft.load_model(loss_chunk_tokens=...)`)
replaces `model.forward` on the instance with a wrapper that, only when it is safe to, runs the model's own
forward with two stand-ins swapped in for the duration of that call:
  * the lm_head child (looked up at call time through `get_output_embeddings()`, so a PEFT LoRA layer or
    modules_to_save wrapper installed after loading is what gets used) is replaced by a stand-in that keeps the
    hidden states the forward hands it (already sliced by `logits_to_keep`) and returns an empty marker tensor;
  * `loss_function` is replaced by one that, given that marker, computes transformers 5.6's ForCausalLMLoss from
    the kept hidden states: labels shifted with ignore_index (or `shift_labels` as given), tokens whose label is
    ignored are dropped (their loss and gradient are zero anyway), then per chunk of at most `chunk_tokens`
    tokens `lm_head(h_chunk).float()` -> cross-entropy sum, each chunk inside `torch.utils.checkpoint`
    (non-reentrant), so a chunk's logits exist only while that chunk is computed and are recomputed in backward,
    never stored. The sum is divided by `num_items_in_batch` when given (gradient accumulation), else by the
    number of labelled tokens (= the "mean" reduction), exactly as ForCausalLMLoss does.
Everything else stays the model's own forward: the base model, `logits_to_keep`, the router aux loss that
Mixtral / Qwen-MoE add to the loss when output_router_logits, the output class. lm_head's hooks (e.g.
LLaMA-Factory's upcast_lmhead_output) run on every chunk call. No per-family code.

Active only when: chunk_tokens > 0, the model is in training mode, grad is enabled, `labels` is given (stock
computes no loss without it; `shift_labels` alone means no loss either) and `loss_function` is stock
ForCausalLMLoss (a custom one gets the real logits). Otherwise the call is the stock forward, unchanged: eval,
`generate`, predict-with-generate, chat and Trainer paths that pop `labels` to compute their own loss from the
logits (label smoothing, compute_loss_func) see real logits.

When active the output's `logits` is None (as if the model had returned none; absent from `to_tuple()`), so
code that wrongly expects training-mode logits fails loudly instead of reading something else. A model whose
forward changes the logits between lm_head and the loss (e.g. soft-capping), calls lm_head twice or never
calls `loss_function` is refused with a RuntimeError naming loss_chunk_tokens=0 as the way out.

Memory per chunk is about 12 bytes x chunk_tokens x vocab (fp32 logits + saved log-softmax + its gradient,
bf16 logits and gradient), against the same for the whole micro-batch (plus the kept bf16 logits) in stock.
Cost: lm_head's forward runs twice (the recompute), about +1/3 of lm_head's FLOPs.
"""
from __future__ import annotations

import functools
import inspect
import types
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.loss.loss_utils import ForCausalLMLoss

DEFAULT_CHUNK_TOKENS = 1024
_ATTR = "_kt_loss_chunk_tokens"


def check_chunk_tokens(value, name: str = "loss_chunk_tokens") -> int:
    """A non-negative int (0 = off); a bool, float, string or negative number is a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int (tokens per lm_head/loss chunk; 0 = off), "
                         f"got {value!r}")
    return value


def install_chunked_loss(model: torch.nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
    """Compute `model`'s training loss in chunks of `chunk_tokens` tokens (0 removes the wrapper again)."""
    chunk_tokens = check_chunk_tokens(chunk_tokens)
    ours = getattr(model.__dict__.get("forward"), "_kt_chunked_loss", False)
    if not chunk_tokens:
        if ours:
            del model.__dict__["forward"]
        model.__dict__.pop(_ATTR, None)
        return
    if "forward" in model.__dict__ and not ours:
        raise RuntimeError("install_chunked_loss: this model's forward is already replaced on the instance; "
                           "install the chunked loss before other forward wrappers")
    if not ours:
        model.forward = types.MethodType(_wrap(type(model).forward), model)
    model.__dict__[_ATTR] = chunk_tokens


def chunked_causal_lm_loss(head, hidden: torch.Tensor, labels, vocab_size: int, chunk_tokens: int,
                           num_items_in_batch=None, ignore_index: int = -100, shift_labels=None) -> torch.Tensor:
    """ForCausalLMLoss(head(hidden), labels, ...) without materializing more than one chunk of logits."""
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    y = shift_labels.reshape(-1).to(h.device)
    if y.numel() != h.shape[0]:  # what cross_entropy says on stock's flattened logits
        raise ValueError(f"Expected input batch_size ({h.shape[0]}) to match target batch_size ({y.numel()}).")
    keep = (y != ignore_index).nonzero().squeeze(1)
    h, y = h.index_select(0, keep), y.index_select(0, keep)
    total = None
    for start in range(0, max(y.numel(), 1), chunk_tokens):  # one (maybe empty) chunk at least: lm_head's
        part = checkpoint(_chunk_ce_sum, head, vocab_size, ignore_index,  # parameters get (zero) gradients
                          h[start:start + chunk_tokens], y[start:start + chunk_tokens], use_reentrant=False)
        total = part if total is None else total + part
    if num_items_in_batch is None:
        return total / y.numel()  # cross_entropy's mean over non-ignored targets (nan when there are none)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _chunk_ce_sum(head, vocab_size: int, ignore_index: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h.unsqueeze(0)).float()  # [1, n, V], upcast before the CE as ForCausalLMLoss does
    return F.cross_entropy(logits.view(-1, vocab_size), y, ignore_index=ignore_index, reduction="sum")


class _DeferredHead(torch.nn.Module):
    """Stands in for lm_head during one training forward: keeps the hidden states, returns the marker."""

    def __init__(self, call: "_Call"):
        super().__init__()
        object.__setattr__(self, "call", call)  # not a submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        call = self.call
        if call.marker is not None:
            raise RuntimeError(call.refusal("calls lm_head more than once per forward"))
        call.hidden = hidden
        call.marker = hidden.new_empty((*hidden.shape[:-1], 0))
        return call.marker


class _Call:
    """One chunked training forward: the real head, the kept hidden states and the marker handed out."""

    def __init__(self, model, head, chunk_tokens: int):
        self.model_name, self.head, self.chunk_tokens = type(model).__name__, head, chunk_tokens
        self.hidden = self.marker = None
        self.consumed = False

    def refusal(self, what: str) -> str:
        return (f"chunked loss (kt_sft load_model loss_chunk_tokens={self.chunk_tokens}): {self.model_name}'s "
                f"forward {what}, which the chunked loss cannot reproduce; load with loss_chunk_tokens=0")

    def loss(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
             **kwargs):
        if self.marker is None:  # lm_head was never called through the stand-in: real logits, stock loss
            return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels,
                                   **kwargs)
        if logits is not self.marker:
            raise RuntimeError(self.refusal("changes lm_head's output before the loss"))
        if self.consumed:
            raise RuntimeError(self.refusal("computes the loss more than once"))
        hidden, self.hidden, self.consumed = self.hidden, None, True
        return chunked_causal_lm_loss(self.head, hidden, labels, vocab_size, self.chunk_tokens,
                                      num_items_in_batch, ignore_index, shift_labels)


def _wrap(cls_forward):
    params = list(inspect.signature(cls_forward).parameters)
    labels_at = params.index("labels") - 1 if "labels" in params else None  # positional index after self

    @functools.wraps(cls_forward)  # keeps the signature (generate's logits_to_keep check, Trainer's columns)
    def forward(self, *args, **kwargs):
        chunk_tokens = self.__dict__.get(_ATTR, 0)
        if not (chunk_tokens and self.training and torch.is_grad_enabled()):
            return cls_forward(self, *args, **kwargs)
        labels = kwargs.get("labels")
        if labels is None and labels_at is not None and len(args) > labels_at:
            labels = args[labels_at]
        head = self.get_output_embeddings()
        name = next((n for n, m in self._modules.items() if m is head), None) if head is not None else None
        if labels is None or name is None or self.loss_function is not ForCausalLMLoss:
            return cls_forward(self, *args, **kwargs)
        call = _Call(self, head, chunk_tokens)
        had_loss_fn, old_loss_fn = "_loss_function" in self.__dict__, self.__dict__.get("_loss_function")
        self._modules[name] = _DeferredHead(call)
        self.__dict__["_loss_function"] = call.loss
        try:
            out = cls_forward(self, *args, **kwargs)
        finally:
            self._modules[name] = head
            if had_loss_fn:
                self.__dict__["_loss_function"] = old_loss_fn
            else:
                del self.__dict__["_loss_function"]
        if call.marker is not None and not call.consumed:
            raise RuntimeError(call.refusal("does not pass lm_head's output to loss_function"))
        return _without(out, call.marker)

    forward._kt_chunked_loss = True
    return forward


def _without(out, marker):
    """The output as the model builds it with logits=None: the marker's field removed (ModelOutput) or dropped
    from the tuple (return_dict=False), like any None field."""
    if marker is None:
        return out
    if isinstance(out, tuple):
        return tuple(v for v in out if v is not marker)
    if isinstance(out, OrderedDict):
        for key in [k for k, v in out.items() if v is marker]:
            OrderedDict.__delitem__(out, key)  # ModelOutput forbids `del`; this is what logits=None leaves
            object.__setattr__(out, key, None)
    return out
