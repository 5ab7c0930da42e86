"""`USE_KT=1 llamafactory-cli train` end to end through the real CLI (subprocesses), on the embedded demo.

- the kt-sft run logs the same per-step losses as stock LLaMA-Factory (fp32 experts), and the loss falls;
- the saved adapter is a standard PEFT directory: vanilla `PeftModel.from_pretrained` on stock transformers
  gives the logits of our engine with the same adapter;
- a run killed after a checkpoint save resumes with the losses of the uninterrupted run.
"""
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import kt_sft
from llamafactory_run import example_config, history, launch, train

pytestmark = pytest.mark.slow  # every test trains through the real CLI in subprocesses

REPO = Path(__file__).resolve().parents[1]
DEMO_YAML = REPO / "examples" / "train_lora" / "demo_lora_sft_kt.yaml"
SUMMARY = re.compile(r"kt-sft: \d+ MoE layers / \d+ experts \([\d.]+ [MG]B fp32\) on CPU engine "
                     r"\[(scalar|avx2|avx512|amx), \d+ threads\]; dense on (cpu|cuda:\d+)")
STEPS = 8


def _config(out: Path, use_kt: bool = True, **overrides) -> dict:
    return example_config(DEMO_YAML, out, use_kt, steps=STEPS, **overrides)


_launch, _train, _history = launch, train, history


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lf")
    ours = _train(_config(tmp / "kt"), tmp)
    _train(_config(tmp / "stock", use_kt=False), tmp, use_kt=False)
    return tmp, ours


def test_cli_matches_stock_llamafactory_and_loss_falls(runs):
    tmp, log = runs
    assert SUMMARY.search(log), "start-up summary line missing"
    ours, stock = _history(tmp / "kt"), _history(tmp / "stock")
    assert sorted(ours) == sorted(stock) == list(range(1, STEPS + 1))
    for step in ours:  # losses are logged rounded to 4 decimals; grad norms are not
        assert ours[step]["loss"] == pytest.approx(stock[step]["loss"], abs=2e-4), step
        assert ours[step]["grad_norm"] == pytest.approx(stock[step]["grad_norm"], rel=1e-4), step
    assert ours[STEPS]["loss"] < ours[1]["loss"] - 0.3
    assert (tmp / "kt" / "training_loss.png").is_file()


def test_adapter_is_standard_peft_and_reproduces_engine_logits(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, _ = runs
    adapter = tmp / "kt"
    assert (adapter / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    base_path = REPO / "examples" / "demo" / "model"
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stock_base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
        base_logits = stock_base(input_ids=ids).logits
        stock = PeftModel.from_pretrained(stock_base, adapter).eval()
        stock_logits = stock(input_ids=ids).logits
        ours = PeftModel.from_pretrained(kt_sft.load_model(base_path, device="cpu", dtype=torch.float32,
                                                           progress=False), adapter).eval()
        our_logits = ours(input_ids=ids).logits
    scale = stock_logits.abs().max()
    assert (our_logits - stock_logits).abs().max() <= 1e-5 * scale
    assert (stock_logits - base_logits).abs().max() > 1e-3 * scale  # the adapter is not a no-op


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None or path.exists(), f"run ended before writing {path}"
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


def test_resume_after_kill_matches_uninterrupted(runs):
    tmp, _ = runs
    half = STEPS // 2
    cfg = _config(tmp / "killed", save_steps=half)
    proc = _launch(cfg, tmp)
    checkpoint = tmp / "killed" / f"checkpoint-{half}"
    _wait_for(checkpoint / "trainer_state.json", proc)  # transformers writes the trainer state last
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp / "killed" / "adapter_model.safetensors").exists() or proc.returncode == 0

    _train(_config(tmp / "killed", overwrite_output_dir=False, save_steps=half,
                   resume_from_checkpoint=str(checkpoint)), tmp)
    resumed, uninterrupted = _history(tmp / "killed"), _history(tmp / "kt")
    assert set(range(half + 1, STEPS + 1)) <= set(resumed)
    for step in range(half + 1, STEPS + 1):
        assert resumed[step]["loss"] == uninterrupted[step]["loss"], step
        assert resumed[step]["grad_norm"] == pytest.approx(uninterrupted[step]["grad_norm"], rel=1e-6), step


def test_lora_target_can_name_the_routed_experts(runs):
    """`lora_target: all,experts`: LoRA on every GPU linear plus the routed experts (engine-computed), saved as
    PEFT target_parameters; vanilla PEFT on stock transformers reproduces the engine's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, _ = runs
    out = tmp / "experts"
    _train(_config(out, lora_target="all,experts", max_steps=4, save_steps=2), tmp)
    resumed = tmp / "experts_resumed"  # the expert factors and their optimizer state come back on resume
    _train(_config(resumed, lora_target="all,experts", max_steps=4, save_steps=2,
                   resume_from_checkpoint=str(out / "checkpoint-2")), tmp)
    assert [_history(resumed)[s]["grad_norm"] for s in (3, 4)] == [_history(out)[s]["grad_norm"] for s in (3, 4)]
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    base_path = REPO / "examples" / "demo" / "model"
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                          out).eval()
        expected = stock(input_ids=ids).logits
        from kt_sft.models.expert_lora import load_adapter

        ours = load_adapter(kt_sft.load_model(base_path, device="cpu", dtype=torch.float32, progress=False), out)
        got = ours.eval()(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_family_loaded_through_the_image_text_class_trains_like_stock(tmp_path):
    """mistral4, a family with no rule file anywhere, which LLaMA-Factory loads with AutoModelForImageTextToText (its
    causal LM sits in that mapping): with USE_KT=1 the engine holds its experts (summary line) and every step's loss
    is stock LLaMA-Factory's."""
    import shutil

    from tiny_models import make_tiny_model

    demo, model_dir = REPO / "examples" / "demo" / "model", tmp_path / "mistral4"
    make_tiny_model("mistral4", vocab_size=1024).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(demo / name, model_dir / name)
    steps = dict(model_name_or_path=str(model_dir), max_steps=4, save_steps=4)
    log = _train(_config(tmp_path / "kt", **steps), tmp_path)
    _train(_config(tmp_path / "stock", use_kt=False, **steps), tmp_path, use_kt=False)
    assert SUMMARY.search(log), log[-3000:]
    ours, stock = _history(tmp_path / "kt"), _history(tmp_path / "stock")
    assert sorted(ours) == sorted(stock) == [1, 2, 3, 4]
    for step in ours:
        assert ours[step]["loss"] == pytest.approx(stock[step]["loss"], abs=2e-4), step
