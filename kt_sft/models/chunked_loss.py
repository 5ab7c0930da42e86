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
    hidden states the forward hands it (already sliced by `logits_to_keep`) and returns a marker (`_Logits`);
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
code that wrongly expects training-mode logits fails loudly instead of reading something else.

NOTE (what a forward may do between lm_head and the loss): the stand-in's output is `_Logits`, a meta tensor of the
real logits' shape and dtype (so `logits.shape[-1]`, `lm_head.weight.dtype` read as usual) that records the
per-token steps applied to it: scaling (Cohere's logit_scale, Granite's logits_scaling), soft-capping (Gemma's
final_logit_softcapping: divide, tanh, multiply), a dtype cast, a slice of the vocabulary (Inkling's
unpadded_vocab_size); the loss replays them on each chunk's logits, so these models train chunked too. Any other
step (one that mixes tokens, reads values), calling lm_head twice or never calling `loss_function` is refused with
a RuntimeError naming loss_chunk_tokens=0 as the way out.

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
                           num_items_in_batch=None, ignore_index: int = -100, shift_labels=None,
                           steps=()) -> torch.Tensor:
    """ForCausalLMLoss(f(head(hidden)), labels, ...) without materializing more than one chunk of logits; f: the
    per-token `steps` (callables on logits, e.g. soft-capping) in order."""
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
        part = checkpoint(_chunk_ce_sum, head, tuple(steps), vocab_size, ignore_index,  # lm_head's parameters get
                          h[start:start + chunk_tokens], y[start:start + chunk_tokens],  # (zero) gradients
                          use_reentrant=False)
        total = part if total is None else total + part
    if num_items_in_batch is None:
        return total / y.numel()  # cross_entropy's mean over non-ignored targets (nan when there are none)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _chunk_ce_sum(head, steps, vocab_size: int, ignore_index: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h.unsqueeze(0))  # [1, n, V]
    for step in steps:
        logits = step(logits)
    logits = logits.float()  # upcast before the CE as ForCausalLMLoss does
    return F.cross_entropy(logits.view(-1, vocab_size), y, ignore_index=ignore_index, reduction="sum")


# Tensor methods / torch functions that act on each token's logits alone: elementwise with scalars or vocabulary-wide
# tensors, casts, a vocabulary slice (replayable per chunk; `_Logits`), their in-place forms, and what only reads
# metadata.
_PER_TOKEN = {"mul", "div", "add", "sub", "rsub", "neg", "tanh", "clamp", "float", "to", "true_divide", "__getitem__"}
_IN_PLACE = {"mul_", "div_", "add_", "sub_", "neg_", "tanh_", "clamp_"}
_METADATA = {"__get__", "size", "dim", "numel", "is_floating_point", "__len__", "element_size"}


class _Logits(torch.Tensor):
    """lm_head's stand-in output in a chunked training forward (the module's NOTE): a meta tensor of the logits'
    shape and dtype, with the per-token steps applied to it so far (`steps`), for `_Call.loss` to replay."""

    @staticmethod
    def make(meta: torch.Tensor, call: "_Call", steps: list) -> "_Logits":
        out = meta.as_subclass(_Logits)
        out.call, out.steps = call, steps
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if name == "__get__" and getattr(getattr(func, "__self__", None), "__name__", "") == "device":
            marker = args[0]  # where the real logits will be (labels moved there stay real)
            return marker.call.hidden.device
        if name in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        marker = next(a for a in (*args, *kwargs.values()) if isinstance(a, _Logits))
        if name not in _PER_TOKEN | _IN_PLACE or not _per_token(name, args, kwargs, marker):
            raise RuntimeError(marker.call.refusal(f"applies {name} to lm_head's output"))
        step = functools.partial(_replay, func, args, kwargs)
        if name in _IN_PLACE:
            marker.steps.append(step)
            return marker
        with torch._C.DisableTorchFunctionSubclass():
            meta = func(*_meta(args), **_meta(kwargs))
        return cls.make(meta, marker.call, [*marker.steps, step])


def _per_token(name: str, args, kwargs, marker) -> bool:
    """Whether this call acts on each token's logits alone: a slice of the vocabulary only, other tensors of at most
    one dimension (scalars, per-vocabulary values)."""
    if name == "__getitem__":
        index = args[1]
        return isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice)
    others = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a is not marker]
    return all(t.dim() <= 1 for t in others)


def _meta(values):
    """`values` (args tuple or kwargs dict) with every tensor on the meta device (the result's shape and dtype)."""
    convert = lambda v: v.to("meta") if torch.is_tensor(v) and not isinstance(v, _Logits) else v
    return {k: convert(v) for k, v in values.items()} if isinstance(values, dict) else tuple(map(convert, values))


def _replay(func, args, kwargs, logits: torch.Tensor) -> torch.Tensor:
    """One recorded step on a chunk's real logits."""
    put = lambda v: logits if isinstance(v, _Logits) else v
    return func(*map(put, args), **{k: put(v) for k, v in kwargs.items()})


class _DeferredHead(torch.nn.Module):
    """Stands in for lm_head during one training forward: keeps the hidden states, returns the marker (`_Logits`);
    the real head's attributes read through it (HY-V4 casts its input to `lm_head.weight.dtype`)."""

    def __init__(self, call: "_Call"):
        super().__init__()
        object.__setattr__(self, "call", call)  # not a submodule

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.call.head, name)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        call = self.call
        if call.marker is not None:
            raise RuntimeError(call.refusal("calls lm_head more than once per forward"))
        call.hidden = hidden
        weight = call.head.weight  # [V, H] (_wrap chunks only heads that have one)
        meta = torch.empty((*hidden.shape[:-1], weight.shape[0]), dtype=weight.dtype, device="meta")
        call.marker = _Logits.make(meta, call, [])
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
        if not isinstance(logits, _Logits) or logits.call is not self:
            raise RuntimeError(self.refusal("changes lm_head's output before the loss"))
        if self.consumed:
            raise RuntimeError(self.refusal("computes the loss more than once"))
        hidden, self.hidden, self.consumed = self.hidden, None, True
        return chunked_causal_lm_loss(self.head, hidden, labels, vocab_size, self.chunk_tokens,
                                      num_items_in_batch, ignore_index, shift_labels, logits.steps)


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
        weight = getattr(head, "weight", None)
        if labels is None or name is None or self.loss_function is not ForCausalLMLoss or \
                not (torch.is_tensor(weight) and weight.dim() == 2):
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
    """The output as the model builds it with logits=None: the marker's field (the marker or a step of it) removed
    (ModelOutput) or dropped from the tuple (return_dict=False), like any None field."""
    if marker is None:
        return out
    if isinstance(out, tuple):
        return tuple(v for v in out if not isinstance(v, _Logits))
    if isinstance(out, OrderedDict):
        for key in [k for k, v in out.items() if isinstance(v, _Logits)]:
            OrderedDict.__delitem__(out, key)  # ModelOutput forbids `del`; this is what logits=None leaves
            object.__setattr__(out, key, None)
    return out
