"""How the tests launch stock LLaMA-Factory: its console script of this interpreter's environment, on a config made
from one of the example YAMLs, and what they read back (the per-step log history)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OUR_KEYS = ("use_kt", "cpu_infer", "chunk_size")  # besides every kt_* key


def llamafactory_cli(*args: str) -> list[str]:
    """The `llamafactory-cli` console script of this interpreter's environment (or on PATH)."""
    script = Path(sys.executable).parent / "llamafactory-cli"
    found = str(script) if script.is_file() else shutil.which("llamafactory-cli")
    assert found, "llamafactory-cli not found next to this python nor on PATH"
    return [found, *args]


def example_config(example: Path, out: Path, use_kt: bool = True, steps: int = 8, **overrides) -> dict:
    """The example YAML with its repo-relative paths made absolute, output_dir `out`, `steps` steps each logged,
    fp32 experts (exact parity with stock), then `overrides`; without use_kt none of our keys (stock
    LLaMA-Factory)."""
    cfg = yaml.safe_load(example.read_text())
    for key in ("model_name_or_path", "dataset_dir"):
        cfg[key] = str(REPO / cfg[key])
    cfg.update(output_dir=str(out), max_steps=steps, logging_steps=1, save_steps=steps, kt_backend="FP32",
               num_train_epochs=1, overwrite_output_dir=True)
    cfg.update(overrides)
    if not use_kt:
        cfg = {k: v for k, v in cfg.items() if not (k.startswith("kt_") or k in OUR_KEYS)}
    return cfg


def launch(cfg: dict, tmp: Path, use_kt: bool = True, command=llamafactory_cli, env=None) -> subprocess.Popen:
    """`command("train", cfg.yaml)` in a subprocess, its output in tmp/<output_dir name>.log."""
    path = tmp / f"{Path(cfg['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "USE_KT": "1" if use_kt else "0", "KT_SFT_THREADS": "2", "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}
    log = open(tmp / f"{Path(cfg['output_dir']).name}.log", "w")
    return subprocess.Popen(command("train", str(path)), env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def train(cfg: dict, tmp: Path, use_kt: bool = True, **launch_args) -> str:
    """Run to the end; the log (the run must succeed)."""
    proc = launch(cfg, tmp, use_kt, **launch_args)
    proc.wait(timeout=600)
    log = (tmp / f"{Path(cfg['output_dir']).name}.log").read_text()
    assert proc.returncode == 0, log[-4000:]
    return log


def history(out: Path) -> dict[int, dict]:
    """step -> the metrics logged at that step (trainer_state.json)."""
    state = json.loads((out / "trainer_state.json").read_text())
    return {e["step"]: e for e in state["log_history"] if "loss" in e}
