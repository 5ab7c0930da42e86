"""The chunked causal-LM loss (`load_model(loss_chunk_tokens=...)`, kt_sft/models/chunked_loss.py).

For every family, on the tiny fp32 checkpoints: loss and gradients (PEFT LoRA on attention/MLP *and* lm_head,
LoRA B random so every factor matters; the gradient reaching `inputs_embeds`) equal the unpatched model's
(loss_chunk_tokens=0) with padding and extra -100 labels, a chunk (5) smaller than the labelled tokens and not
dividing them, mean reduction and gradient accumulation over two micro-batches with `num_items_in_batch`.
Also: router aux loss, `shift_labels`, tied embeddings; eval / no-grad / label-less calls / generate are stock;
no tensor of tokens x vocab elements is saved for backward and lm_head never sees more than one chunk (and the
same check fails with the feature off); per-token steps between lm_head and the loss (scale, soft-cap, cast,
vocabulary slice) replayed per chunk; refusals and bad arguments.
"""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.loss.loss_utils import ForCausalLMLoss

import kt_sft
from kt_sft.models.chunked_loss import install_chunked_loss
from lora_train import LORA_TARGETS
from moe_reference import rel_err
from tiny_models import VOCAB, make_tiny_model

RTOL = 1e-5  # measured <= 5e-7 (fp32: only the order of the loss summation differs)
CHUNK = 5


def load(path, chunk):
    return kt_sft.load_model(path, device="cpu", dtype=torch.float32, progress=False, loss_chunk_tokens=chunk)


def batch(seed: int, pad: int = 3, seq: int = 12):
    """[2, seq] ids, row 1 left-padded by `pad`; labels -100 on the padding and on two more tokens of row 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 4:6] = -100
    return ids, mask, labels


def with_lora(model, family):
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                     target_modules=[*LORA_TARGETS[family], "lm_head"])
    return get_peft_model(model, cfg)


def grads_of(peft_model, family, micro_batches, num_items=None, **kw):
    """Loss per micro-batch, LoRA grads (accumulated) and each micro-batch's inputs_embeds grad."""
    peft_model.train()
    embed = peft_model.get_input_embeddings()
    losses, input_grads = [], []
    for ids, mask, labels in micro_batches:
        x = embed(ids).detach().requires_grad_()
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        out = peft_model(inputs_embeds=x, attention_mask=mask, labels=labels, **extra, **kw)
        out.loss.backward()
        losses.append(out.loss.detach())
        input_grads.append(x.grad)
    lora = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora and any("lm_head" in n for n in lora), "lm_head must carry LoRA (PEFT wraps it after loading)"
    return torch.stack(losses), lora, torch.stack(input_grads)


def assert_same(ours, ref, what):
    (loss, lora, gx), (loss_r, lora_r, gx_r) = ours, ref
    assert rel_err(loss, loss_r) <= RTOL, (what, loss, loss_r)
    assert sorted(lora) == sorted(lora_r)
    worst = max(lora, key=lambda n: rel_err(lora[n], lora_r[n]))
    assert rel_err(lora[worst], lora_r[worst]) <= RTOL, (what, worst)
    assert rel_err(gx, gx_r) <= RTOL, (what, "inputs_embeds grad")


# ------------------------------------------------------------------ parity with the unpatched model
def test_loss_and_gradients_match_unpatched(family, ckpt):
    """Mean reduction on one micro-batch, and gradient accumulation over two micro-batches whose loss is the
    sum over tokens / num_items_in_batch (as the Trainer passes it): loss, LoRA and input grads within 1e-5."""
    ref_model, model = with_lora(load(ckpt, 0), family), with_lora(load(ckpt, CHUNK), family)
    one = [batch(1)]
    two = [batch(2, pad=1), batch(3, pad=4)]
    num_items = sum(int((l[:, 1:] != -100).sum()) for _, _, l in two)  # 19 + 16 labelled tokens, odd vs CHUNK
    for micro, n in ((one, None), (two, torch.tensor(num_items))):
        for m in (ref_model, model):
            m.zero_grad(set_to_none=True)
        ref = grads_of(ref_model, family, micro, n)
        assert_same(grads_of(model, family, micro, n), ref, f"{family} num_items={n}")


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_router_aux_loss_still_added_by_the_model(family, ckpt):
    """output_router_logits: the model's own forward adds router_aux_loss_coef * aux_loss to our loss."""
    outs = []
    for chunk in (0, CHUNK):
        model = load(ckpt, chunk).train()
        ids, mask, labels = batch(4)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        outs.append((out.loss.detach(), out.aux_loss.detach(), grads))
    assert outs[1][1] > 0 and rel_err(outs[1][1], outs[0][1]) <= RTOL
    assert rel_err(outs[1][0], outs[0][0]) <= RTOL and rel_err(outs[1][2], outs[0][2]) <= RTOL


