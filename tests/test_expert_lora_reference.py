"""PEFT 0.18.1 `target_parameters` LoRA on transformers 5.6 fused experts == tests/expert_lora_reference.py.

Pins (fp32, CPU, the tiny model of every family of tiny_models.FAMILIES, built in memory, no downloads):
  * nesting / shapes / saved keys / adapter_config of LoraConfig(target_parameters=[gate_up_proj, down_proj]),
  * forward of the PEFT-wrapped experts module == unfused per-expert reference (and the merged-weight form),
  * autograd grads of lora_A/lora_B/x through PEFT == through the reference == the hand-written backward,
  * save -> PeftModel.from_pretrained round trip, and an adapter file written from per-expert factors
    (what an engine would save) loads into vanilla PEFT and reproduces the logits,
  * the ParamWrapper restrictions (dropout / DoRA / lora_bias raise).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from expert_lora_reference import (  # noqa: E402
    ExpertLora, expert_lora_from_module, expert_lora_from_state_dict, experts_with_lora,
    experts_with_lora_grads, merged_expert_weights, peft_adapter_keys, split_peft_lora, to_peft_state_dict,
    pack_peft_lora,
)
from tiny_models import EXPERTS, HIDDEN, MOE_INTER, TOP_K, VOCAB, experts_path, make_tiny_model  # noqa: E402

H, E, I, K, V = HIDDEN, EXPERTS, MOE_INTER, TOP_K, VOCAB  # 2I = 32 != H, so any transposition mistake changes shapes
R = 3


def _targets(family: str) -> list[str]:
    return [f"{experts_path(family)}.gate_up_proj", f"{experts_path(family)}.down_proj"]


def _peft(family: str, seed: int = 0, randomize: bool = True, **lora_kw):
    kw = dict(r=R, lora_alpha=2 * R, target_modules=["q_proj", "o_proj"], target_parameters=_targets(family))
    kw.update(lora_kw)
    pm = get_peft_model(make_tiny_model(family, seed=seed), LoraConfig(**kw))
    if randomize:  # non-zero lora_B: otherwise a fresh adapter is an exact no-op
        gen = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return pm


def _experts_modules(pm):
    """{saved prefix: outer ParamWrapper} for every experts module of a PeftModel."""
    return {n: m for n, m in pm.named_modules() if n.endswith(".experts") and type(m).__name__ == "ParamWrapper"}


def _routing(T: int, gen):
    ids = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(T)])  # expert E-1 gets no token
    w = torch.softmax(torch.randn(T, K, generator=gen), -1)
    return ids, w


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------------------------------------------

def test_layout_nesting_init_and_saved_keys(family, tmp_path):
    pm = _peft(family, randomize=False)
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # B = 0 at init -> a fresh adapter is a no-op (target_modules LoRA is too)
        assert torch.equal(pm(ids).logits, make_tiny_model(family)(ids).logits)
    experts = _experts_modules(pm)
    assert experts
    for name, outer in experts.items():
        inner = outer.base_layer
        # one ParamWrapper per parameter, nested in registration order: down_proj wraps gate_up_proj
        assert (outer.parameter_name, inner.parameter_name) == ("down_proj", "gate_up_proj")
        assert type(inner.base_layer).__name__.endswith(("Experts", "NaiveMoe"))
        # PEFT reads W [E, d1, d2] as (num_experts, in_features, out_features) = (E, d1, d2)
        assert (inner.num_experts, inner.in_features, inner.out_features) == (E, 2 * I, H)
        assert (outer.num_experts, outer.in_features, outer.out_features) == (E, H, I)
        assert inner.lora_A["default"].weight.shape == (R * E, 2 * I)
        assert inner.lora_B["default"].weight.shape == (H, R * E)
        assert outer.lora_A["default"].weight.shape == (R * E, H)
        assert outer.lora_B["default"].weight.shape == (I, R * E)
        assert inner.scaling["default"] == outer.scaling["default"] == 2.0
        for w in (inner, outer):
            assert torch.count_nonzero(w.lora_B["default"].weight) == 0
            bound = w.in_features ** -0.5  # kaiming_uniform(a=sqrt(5)) on [r*E, d1]: U(-1/sqrt(d1), 1/sqrt(d1))
            a = w.lora_A["default"].weight
            assert 0.5 * bound < a.abs().max() <= bound
            assert w.get_param() is getattr(inner.base_layer, w.parameter_name)  # unparametrized outside forward
    pm.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == sorted(_targets(family)) and cfg["lora_dropout"] == 0.0
    expected = {}
    for name in experts:
        keys = peft_adapter_keys(name)
        assert keys["gate_up_proj"] == (name + ".base_layer.lora_A.weight", name + ".base_layer.lora_B.weight")
        assert keys["down_proj"] == (name + ".lora_A.weight", name + ".lora_B.weight")
        expected.update({keys["gate_up_proj"][0]: (R * E, 2 * I), keys["gate_up_proj"][1]: (H, R * E),
                         keys["down_proj"][0]: (R * E, H), keys["down_proj"][1]: (I, R * E)})
    assert {k: tuple(v.shape) for k, v in sd.items() if ".experts." in k} == expected
    assert all(".self_attn." in k for k in sd if k not in expected)


def test_single_param_targeted_has_no_base_layer_in_key():
    pm = _peft("qwen3_moe", target_modules=[], target_parameters=["experts.down_proj"])
    names = [n for n, _ in pm.named_parameters() if "lora_" in n]
    assert names and all(".mlp.experts.lora_" in n for n in names)
    name = next(iter(_experts_modules(pm)))
    assert peft_adapter_keys(name, ["down_proj"])["down_proj"][0] == name + ".lora_A.weight"


@pytest.mark.parametrize("kw", [dict(lora_dropout=0.1), dict(use_dora=True), dict(lora_bias=True)])
def test_param_wrapper_restrictions(kw):
    with pytest.raises(ValueError, match="ParamWrapper does not work with"):
        _peft("qwen3_moe", randomize=False, **kw)


def test_split_pack_roundtrip():
    a, b = torch.randn(R * E, 7), torch.randn(5, R * E)
    A, B = split_peft_lora(a, b, E)
    assert torch.equal(A[2], a[2 * R:3 * R]) and torch.equal(B[2], b[:, 2::E])
    a2, b2 = pack_peft_lora(A, B)
    assert torch.equal(a2, a) and torch.equal(b2, b)


# ----------------------------------------------------------------------------------------------------------------

VARIANTS = {
    "plain": dict(),
    # different rank / alpha per parameter, rsLoRA: s_gu = 12/sqrt(4) = 6, s_d = 6/sqrt(3)
    "rank_pattern_rslora": dict(rank_pattern={"gate_up_proj": 4}, alpha_pattern={"gate_up_proj": 12},
                                use_rslora=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_and_grads_match_reference(family, variant):
    pm = _peft(family, **VARIANTS[variant])
    outer = next(iter(_experts_modules(pm).values()))
    lora, scale, base = expert_lora_from_module(outer)
    if variant == "rank_pattern_rslora":
        assert lora.A_gu.shape == (E, 4, 2 * I) and lora.A_d.shape == (E, R, H)
        assert scale == pytest.approx((6.0, 6.0 / 3 ** 0.5))
    gate_up, down = base.gate_up_proj.detach(), base.down_proj.detach()
    gen = torch.Generator().manual_seed(7)
    T = 11
    x = torch.randn(T, H, generator=gen)
    ids, w = _routing(T, gen)
    dy = torch.randn(T, H, generator=gen)

    # (a) forward: PEFT (parametrized W + materialised delta, transformers grouped_mm path) == reference
    xp = x.clone().requires_grad_(True)
    y_peft = outer(xp, ids, w)
    assert not torch.nn.utils.parametrize.is_parametrized(base)  # proxy removed after forward
    xr = x.clone().requires_grad_(True)
    lp = [p.detach().clone().requires_grad_(True) for p in
          (outer.base_layer.lora_A["default"].weight, outer.base_layer.lora_B["default"].weight,
           outer.lora_A["default"].weight, outer.lora_B["default"].weight)]
    lora_r = ExpertLora(*split_peft_lora(lp[0], lp[1], E), *split_peft_lora(lp[2], lp[3], E))
    y_ref = experts_with_lora(xr, ids, w, gate_up, down, lora_r, scale)
    assert _rel(y_peft, y_ref) < 1e-5
    y_base = experts_with_lora(x, ids, w, gate_up, down, None, scale)
    assert _rel(y_ref, y_base) > 1e-2  # the adapter is not a no-op
    gu_eff, d_eff = merged_expert_weights(gate_up, down, lora_r, scale)
    with torch.no_grad():
        assert _rel(experts_with_lora(x, ids, w, gu_eff, d_eff, None, 0.0), y_ref) < 1e-5
        for wrapper, eff in ((outer.base_layer, gu_eff), (outer, d_eff)):
            base_w = getattr(base, wrapper.parameter_name)
            assert _rel(base_w + wrapper.get_delta_weight("default"), eff) < 1e-6

    # (b) grads: autograd through PEFT == autograd through the reference == hand-written backward
    (y_peft * dy).sum().backward()
    (y_ref * dy).sum().backward()
    peft_params = (outer.base_layer.lora_A["default"].weight, outer.base_layer.lora_B["default"].weight,
                   outer.lora_A["default"].weight, outer.lora_B["default"].weight)
    for p_peft, p_ref in zip(peft_params, lp):
        assert p_peft.grad is not None and _rel(p_peft.grad, p_ref.grad) < 1e-5
    assert _rel(xp.grad, xr.grad) < 1e-5
    assert base.gate_up_proj.grad is None and base.down_proj.grad is None  # frozen base
    with torch.no_grad():
        lora_d = ExpertLora(*(t.detach() for t in lora_r))
        man = experts_with_lora_grads(x, ids, w, gate_up, down, lora_d, scale, dy)
    assert _rel(man["dx"], xr.grad) < 1e-5
    ga = ExpertLora(*split_peft_lora(lp[0].grad, lp[1].grad, E), *split_peft_lora(lp[2].grad, lp[3].grad, E))
    for key, ref in zip(("dA_gu", "dB_gu", "dA_d", "dB_d"), ga):
        assert _rel(man[key], ref) < 1e-5, key
        assert torch.count_nonzero(man[key][E - 1]) == 0  # unrouted expert: zero LoRA grad
    wr = w.clone().requires_grad_(True)
    (experts_with_lora(x, ids, wr, gate_up, down, lora_d, scale) * dy).sum().backward()
    assert _rel(man["dw"], wr.grad) < 1e-5


def test_full_model_experts_calls_match_reference(family):
    """Inside a real forward, every experts call (hooked on the outer ParamWrapper) == reference."""
    pm = _peft(family)
    calls = []
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: calls.append((n, mod, args, out)))
             for n, m in _experts_modules(pm).items()]
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pm(ids)
    for h in hooks:
        h.remove()
    assert len(calls) == len(_experts_modules(pm))
    for _, mod, (x, tid, tw), out in calls:
        lora, scale, base = expert_lora_from_module(mod)
        with torch.no_grad():
            ref = experts_with_lora(x, tid, tw, base.gate_up_proj, base.down_proj, lora, scale)
        assert _rel(out, ref) < 1e-5


def test_save_load_roundtrip_and_engine_written_adapter(family, tmp_path):
    pm = _peft(family)
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = pm(ids).logits
        base_logits = make_tiny_model(family)(ids).logits
    assert _rel(logits, base_logits) > 1e-3
    pm.save_pretrained(tmp_path / "peft")
    # (c) vanilla round trip
    loaded = PeftModel.from_pretrained(make_tiny_model(family), tmp_path / "peft")
    with torch.no_grad():
        assert _rel(loaded(ids).logits, logits) < 1e-6
    # per-expert factors from the saved file == from the live module
    sd = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    for name, outer in _experts_modules(pm).items():
        lora_m, _, _ = expert_lora_from_module(outer)
        lora_f = expert_lora_from_state_dict(sd, name, E)
        for a, b in zip(lora_m, lora_f):
            assert torch.equal(a, b)
    # an adapter written from per-expert factors (as an engine would) loads into vanilla PEFT
    out = {k: v for k, v in sd.items() if ".experts." not in k}
    for name, outer in _experts_modules(pm).items():
        lora_m, _, _ = expert_lora_from_module(outer)
        out.update(to_peft_state_dict(name, ExpertLora(*(t.detach().clone() for t in lora_m))))
    assert out.keys() == sd.keys()
    (tmp_path / "eng").mkdir()
    save_file(out, tmp_path / "eng" / "adapter_model.safetensors")
    (tmp_path / "eng" / "adapter_config.json").write_text((tmp_path / "peft" / "adapter_config.json").read_text())
    eng = PeftModel.from_pretrained(make_tiny_model(family), tmp_path / "eng")
    with torch.no_grad():
        assert _rel(eng(ids).logits, logits) < 1e-6
        # merge_and_unload folds W + s A^T B^T into the fused params (plain experts module afterwards)
        merged = eng.merge_and_unload()
        assert _rel(merged(ids).logits, logits) < 1e-5
