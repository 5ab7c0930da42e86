"""The lfm2_moe family (kt_sft/models/families/lfm2_moe.yaml) against stock transformers + PEFT, fp32.

LFM2-MoE differs from the families of tiny_models.FAMILIES where a registry entry could go wrong: its experts
live at `feed_forward.experts` (not `mlp.experts`), its config names no `hidden_act` (the model code fixes
SiLU), its decoder mixes short-convolution and attention layers, and its router is a sigmoid with an expert
bias. Tiny random checkpoint (3 layers: dense conv, MoE attention, MoE conv), written by save_pretrained."""
import pytest
import torch
from peft import LoraConfig
from peft import get_peft_model as stock_get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import kt_sft
from kt_sft.models import expert_lora
from kt_sft.models.registry import get_family
from lora_train import LORA_TARGETS, lora_run, make_batches
from moe_reference import rel_err
from tiny_models import _reinit, expert_keys_on_disk, shard_files

FAMILY = "lfm2_moe"
EXPERT_PARAMS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp(FAMILY)
    cfg = AutoConfig.for_model(FAMILY, vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                               intermediate_size=48, num_dense_layers=1, layer_types=["conv", "full_attention", "conv"],
                               max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _reinit(model, 0)
    model.save_pretrained(path, max_shard_size="40KB")
    return path


def _stock(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ours(path):
    return kt_sft.load_model(path, device="cpu", dtype=torch.float32, progress=False).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def test_checkpoint_matches_the_registry_entry(ckpt):
    """Per-expert keys on disk follow the entry's templates (layers 1 and 2, 8 experts, over several shards), and
    the config names no activation, so the entry's `activation` is what the loader goes by."""
    assert getattr(AutoConfig.from_pretrained(ckpt), "hidden_act", None) is None
    family = get_family(FAMILY)
    want = {family.checkpoint[p].format(layer=layer, expert=e) for layer in (1, 2) for e in range(8)
            for p in ("gate", "up", "down")}
    assert set(expert_keys_on_disk(ckpt)) == want and len(shard_files(ckpt)) > 1


def test_logits_match_stock_fp32_engine(ckpt):
    ref = _logits(_stock(ckpt), IDS)
    ours = _ours(ckpt)
    assert sorted(expert_lora.engine_experts_modules(ours)) == [f"model.layers.{i}.feed_forward.experts" for i in (1, 2)]
    assert rel_err(_logits(ours, IDS), ref) <= 1e-5


def test_lora_training_matches_stock(ckpt):
    """8 steps of LoRA on attention, convolution and dense linears: the same losses as stock."""
    batches = make_batches(8)
    want, got = lora_run(_stock(ckpt), FAMILY, batches), lora_run(_ours(ckpt), FAMILY, batches)
    assert got.grad_names == want.grad_names and LORA_TARGETS[FAMILY]
    assert torch.nn.functional.cosine_similarity(got.grad_step1, want.grad_step1, dim=0) >= 0.99999
    assert got.losses == pytest.approx(want.losses, rel=1e-4) and got.losses[-1] < got.losses[0]


def test_expert_lora_aliases_follow_the_experts_path(ckpt, tmp_path):
    """`experts` resolves to this family's feed_forward.experts parameters; a vanilla PEFT adapter with expert LoRA
    loads onto the engine with stock's logits, and the engine's expert-LoRA gradients equal stock's."""
    ours = _ours(ckpt)
    assert expert_lora.resolve_expert_targets(ours, ["experts"]) == EXPERT_PARAMS

    def config(targets):
        return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"],
                          target_parameters=targets, init_lora_weights=False)  # non-zero B: the LoRA matters

    torch.manual_seed(5)
    stock = stock_get_peft_model(_stock(ckpt), config(list(EXPERT_PARAMS)))
    stock.save_pretrained(tmp_path / "adapter")
    loaded = expert_lora.load_adapter(_ours(ckpt), tmp_path / "adapter")
    expected = _logits(stock.eval(), IDS)
    assert rel_err(expected, _logits(_stock(ckpt), IDS)) > 1e-3
    assert rel_err(_logits(loaded.eval(), IDS), expected) <= 1e-5

    torch.manual_seed(5)
    trained = expert_lora.get_peft_model(ours, config(["experts"]))
    assert trained.peft_config["default"].target_parameters == EXPERT_PARAMS
    grads = []
    for model in (stock.train(), trained.train()):
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "experts" in n and p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8  # 2 layers x 2 projections x (A, B)
    for name, g in grads[0].items():
        assert rel_err(grads[1][name], g) <= 1e-4, name
