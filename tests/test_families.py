"""Every transformers family whose fused experts the engine computes, against stock transformers + PEFT, from a rule
derived from the model itself (kt_sft/models/derive.py), and every other family's clear refusal.

  * ALL_FAMILIES (tiny_models.py): a tiny random model with quirky sizes, written by stock save_pretrained: fp32
    logits on a left-padded batch, 8 LoRA steps (attention / dense linears + the routed experts through PEFT
    target_parameters), then greedy generation with the trained adapters, all equal to stock (<= 1e-4 relative)
  * new_families() (tiny_models.py): every other family of the installed transformers (5.6's VLM gemma4 and
    qwen3_omni_moe_thinker; under the newest transformers, `make test-tfnew`, its ~45 families beyond 5.6's) on a
    tiny config shrunk from its default one: the same comparison, or its refusal from config.json alone, naming what
    is missing, equal to the families table's
  * the 7 rule files of configs/ equal what kt-sft derives for their families; registry.TESTED is this table
  * refused families (omni models) fail before any weight is read, naming what is
    missing; the math probe tells every variant of experts_math.VARIANTS apart
  * README.md's family table of the installed transformers is `python -m kt_sft families`'s
~1-2 s per family on 2 cores.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from peft import LoraConfig
from peft import get_peft_model as stock_get_peft_model
from safetensors.torch import load_file, save_file

import kt_sft
from kt_sft import readme_tables
from kt_sft.models import catalog, experts_math, registry
from kt_sft.models.derive import model_class
from kt_sft.models.expert_lora import get_peft_model
from kt_sft.models.registry import fused_projections, load_family_file
from lora_train import adamw_losses, make_batches
from moe_reference import rel_err
from tiny_models import (ALL_FAMILIES, CONFIGS, FAMILIES, VL_FAMILIES, VOCAB, derived_family, experts_path,
                         new_families, refusal, refused_config, tiny_config)

RTOL = 1e-4          # logits and every step's loss, fp32 (measured <= 5e-7)
STEPS = 8
NEW_TOKENS = 8
REPO = CONFIGS.parent


def _stock(path):
    """Stock transformers, through the auto class LLaMA-Factory uses (mistral4: AutoModelForImageTextToText)."""
    from transformers import AutoConfig

    return model_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=torch.float32)


def _ours(path):
    return kt_sft.load_model(path, device="cpu", dtype=torch.float32, progress=False)


def _probe_batch():
    """Batch 2 x 11, row 1 left-padded by 4 tokens."""
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _lora(model, family, wrap):
    experts = experts_path(family)
    torch.manual_seed(5)
    # every linear but the routers (phimoe's router is an nn.Linear subclass returning a tuple, which stock PEFT
    # cannot wrap; the others read their weight directly, so LoRA there would be bypassed anyway; gemma4's router
    # projection is router.proj) and DeepSeek-V4's grouped output projection (o_a_proj: an nn.Linear applied per
    # group of heads, which stock PEFT's LoRA cannot wrap)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                        exclude_modules=r".*\.(gate|router|router\.proj|o_a_proj)$",
                        target_parameters=[f"{experts}.{p}_proj"
                                           for p in fused_projections(derived_family(family).gated)])
    return wrap(model, config)


def _train(model) -> list[float]:
    torch.manual_seed(11)  # phimoe's router samples its top-k in training: the same draws on both sides
    batches = [dict(input_ids=i, attention_mask=m, labels=y) for i, m, y in make_batches(STEPS, seq=10)]
    return adamw_losses(model, batches, lr=5e-3)


@torch.no_grad()
def _generate(model):
    ids, mask = _probe_batch()
    out = model.eval().generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_family_matches_stock(family, tiny_checkpoint):
    _matches_stock(family, tiny_checkpoint(family))


def _matches_stock(family, path):
    stock, ours = _stock(path), _ours(path)
    assert ours.kt_summary.startswith("kt-sft: ") and not ours.kt_summary.startswith("kt-sft: 0 ")
    ids, mask = _probe_batch()
    with torch.no_grad():
        ref = stock.eval()(input_ids=ids, attention_mask=mask).logits
        got = ours.eval()(input_ids=ids, attention_mask=mask).logits
    assert rel_err(got, ref) <= RTOL, f"{family} logits: {rel_err(got, ref):.2e}"

    stock, ours = _lora(stock, family, stock_get_peft_model), _lora(ours, family, get_peft_model)
    stock_losses, our_losses = _train(stock), _train(ours)
    dev = max(abs(a - b) / abs(b) for a, b in zip(our_losses, stock_losses))
    print(f"[families] {family}: logits rel {rel_err(got, ref):.1e}, {STEPS} LoRA steps max rel {dev:.1e}, "
          f"loss {stock_losses[0]:.3f} -> {stock_losses[-1]:.3f}")
    assert dev <= RTOL and our_losses[4] < our_losses[0]  # make_batches cycles over 4 batches: step 5 = step 1's
    expert_b = [p for n, p in ours.named_parameters() if ".experts." in n and "lora_B" in n]
    assert expert_b and all(p.abs().max() > 0 for p in expert_b), "the expert LoRA must have trained"
    assert torch.equal(_generate(ours), _generate(stock))


@pytest.mark.parametrize("family", new_families())
def test_family_of_this_transformers_matches_stock_or_is_refused(family, tiny_checkpoint, tmp_path):
    """Every other family of the installed transformers (those of a newer transformers than 5.6, and 5.6's gemma4 /
    qwen3_omni_moe_thinker) on its generic tiny config (tiny_models.generic_kwargs): the same comparison as above,
    or, where kt-sft refuses it, the load fails from config.json alone naming what is missing, as the families
    table says."""
    why = refusal(family)
    if why is None:
        _matches_stock(family, tiny_checkpoint(family))
        return
    tiny_config(family).save_pretrained(tmp_path)
    with pytest.raises(registry.UnsupportedModelError) as err:
        _ours(tmp_path)
    assert str(err.value) == why
    row = catalog.family_row(family)
    assert (row.status, row.reason) == ("refused", why)


def test_clamped_swiglu_experts_match_stock(tiny_checkpoint, monkeypatch):
    """DeepSeek-V4 / GLM-5 style clamped SwiGLU (transformers' DeepseekV4Experts, newer than 5.6: `self.limit =
    config.swiglu_limit`, gate clamped above, up both ways, then act_fn(gate) * up): qwen3_moe's experts patched so,
    with a limit that clamps a good part of the tiny model's pre-activations, derive to the engine's silu_glu_clamped
    with the module's limit and equal stock."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3

    def clamped_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate.clamp(max=self.limit)) * up.clamp(min=-self.limit, max=self.limit)

    monkeypatch.setattr(qwen3.Qwen3MoeExperts, "_apply_gate", clamped_gate)
    monkeypatch.setattr(qwen3.Qwen3MoeExperts, "limit", 0.5, raising=False)
    family = derived_family("qwen3_moe")
    assert (family.activation, family.limit, family.math.label) == ("silu_clamped", 0.5, "clamped silu glu (limit 0.5)")
    _matches_stock("qwen3_moe", tiny_checkpoint("qwen3_moe"))


def test_expert_ids_past_the_experts_add_nothing(tiny_checkpoint):
    """Router ids >= num_experts (zero / skip experts, expert-parallel sentinels) contribute nothing and get no weight
    gradient, as in transformers' own batched_mm / grouped_mm experts implementations."""
    path = tiny_checkpoint("qwen3_moe")
    stock, ours = _stock(path), _ours(path)
    stock.config._experts_implementation = "batched_mm"
    name = "model.layers.1.mlp.experts"
    ref_mod, our_mod = stock.get_submodule(name), ours.get_submodule(name)
    if hasattr(ref_mod, "_is_expert_parallel"):  # transformers after 5.6 drops such ids under expert parallelism only
        ref_mod._is_expert_parallel = True
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, stock.config.hidden_size, generator=gen)
    ids = torch.randint(0, ref_mod.num_experts, (7, 2), generator=gen)
    ids[::2, 1] = ref_mod.num_experts  # every other token's second slot: past the experts
    out = []
    for module in (ref_mod, our_mod):
        w = torch.rand(7, 2, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
        y = module(x, ids, w)
        y.square().sum().backward()
        out.append((y.detach(), w.grad))
    assert rel_err(out[1][0], out[0][0]) <= RTOL and rel_err(out[1][1], out[0][1]) <= RTOL
    assert not out[1][1][::2, 1].any()


@pytest.mark.parametrize("family", FAMILIES)
def test_derived_rule_equals_the_config_file(family):
    """configs/<family>.yaml (the rule files the registry held before derivation) is exactly what kt-sft derives."""
    written, derived = load_family_file(CONFIGS / f"{family}.yaml"), derived_family(family)
    for field in ("model_type", "experts_module", "checkpoint", "fused_checkpoint", "activation", "gated", "bias",
                  "transposed"):
        assert getattr(derived, field) == getattr(written, field), field
    assert written.defaults == {"format": "bf16", "threads": "auto"} and not derived.defaults  # = the defaults


def test_tested_list_is_this_table():
    """The text families here (hand-written and generic configs), the vision-language ones in test_vlm.py: of
    registry.TESTED (the families of 5.6 and of the newest transformers), those the installed one has."""
    passing = {f for f in new_families() if refusal(f) is None}
    installed = set(catalog.family_model_types())
    assert set(registry.TESTED) & installed == {*ALL_FAMILIES, *VL_FAMILIES, *passing}


def test_pinned_families_are_the_pinned_transformers():
    """catalog.PINNED_FAMILIES (the rows that need no newer transformers) is what LLaMA-Factory's pin has."""
    import transformers

    if transformers.__version__ != catalog.PINNED:
        pytest.skip(f"transformers {transformers.__version__}: the families of {catalog.PINNED} are checked there")
    assert tuple(catalog.family_model_types()) == catalog.PINNED_FAMILIES


def test_prefixed_fused_checkpoint_loads_like_stock(tiny_checkpoint, tmp_path):
    """Qwen3.5-MoE checkpoints keep the language model under `model.language_model.` and its experts fused;
    transformers' PrefixChange drops the prefix, and so do kt-sft's expert keys. Written from the model's state
    dict (newer transformers save these experts per expert)."""
    state = _stock(tiny_checkpoint("qwen3_5_moe_text")).state_dict()
    save_file({re.sub(r"^model\.", "model.language_model.", k): t.contiguous() for k, t in state.items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((tiny_checkpoint("qwen3_5_moe_text") / "config.json").read_text())
    assert any(k.startswith("model.language_model.layers.") and k.endswith("experts.gate_up_proj")
               for k in load_file(tmp_path / "model.safetensors"))
    ids, _ = _probe_batch()
    with torch.no_grad():
        ref, got = _stock(tmp_path).eval()(input_ids=ids).logits, _ours(tmp_path).eval()(input_ids=ids).logits
    assert rel_err(got, ref) <= RTOL


def test_expert_tensors_of_a_layer_the_model_lacks_are_skipped_unread(tiny_checkpoint, tmp_path, caplog):
    """DeepSeek-V3's checkpoints carry an MTP layer past num_hidden_layers, routed experts included: as in stock
    transformers they load nowhere, each named as skipped, none read and held for a conversion of transformers'
    mapping (its experts converter would gather the whole layer's experts to build a parameter the model lacks)."""
    src = tiny_checkpoint("qwen3_moe")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        (tmp_path / shard).symlink_to(src / shard)
    extra = {f"model.layers.9.mlp.experts.{e}.{p}_proj.weight": torch.zeros(16, 64)
             for e in range(2) for p in ("gate", "up")}
    save_file(extra, tmp_path / "mtp.safetensors", metadata={"format": "pt"})
    index["weight_map"].update({k: "mtp.safetensors" for k in extra})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with caplog.at_level("WARNING", logger="kt_sft.loader"):
        _ours(tmp_path)
    assert "4 checkpoint tensors have no place in the model and were skipped (first: model.layers.9.mlp.experts" \
        in caplog.text


# ------------------------------------------------------------------ refused families
# What each refused family's load says (configs: tiny_models.REFUSED_KWARGS).
REFUSED = {
    "qwen3_omni_moe": r"qwen3_omni_moe: omni \(audio / speech\) model .* not supported yet",
}


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_refused_family_says_what_is_missing(family, tmp_path):
    """config.json alone (no weight file): the load fails in its plan, naming the missing variant or model kind,
    and so do LLaMA-Factory's checks (checkpoint_family)."""
    from kt_sft.loader import checkpoint_family

    refused_config(family).save_pretrained(tmp_path)
    with pytest.raises(registry.UnsupportedModelError, match=REFUSED[family]):
        _ours(tmp_path)
    with pytest.raises(registry.UnsupportedModelError, match=REFUSED[family]):
        checkpoint_family(tmp_path)


@pytest.mark.parametrize("row", experts_math.VARIANTS, ids=lambda r: r.label.split(" (")[0].replace(" ", "-"))
def test_math_probe_tells_every_variant_apart(row):
    module = torch.nn.Module()
    module.has_gate = row.gated
    if row.gated:
        module._apply_gate = row
    else:
        module.act_fn = row
    assert experts_math.probe(module) is row
    gap = experts_math.engine_gap(row)
    assert (gap is None) == bool(row.engine) and (gap is None or f"experts math '{row.label}' not supported yet" in gap)


def test_math_probe_reads_the_module_limit():
    """A clamped variant takes the module's own `limit` (DeepSeek-V4's swiglu_limit), probed past it."""
    row = experts_math.variant("silu_clamped", True).with_limit(3.5)
    module = torch.nn.Module()
    module.has_gate, module.limit, module._apply_gate = True, 3.5, row
    found = experts_math.probe(module)
    assert found == row and found.limit == 3.5 and found.label == "clamped silu glu (limit 3.5)"
    assert experts_math.engine_activation(found).limit == 3.5
    module.limit = 12.0  # says 12, clamps at 3.5: no row matches
    assert isinstance(experts_math.probe(module), str)


def test_readme_family_table_is_generated(capsys, monkeypatch):
    """README.md's table of the installed transformers (LLaMA-Factory's pin: every family; a newer one: its
    families beyond the pin's) is `python -m kt_sft families README.md`'s; under a newer transformers, the pin's
    families keep the status the pin's table gives them."""
    heading, text = catalog.readme_table()
    rows = {line.split(" | ")[0].strip("| `"): line for line in catalog.table().splitlines()[2:]}
    tested = {*ALL_FAMILIES, *VL_FAMILIES, *(f for f in new_families() if refusal(f) is None)}
    assert all(rows[f].endswith("| tested |") for f in tested)
    assert rows["gpt_oss"].endswith("| tested |") and "gpt-oss clamped swiglu" in rows["gpt_oss"]
    readme = (REPO / "README.md").read_text()
    assert readme_tables.table_in(readme, heading) == text, (
        f"README.md's table under {heading!r} differs from `python -m kt_sft families`; regenerate it with "
        "`python -m kt_sft families README.md` (in .venv for transformers 5.6, in .venv-tfnew for the newest)")
    pinned = {line.split(" | ")[0].strip("| `"): line.rsplit(" | ", 1)[-1]
              for line in readme_tables.table_in(readme, catalog.HEADING).splitlines()[2:]}
    assert {f: rows[f].rsplit(" | ", 1)[-1] for f in catalog.PINNED_FAMILIES if f in rows} == \
        {f: pinned[f] for f in catalog.PINNED_FAMILIES if f in rows}
    from kt_sft.env import main

    monkeypatch.setattr(catalog, "table", lambda: text)
    assert main(["families"]) == 0 and capsys.readouterr().out == text
