"""Issue 23: each mistake a user makes gets a clear error (or a warning with the effective value) from the hook's
checks, which run inside LLaMA-Factory's argument parsing: before it tokenizes the dataset and before any weight is
read (the CLI-level tests below check the call order on real runs); nothing half-written is resumed from.

The table maps a bad input (made by a setup function in a fresh directory) to the fragments its message must hold:
the culprit (key, variable, path) and what to do."""
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from kt_sft.engine import usable_cpus
from kt_sft.llamafactory import config as ktc
from kt_sft.llamafactory.startup import activate

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "examples" / "demo" / "model"


@pytest.fixture(scope="module")
def get_train_args():
    activate()
    from llamafactory.hparams import get_train_args

    return get_train_args


def _args(tmp: Path, **extra) -> dict:
    base = dict(model_name_or_path=str(DEMO_MODEL), stage="sft", do_train=True, finetuning_type="lora",
                dataset="kt_demo", dataset_dir=str(REPO / "examples/demo/data"), template="qwen3_nothink",
                output_dir=str(tmp / "out"), report_to="none", use_kt=True)
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def _model_copy(tmp: Path) -> Path:
    return Path(shutil.copytree(DEMO_MODEL, tmp / "model"))


def _expert_adapter(path: Path, experts: int = 8, rank: int = 4) -> Path:
    """A PEFT adapter with expert LoRA (target_parameters) trained on the demo's architecture with `experts`
    routed experts (same hidden and intermediate sizes), saved by stock PEFT on stock transformers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(DEMO_MODEL)
    config.num_experts = experts
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lora = LoraConfig(r=rank, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    get_peft_model(model, lora).save_pretrained(path)
    return path


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def _checkpoint(out: Path, step: int, complete: bool) -> Path:
    """A Trainer checkpoint-N as a save leaves it: complete, or cut short (adapter truncated, no trainer_state)."""
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    src = _expert_adapter(out.parent / f"adapter-{step}")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(src / name, ckpt / name)
    torch.save({"step": step}, ckpt / "optimizer.pt")
    if complete:
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    else:
        _truncate(ckpt / "adapter_model.safetensors")
        _truncate(ckpt / "optimizer.pt", 0.8)
    return ckpt


# --- setups: tmp -> (argument overrides, environment overrides) ---------------------------------------------------

def all_shards_missing(tmp):
    from tiny_models import make_tiny_checkpoint

    model = tmp / "sharded"
    make_tiny_checkpoint("qwen3_moe", model)
    shards = sorted(model.glob("*.safetensors"))
    for shard in shards:
        shard.unlink()
    return {"model_name_or_path": str(model)}, {}


def one_shard_truncated(tmp):
    model = _model_copy(tmp)
    _truncate(model / "model.safetensors")
    return {"model_name_or_path": str(model)}, {}


def adapter_other_expert_count(tmp):
    return {"adapter_name_or_path": str(_expert_adapter(tmp / "adapter16", experts=16))}, {}


def adapter_truncated(tmp):
    adapter = _expert_adapter(tmp / "adapter")
    _truncate(adapter / "adapter_model.safetensors")
    return {"adapter_name_or_path": str(adapter)}, {}


def two_adapters(tmp):
    first, second = _expert_adapter(tmp / "a1"), tmp / "a2"
    shutil.copytree(first, second)
    return {"adapter_name_or_path": f"{first},{second}"}, {}


def only_partial_checkpoints(tmp):
    _checkpoint(tmp / "out", 4, complete=False)
    return {"overwrite_output_dir": False}, {}


def explicit_partial_checkpoint(tmp):
    _checkpoint(tmp / "out", 2, complete=True)
    partial = _checkpoint(tmp / "out", 4, complete=False)
    return {"overwrite_output_dir": False, "resume_from_checkpoint": str(partial)}, {}


def output_dir_below_a_file(tmp):
    (tmp / "file").write_text("x")
    return {"output_dir": str(tmp / "file" / "out")}, {}


def relative_model_path(tmp):
    os.chdir(tmp)  # the fixture restores the working directory
    return {"model_name_or_path": "examples/demo/model"}, {}


def lora_target_gate_proj(tmp):
    return {"lora_target": "q_proj,gate_proj"}, {}


def expert_lora_with_dropout(tmp):
    return {"lora_target": "all,experts", "lora_dropout": 0.05}, {}


BAD = [  # (setup, fragments of the message, in order)
    (all_shards_missing, ["model_name_or_path", "model.safetensors.index.json", "of the", "shards it lists are "
                          "missing", "copy the complete checkpoint"]),
    (one_shard_truncated, ["model_name_or_path", "model.safetensors is truncated or corrupt", "cut short",
                           "copy that file again"]),
    (adapter_other_expert_count, ["adapter16 (trained on", "does not fit model_name_or_path", "has 8 experts",
                                  "the rank dimension is 64 = r 4 x 16 experts, this model needs r x 8 = 32",
                                  "another expert count"]),
    (adapter_truncated, ["adapter file", "adapter_model.safetensors is truncated or corrupt", "re-save the adapter"]),
    (two_adapters, ["adapter_name_or_path lists 2 adapters", "give one", "merge the others"]),
    (only_partial_checkpoints, ["holds only incomplete checkpoints: checkpoint-4 (no trainer_state.json",
                                "adapter_model.safetensors is truncated or corrupt",
                                "optimizer.pt is truncated", "delete them to start over"]),
    (explicit_partial_checkpoint, ["resume_from_checkpoint=", "checkpoint-4' is incomplete",
                                   "resume from", "checkpoint-2 (the newest complete one), and delete it"]),
    (output_dir_below_a_file, ["output_dir=", "is a file, not a directory; choose another output_dir"]),
    (relative_model_path, ["model_name_or_path='examples/demo/model' (relative to the working directory",
                           "no config.json there", "give an absolute path"]),
    (lora_target_gate_proj, ["lora_target 'gate_proj' matches no module of this Qwen3MoeForCausalLM",
                             "mlp.experts", "gate_up_proj (gate and up together) and down_proj",
                             "lora_target: all,experts", "q_proj"]),
    (expert_lora_with_dropout, ["lora_dropout=0.05: LoRA on the routed experts (lora_target experts) needs "
                                "lora_dropout: 0"]),
]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # restored afterwards (relative_model_path moves away from it)
    return tmp_path


@pytest.mark.parametrize("setup,fragments", BAD, ids=[setup.__name__ for setup, _ in BAD])
def test_bad_input_fails_in_argument_parsing(get_train_args, in_tmp, monkeypatch, setup, fragments):
    args, env = setup(in_tmp)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ktc.KTConfigError) as err:
        get_train_args(_args(in_tmp, **args))
    message, at = str(err.value), 0
    for fragment in fragments:
        found = message.find(fragment, at)
        assert found >= 0, f"{fragment!r} missing (or out of order) in: {message}"
        at = found + len(fragment)


def test_newest_complete_checkpoint_is_resumed_and_partial_ones_named(get_train_args, in_tmp, caplog):
    out = in_tmp / "out"
    _checkpoint(out, 2, complete=True)
    _checkpoint(out, 4, complete=False)
    with caplog.at_level(logging.WARNING, logger="kt_sft"):
        _, _, training_args, _, _ = get_train_args(_args(in_tmp, overwrite_output_dir=False))
    assert training_args.resume_from_checkpoint == str(out / "checkpoint-2")
    assert "skipping incomplete checkpoint(s)" in caplog.text and "checkpoint-4 (no trainer_state.json" in caplog.text
    assert "resuming from checkpoint-2, the newest complete one" in caplog.text


def test_output_dir_not_writable(get_train_args, in_tmp, monkeypatch):
    """(As root, permissions never refuse; the check creates a probe file, so refusing that is the case.)"""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(ktc.KTConfigError, match=r"output_dir='.*' is not writable \(.*: Permission denied\); "
                                                r"choose a directory this user can write"):
        get_train_args(_args(in_tmp))


@pytest.mark.parametrize("how", ["kt_num_threads", "KT_SFT_THREADS"])
def test_more_threads_than_cpus_are_clamped_with_a_warning(get_train_args, in_tmp, monkeypatch, caplog, how):
    too_many = usable_cpus() + 997
    extra = {"kt_num_threads": too_many} if how == "kt_num_threads" else {}
    if how == "KT_SFT_THREADS":
        monkeypatch.setenv("KT_SFT_THREADS", str(too_many))
    with caplog.at_level(logging.WARNING, logger="kt_sft"):
        model_args, *_ = get_train_args(_args(in_tmp, **extra))
    assert model_args.kt_sft_settings.threads == usable_cpus()
    assert f"{how}={too_many} but this process may run on {usable_cpus()} CPUs: the engine uses {usable_cpus()} " \
           "threads" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is for machines without a CUDA device")
def test_gpu_experts_without_gpu_warns(get_train_args, in_tmp, caplog):
    with caplog.at_level(logging.WARNING, logger="kt_sft"):
        get_train_args(_args(in_tmp, kt_gpu_experts=1.0))
    assert "kt_gpu_experts=1.0 has no effect here: there is no CUDA device" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kt_sft"):
        get_train_args(_args(in_tmp))  # the default (auto) says nothing
    assert "kt_gpu_experts" not in caplog.text


def _hook_line() -> str:
    """The line setup.py writes into the installed kt_sft-llamafactory-hook.pth."""
    import ast

    tree = ast.parse((REPO / "setup.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "HOOK_LINE")
    return ast.literal_eval(node.value)


def _run_with_hook_line(argv0: str, body: str, tmp: Path, **env) -> str:
    """A fresh interpreter (USE_KT unset unless given) that runs the .pth line as site.py would, with argv[0] set."""
    import subprocess
    import sys

    code = f"import sys\nsys.argv = [{argv0!r}]\nexec({_hook_line()!r})\n{body}"
    clean = {k: v for k, v in os.environ.items() if k != "USE_KT"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp,
                          env={**clean, "PYTHONPATH": str(REPO), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow  # LLaMA-Factory in a fresh interpreter: ~30 s on a loaded 2-core box
def test_forgotten_use_kt_gets_the_hint(tmp_path):
    """Without USE_KT=1 a llamafactory-cli process keeps stock parsing, but a config written for kt-sft fails with
    "set USE_KT=1" instead of "pip install kt-kernel" / "keys not used: kt_backend"; other programs pay nothing."""
    cases = [_args(tmp_path), {**_args(tmp_path), "kt_backend": "AMXBF16"},
             {k: v for k, v in _args(tmp_path, kt_backend="AMXBF16").items() if k != "use_kt"}]
    body = ("from llamafactory.hparams import get_train_args\n"
            f"for args in {cases!r}:\n"
            "    try:\n        get_train_args(args)\n    except Exception as err:\n        print('ERROR', err)\n"
            "    else:\n        print('no error')\n")
    lines = [l for l in _run_with_hook_line("/venv/bin/llamafactory-cli", body, tmp_path).splitlines()
             if l.startswith(("ERROR", "no error"))]
    assert len(lines) == 3, lines
    assert "use_kt: true needs kt-kernel, but kt-sft's LLaMA-Factory hook is off: set USE_KT=1" in lines[0]
    assert "do not pip install them" in lines[0]
    for line in lines[1:]:
        assert "kt_backend given (kt-sft keys), but kt-sft's LLaMA-Factory hook is off: set USE_KT=1" in line


def test_hook_line_costs_other_programs_nothing(tmp_path):
    """Without USE_KT, a program other than llamafactory-cli / lmf imports nothing of kt-sft at start."""
    probe = "print('kt_sft' in sys.modules, any(type(f).__name__ == '_PostImportFinder' for f in sys.meta_path))"
    assert _run_with_hook_line("/usr/bin/pip", probe, tmp_path).strip() == "False False"
    assert _run_with_hook_line("/usr/bin/pip", probe, tmp_path, USE_KT="1").strip() == "True True"


def test_adapter_save_cut_short_leaves_the_previous_files(tmp_path, monkeypatch):
    """An engine model's adapter saves go to a staging folder and are renamed into place: a save that fails midway
    (here: the disk fills after half the file) leaves the previous adapter readable and no staging folder."""
    import peft.peft_model
    from peft import LoraConfig

    import kt_sft
    from kt_sft.models import expert_lora

    model = kt_sft.load_model(DEMO_MODEL, device="cpu", dtype=torch.float32, progress=False)
    peft_model = expert_lora.get_peft_model(model, LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj"],
                                                              target_parameters=["experts"]))
    out = tmp_path / "adapter"
    peft_model.save_pretrained(out)
    before = (out / "adapter_model.safetensors").read_bytes()
    real_save = peft.peft_model.safe_save_file

    def disk_full(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        _truncate(Path(filename))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        peft_model.save_pretrained(out)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


EVAL_BAD = [  # (overrides of examples/eval/demo_eval_kt.yaml's task keys, message fragments)
    ({"task_dir": "no/such/tasks"}, ["task arith_test: no/such/tasks/arith/mapping.json (relative to the working "
                                     "directory", "does not exist", "see examples/demo/tasks/arith"]),
    ({"task": "arith"}, ["task='arith': expected <task>_<split>, e.g. arith_test"]),
    ({"save_dir": "."}, ["save_dir='.' exists (an earlier run's results?)", "remove it or give another save_dir"]),
]


@pytest.mark.parametrize("overrides,fragments", EVAL_BAD, ids=["no_task_dir", "no_split", "save_dir_exists"])
def test_eval_task_problems_fail_before_loading(overrides, fragments, monkeypatch):
    import yaml

    from kt_sft.llamafactory.evaluate import EvalConfigError, check_task

    monkeypatch.chdir(REPO)
    args = yaml.safe_load((REPO / "examples" / "eval" / "demo_eval_kt.yaml").read_text())
    args.pop("save_dir")
    check_task(args)  # the shipped example task passes
    with pytest.raises(EvalConfigError) as err:
        check_task({**args, **overrides})
    for fragment in fragments:
        assert fragment in str(err.value)


def test_eval_category_must_be_one_the_evaluator_sums(tmp_path):
    from kt_sft.llamafactory.evaluate import EvalConfigError, check_task

    task = Path(shutil.copytree(REPO / "examples" / "demo" / "tasks", tmp_path / "tasks")) / "arith"
    (task / "mapping.json").write_text(json.dumps({"arith": {"name": "arithmetic", "category": "Maths"}}))
    with pytest.raises(EvalConfigError, match="category 'Maths' is not one the evaluator sums \\(STEM, "):
        check_task({"task": "arith_test", "task_dir": str(tmp_path / "tasks")})


def test_help_exits_zero(capsys):
    from kt_sft.env import main

    for argv in (["env", "--help"], ["-h"], ["families", "--help"], ["eval", "--help"]):
        assert main(argv) == 0, argv
        assert "usage: python -m kt_sft" in capsys.readouterr().out
    assert main(["bogus"]) == 2


def _cli_train(cfg: dict, tmp: Path, name: str, **env):
    """`llamafactory-cli train` with the hook (this checkout's kt_sft first on the path) -> (returncode, log)."""
    import subprocess

    import yaml
    from llamafactory_run import llamafactory_cli

    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KT_SFT_")}
    env = {**clean, "USE_KT": "1", "KT_SFT_THREADS": "2", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p), **env}
    proc = subprocess.run(llamafactory_cli("train", str(path)), env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp)
    return proc.returncode, proc.stdout + proc.stderr


