"""`USE_KT=1 llamafactory-cli train` with `stage: dpo` / `stage: kto` through the real CLI (subprocesses), on the
embedded demo (examples/train_lora/demo_lora_dpo_kt.yaml), against stock LLaMA-Factory without use_kt:

- every pref_loss (sigmoid, ipo, hinge with the reference; orpo, simpo without) and KTO: per-step loss,
  rewards/chosen, rewards/rejected (KTO: kl too) and grad norm within 1e-4 relative (fp32 experts);
- with LoRA on the routed experts (stock: the same PEFT target_parameters, tests/stock_expert_lora.py), also
  without gradient checkpointing and with chunk_size splitting each batch into more engine calls than a layer's
  default saved-forward slots (reference / KL forwards that saved would evict the policy's before its backward);
- a run resumed from a checkpoint continues with the uninterrupted run's steps (expert LoRA and its optimizer
  state included);
- int8 experts (INT8, AMXINT8) train: step 1 is ln 2 exactly (the reference is the policy with a zero adapter),
  later steps stay near stock's fp32 ones.
"""
import math
import sys
from pathlib import Path

import pytest

from llamafactory_run import REPO, example_config, history, train

pytestmark = pytest.mark.slow  # every test trains through the real CLI in subprocesses

DPO_YAML = REPO / "examples" / "train_lora" / "demo_lora_dpo_kt.yaml"
STEPS = 4
KTO = {"stage": "kto", "dataset": "kt_demo_kto"}
CASES = {"sigmoid": {}, "ipo": {"pref_loss": "ipo"}, "hinge": {"pref_loss": "hinge"}, "orpo": {"pref_loss": "orpo"},
         "simpo": {"pref_loss": "simpo"}, "kto": KTO}
EXPERT_CASES = {"sigmoid": {}, "orpo": {"pref_loss": "orpo"},
                "kto_chunked_without_checkpointing": {**KTO, "disable_gradient_checkpointing": True, "chunk_size": 32}}
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "kl", "grad_norm")
EXPERT_PARAMETERS = "mlp.experts.gate_up_proj,mlp.experts.down_proj"


def _config(out: Path, use_kt: bool = True, **overrides) -> dict:
    return example_config(DPO_YAML, out, use_kt, steps=STEPS, **{"lora_target": "all", **overrides})


def _stock_with_expert_lora(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).parent / "stock_expert_lora.py"), *args]


def _assert_same_steps(ours: dict, stock: dict, rel: float = 1e-4) -> None:
    assert sorted(ours) == sorted(stock) == list(range(1, STEPS + 1))
    for step in ours:
        assert {m for m in METRICS if m in ours[step]} == {m for m in METRICS if m in stock[step]}, step
        for metric in (m for m in METRICS if m in stock[step]):
            assert ours[step][metric] == pytest.approx(stock[step][metric], rel=rel, abs=1e-6), (step, metric)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_stock_llamafactory(tmp_path, case):
    train(_config(tmp_path / "kt", **CASES[case]), tmp_path)
    train(_config(tmp_path / "stock", use_kt=False, **CASES[case]), tmp_path, use_kt=False)
    _assert_same_steps(history(tmp_path / "kt"), history(tmp_path / "stock"))


@pytest.mark.parametrize("case", sorted(EXPERT_CASES))
def test_expert_lora_matches_stock_peft(tmp_path, case):
    train(_config(tmp_path / "kt", lora_target="all,experts", **EXPERT_CASES[case]), tmp_path)
    train(_config(tmp_path / "stock", use_kt=False, **EXPERT_CASES[case]), tmp_path, use_kt=False,
          command=_stock_with_expert_lora, env={"KT_SFT_TEST_TARGET_PARAMETERS": EXPERT_PARAMETERS})
    _assert_same_steps(history(tmp_path / "kt"), history(tmp_path / "stock"))


def test_resume_continues_the_uninterrupted_run(tmp_path):
    half = STEPS // 2
    whole = _config(tmp_path / "whole", lora_target="all,experts", save_steps=half)
    train(whole, tmp_path)
    train(_config(tmp_path / "resumed", lora_target="all,experts", save_steps=half,
                  resume_from_checkpoint=str(tmp_path / "whole" / f"checkpoint-{half}")), tmp_path)
    resumed, uninterrupted = history(tmp_path / "resumed"), history(tmp_path / "whole")
    for step in range(half + 1, STEPS + 1):
        for metric in ("loss", "rewards/chosen", "rewards/rejected"):
            assert resumed[step][metric] == uninterrupted[step][metric], (step, metric)
        assert resumed[step]["grad_norm"] == pytest.approx(uninterrupted[step]["grad_norm"], rel=1e-6), step


@pytest.mark.parametrize("backend", ["INT8", "AMXINT8"])
def test_int8_experts_train(tmp_path, backend):
    train(_config(tmp_path / "kt", kt_backend=backend), tmp_path)
    train(_config(tmp_path / "stock", use_kt=False), tmp_path, use_kt=False)
    ours, stock = history(tmp_path / "kt"), history(tmp_path / "stock")
    assert ours[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert ours[1]["rewards/chosen"] == ours[1]["rewards/rejected"] == 0.0
    for step in range(2, STEPS + 1):
        assert ours[step]["loss"] == pytest.approx(stock[step]["loss"], rel=5e-2), step
