"""Greedy generation through stock `generate` (KV cache, left-padded batch): our engine equals stock transformers
(+ PEFT) token for token on the tiny model of every family, fp32 path, with and without a LoRA adapter."""
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
