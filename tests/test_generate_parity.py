"""Greedy generation through stock `generate` (KV cache, left-padded batch): our engine equals stock transformers
(+ PEFT) token for token on the tiny model of every family, fp32 path, with and without a LoRA adapter."""
import dataclasses

import pytest
import torch

import kt_sft
from tiny_models import VOCAB

NEW_TOKENS = 12


def _prompts():
    """Two prompts of different lengths, left-padded (pad id 0) as batched generation does."""
    g = torch.Generator().manual_seed(7)
    long = torch.randint(3, VOCAB, (9,), generator=g)
    short = torch.randint(3, VOCAB, (5,), generator=g)
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0], mask[0] = long, 1
    ids[1, 4:], mask[1, 4:] = short, 1
    return ids, mask


def _generate(model, ids, mask):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:]


def _random_adapter(model, path):
    """A LoRA on every attention/dense linear with non-zero B (a fresh adapter would be a no-op), saved as PEFT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(11)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(path)
    return peft_model


def test_greedy_generation_matches_stock(ckpt, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = ckpt
    ids, mask = _prompts()
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = kt_sft.load_model(path, device="cpu", dtype=torch.float32, progress=False).eval()
    base_tokens = _generate(stock, ids, mask)
    assert torch.equal(_generate(ours, ids, mask), base_tokens)

    stock_lora = _random_adapter(stock, tmp_path / "adapter").eval()
    ours_lora = PeftModel.from_pretrained(ours, tmp_path / "adapter").eval()
    lora_tokens = _generate(stock_lora, ids, mask)
    assert not torch.equal(lora_tokens, base_tokens)  # the adapter changes what is generated
    assert torch.equal(_generate(ours_lora, ids, mask), lora_tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_greedy_generation_on_gpu_matches_stock_on_gpu(ckpt, family):
    """Dense layers on the GPU, experts on the engine (the decode path through pinned staging) vs stock on the GPU."""
    from transformers import AutoModelForCausalLM

    ids, mask = (t.cuda() for t in _prompts())
    stock = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).cuda().eval()
    ours = kt_sft.load_model(ckpt, device="cuda", dtype=torch.float32, progress=False).eval()
    assert torch.equal(_generate(ours, ids, mask), _generate(stock, ids, mask))


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
@pytest.mark.parametrize("experts", ["auto", 5], ids=["auto", "fixed"])
def test_long_prefill_through_the_gpu_share_keeps_greedy_outputs(ckpt, experts):
    """Chat / batch predict: a prefill of at least the share's min_tokens runs through the GPU share (here its
    CPU-device path, the same code without streams) with the engine computing the rest, decode steps below the
    threshold stay on the engine; the greedy tokens equal the engine-only run's. "auto" with rates pinned so that
    prefill calls split between the two sides."""
    from kt_sft.engine import GpuShare
    from kt_sft.engine.share_plan import Rates

    ids, mask = _prompts()
    plain = kt_sft.load_model(ckpt, device="cpu", dtype=torch.float32, progress=False).eval()
    want = _generate(plain, ids, mask)
    ours = kt_sft.load_model(ckpt, device="cpu", dtype=torch.float32, progress=False).eval()
    rows = []
    for module in ours.modules():
        if hasattr(module, "kt_layer"):
            share = GpuShare(module.kt_layer, experts, "cpu", min_tokens=ids.numel())  # the prefill only
            # ~2 rows per expert and call: one streamed expert costs as much as 1.5 engine rows
            share.book.rates = Rates([1000.0, 1000.0], [1e9, 1e9], 3 * share.expert_bytes * 1000 / 1.5)
            forward = share.forward
            share.forward = lambda x, *a, _f=forward, **kw: rows.append((x.shape[0], len(a[1]["experts"]))) or \
                _f(x, *a, **kw)
            module.kt_policy = dataclasses.replace(module.kt_policy, share=share)
    assert torch.equal(_generate(ours, ids, mask), want)
    moe_layers = sum(hasattr(m, "kt_layer") for m in ours.modules())
    assert [t for t, _ in rows] == [ids.numel()] * moe_layers  # the prefill's calls, not one decode step
    assert any(0 < n < 8 for _, n in rows), rows  # split: both sides computed