def test_shift_labels_and_tied_embeddings():
    """`shift_labels` (already shifted, used as given) and a lm_head tied to the embeddings (full fine-tuning
    grads on the shared weight) match stock ForCausalLMLoss; the stand-in never leaks into the module tree."""
    ref = make_tiny_model("qwen3_moe", tie_word_embeddings=True).train()
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    model = copy.deepcopy(ref)
    install_chunked_loss(model, CHUNK)
    ids, mask, labels = batch(5)
    shift = torch.randint(0, VOCAB, labels.shape, generator=torch.Generator().manual_seed(9))
    shift[0, :4] = -100
    for m in (ref, model):
        m(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift).loss.backward()
    ours = model(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift).loss
    stock = ref(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift).loss
    assert rel_err(ours, stock) <= RTOL
    assert rel_err(model.lm_head.weight.grad, ref.lm_head.weight.grad) <= RTOL
    assert model.lm_head is model.get_output_embeddings() and isinstance(model.lm_head, torch.nn.Linear)
    assert "_loss_function" not in model.__dict__ and model.loss_function is ForCausalLMLoss


# ------------------------------------------------------------------ where it is off
def test_eval_no_grad_label_less_and_generate_are_stock(tiny_checkpoint):
    ref, model = load(tiny_checkpoint("deepseek_v2"), 0), load(tiny_checkpoint("deepseek_v2"), CHUNK)
    ids, mask, labels = batch(6)
    with torch.no_grad():
        for m in (ref, model):
            m.eval()
        a, b = ref(input_ids=ids, attention_mask=mask, labels=labels), model(input_ids=ids, attention_mask=mask,
                                                                          labels=labels)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
        gen = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
               for m in (ref, model)]
        assert torch.equal(gen[0], gen[1])
        model.train()  # training mode, grad off (e.g. a reentrant checkpoint's first pass): stock
        assert model(input_ids=ids, attention_mask=mask, labels=labels).logits.shape == (2, 12, VOCAB)
    out = model(input_ids=ids, attention_mask=mask)  # training, grad on, no labels: real logits
    assert torch.allclose(out.logits, a.logits, rtol=1e-5, atol=1e-5) and out.loss is None
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and "logits" not in out and out.loss is not None
    assert len(model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)) == len(out.to_tuple())
    errors = []  # logits_to_keep stays the model's business: with labels it fails the same way as stock
    for m in (ref.train(), model):
        with pytest.raises(ValueError, match="batch_size") as err:
            m(input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=1)
        errors.append(str(err.value))
    assert errors[0] == errors[1]
    install_chunked_loss(model, 0)  # off again: the class forward, real logits
    assert "forward" not in model.__dict__
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits.shape == (2, 12, VOCAB)


# ------------------------------------------------------------------ memory: what backward keeps
@pytest.mark.parametrize("chunk", [CHUNK, 0], ids=["chunked", "off"])
def test_no_tokens_x_vocab_tensor_is_saved_for_backward(chunk, tiny_checkpoint):
    """With the feature on nothing of >= tokens x vocab elements, and no logits-shaped tensor at all, is saved for
    backward (every chunk's logits are recomputed), and lm_head outputs at most chunk x vocab elements, in the
    forward and once more per chunk in the backward recompute; off, stock saves the full log-softmax (this case
    asserts that the same check does see it)."""
    model = load(tiny_checkpoint("glm4_moe"), chunk).train()
    ids, mask, labels = batch(7)
    tokens = ids.numel()
    saved, head_out = [], []
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved weights are not activations

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved.append(t.shape)
        return t

    model.lm_head.register_forward_hook(lambda mod, inp, out: head_out.append(out.numel()))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    largest = max(s.numel() for s in saved)
    logit_sized = [s for s in saved if s and s[-1] == VOCAB]  # no activation but logits has a vocab-wide dim
    if chunk:
        assert largest < tokens * VOCAB and not logit_sized, (largest, logit_sized)
        labelled = int((labels[:, 1:] != -100).sum())
        assert 0 < max(head_out) <= chunk * VOCAB and len(head_out) == 2 * -(-labelled // chunk)
    else:
        assert largest >= tokens * VOCAB and logit_sized and max(head_out) == tokens * VOCAB


# ------------------------------------------------------------------ refusals and bad input
@pytest.mark.parametrize("bad", [-1, 1.5, "8", True, None])
def test_bad_loss_chunk_tokens(bad, tiny_checkpoint):
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        load(tiny_checkpoint("qwen3_moe"), bad)
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        install_chunked_loss(torch.nn.Linear(2, 2), bad)


class _Toy(torch.nn.Module):
    """A causal LM whose forward applies `post` to the logits before the loss (soft-capping models and the like)."""

    def __init__(self, post):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.lm_head, self.post = torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB), post

    loss_function = property(lambda self: self.__dict__.get("_loss_function", ForCausalLMLoss))

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, labels=None):
        logits = self.post(self.lm_head(self.embed(input_ids)))
        return (None if labels is None else self.loss_function(logits, labels, logits.shape[-1])), logits