BEFORE_LOADING = ("Running tokenizer on dataset", "Converting format of dataset", "kt-sft: loading shards")


@pytest.mark.slow  # the real CLI: ~20 s per case on a 2-core box
@pytest.mark.parametrize("setup,fragments,env", [
    (lora_target_gate_proj, ["lora_target 'gate_proj' matches no module"], {}),
    (all_shards_missing, ["shards it lists are missing"], {}),
    (lambda tmp: ({}, {}), ["KT_SFT_THREADS='abc': expected 0 (the physical cores", "or an integer from 1 to 4096"],
     {"KT_SFT_THREADS": "abc"}),
], ids=["lora_target", "shards", "env"])
def test_cli_fails_before_tokenizing_or_loading(tmp_path, setup, fragments, env):
    """Through the real CLI: the error reaches the user before LLaMA-Factory converts or tokenizes the dataset and
    before a shard is read, names the culprit (a bad KT_SFT_* never a checkpoint tensor), and nothing is written."""
    args, _ = setup(tmp_path)
    rc, log = _cli_train(_args(tmp_path, **args), tmp_path, "bad", **env)
    assert rc != 0
    for fragment in fragments:
        assert fragment in log, log[-3000:]
    assert not any(marker in log for marker in BEFORE_LOADING), log[-3000:]
    assert "model.layers" not in log.split("Error")[-1]  # no tensor named in the final error
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # two short trainings through the real CLI
def test_cli_resume_skips_a_checkpoint_cut_short(tmp_path):
    """A run saves checkpoint-2 and checkpoint-4; checkpoint-4 is then damaged as a kill mid-save leaves it (adapter
    truncated, no trainer_state.json). Running again resumes from checkpoint-2 with a warning naming checkpoint-4,
    trains to the end and leaves no staging folder of the atomic adapter saves."""
    import yaml

    cfg = yaml.safe_load((REPO / "examples/train_lora/demo_lora_sft_kt.yaml").read_text())
    cfg.update(model_name_or_path=str(DEMO_MODEL), dataset_dir=str(REPO / "examples/demo/data"),
               output_dir=str(tmp_path / "out"), max_steps=4, save_steps=2, logging_steps=1, kt_backend="FP32",
               plot_loss=False)
    rc, log = _cli_train(cfg, tmp_path, "first")
    assert rc == 0, log[-3000:]
    damaged = tmp_path / "out" / "checkpoint-4"
    (damaged / "trainer_state.json").unlink()
    _truncate(damaged / "adapter_model.safetensors")
    rc, log = _cli_train({**cfg, "overwrite_output_dir": False, "max_steps": 6}, tmp_path, "again")
    assert rc == 0, log[-3000:]
    assert "skipping incomplete checkpoint(s)" in log and "checkpoint-4 (no trainer_state.json" in log
    assert "resuming from checkpoint-2, the newest complete one" in log
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert not list((tmp_path / "out").rglob(".kt-sft-saving-*"))