# Per-token steps between lm_head and the loss that the chunked loss replays per chunk (Cohere's scale, Gemma's
# soft-capping, a cast and per-vocabulary scale, Inkling's vocabulary slice, in-place forms).
PER_TOKEN_STEPS = {
    "scale": lambda t: t * 2.0,
    "softcap": lambda t: torch.tanh(t / 3.0) * 3.0,
    "cast-vocab-scale-slice": lambda t: (t.float() * torch.linspace(0.5, 1.5, VOCAB))[..., :VOCAB - 8],
    "in-place": lambda t: t.div_(2.0).add_(0.5),
}


@pytest.mark.parametrize("post", PER_TOKEN_STEPS.values(), ids=PER_TOKEN_STEPS.keys())
def test_per_token_steps_after_lm_head_are_replayed(post):
    ids = torch.randint(0, VOCAB - 8, (2, 9), generator=torch.Generator().manual_seed(3))
    results = []
    for chunk in (0, CHUNK):
        toy = _Toy(post).train()
        install_chunked_loss(toy, chunk)
        out = toy(ids, ids)  # (loss, logits); (loss,) when chunked: logits=None, dropped as any None
        out[0].backward()
        assert len(out) == (1 if chunk else 2)
        results.append((out[0].detach(), toy.lm_head.weight.grad, toy.embed.weight.grad))
    for ours, ref in zip(*results):
        assert rel_err(ours, ref) <= RTOL


@pytest.mark.parametrize("post, what", [(lambda t: t.cumsum(1), "applies cumsum"),
                                        (lambda t: t - t.mean(1, keepdim=True), "applies mean")])
def test_steps_mixing_tokens_after_lm_head_are_refused(post, what):
    toy = _Toy(post).train()
    ids = torch.randint(0, VOCAB, (1, 6))
    stock_loss, logits = toy(ids, ids)
    install_chunked_loss(toy, CHUNK)
    with pytest.raises(RuntimeError, match=f"{what} to lm_head's output.*loss_chunk_tokens=0"):
        toy(ids, ids)
    assert toy.lm_head.__class__ is torch.nn.Linear and "_loss_function" not in toy.__dict__  # restored
    assert torch.equal(toy(ids)[1], logits)  # label-less: stock


def test_llamafactory_asft_loss_keeps_real_logits(tiny_checkpoint):
    """LLaMA-Factory's ASFT loss reads the logits of the training forward (labels passed along): such runs load
    with loss_chunk_tokens=0; other runs get load_model's default."""
    from types import SimpleNamespace

    pytest.importorskip("llamafactory", reason="LLaMA-Factory is not installed (make test-tfnew's venv)")
    from kt_sft.llamafactory import config as ktc
    from kt_sft.llamafactory.loading import load_for_llamafactory

    path = tiny_checkpoint("qwen3_moe")
    model_args = SimpleNamespace(use_kt=True, model_name_or_path=str(path))
    for asft, wrapped in ((True, False), (False, True)):
        finetuning = SimpleNamespace(finetuning_type="lora", stage="sft", use_asft_loss=asft)
        settings = ktc.resolve({"kt_backend": "FP32"}, model_args, finetuning)
        assert settings.loss_chunk_tokens == (0 if asft else None)
        model = load_for_llamafactory(path, {"dtype": torch.float32, "device_map": "cpu"}, model_args, settings,
                                      True)
        assert ("forward" in model.__dict__) is wrapped
