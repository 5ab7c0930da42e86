"""`python -m kt_sft eval cfg.yaml`: LLaMA-Factory's MMLU-style evaluator (local task files) on the CPU engine.

LLaMA-Factory 0.9.5 retired the `llamafactory-cli eval` command (its launcher raises NotImplementedError before
loading anything) but still ships the evaluator, `llamafactory.eval.evaluator`. This entry point runs that stock
evaluator with the hook active, so `use_kt: true` loads the model (and adapter) exactly as training and chat do.
The YAML is LLaMA-Factory's eval format: model_name_or_path, adapter_name_or_path, template, task (e.g.
`mmlu_test`), task_dir (a local directory per task: mapping.json + a datasets folder whose README.md declares one
config per subject with train/validation/test files), n_shot, lang, batch_size, save_dir.
Before anything loads, the task files and save_dir are checked here (`check_task`): the stock evaluator would
look a missing task folder up on the Hub after loading the model, and fail on an existing save_dir only at its
end. examples/eval/demo_eval_kt.yaml evaluates the demo on examples/demo/tasks/arith.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .startup import activate

USAGE = "usage: python -m kt_sft eval config.yaml [key=value ...]   (example: examples/eval/demo_eval_kt.yaml)"


class EvalConfigError(ValueError):
    """A task, task_dir or save_dir the evaluator cannot use; raised before anything loads."""


def check_task(args: dict) -> None:
    """task is <task>_<split>; <task_dir>/<task>/ holds mapping.json (each subject's category one the evaluator
    sums: STEM, Social Sciences, Humanities, Other) and its datasets README.md; save_dir does not exist yet."""
    from llamafactory.extras.constants import SUBJECTS

    task, task_dir = str(args.get("task") or ""), str(args.get("task_dir") or "evaluation")
    if "_" not in task:
        raise EvalConfigError(f"task={task!r}: expected <task>_<split>, e.g. arith_test (the folder {task_dir}/arith, "
                              "its test split)")
    folder = Path(task_dir) / task.split("_")[0]
    where = "" if folder.is_absolute() else f" (relative to the working directory {os.getcwd()})"
    for name in ("mapping.json", "README.md"):
        if not (folder / name).is_file():
            raise EvalConfigError(f"task {task}: {folder / name}{where} does not exist; the evaluator reads local task "
                                  "folders (<task_dir>/<task>/mapping.json + a datasets README.md declaring one config "
                                  "per subject): see examples/demo/tasks/arith")
    try:
        mapping = json.loads((folder / "mapping.json").read_text())
        wrong = sorted({str(s.get("category")) for s in mapping.values()} - set(SUBJECTS))
    except (ValueError, AttributeError) as err:
        raise EvalConfigError(f"{folder / 'mapping.json'}: expected {{subject: {{name, category}}}} ({err})") from None
    if wrong:
        raise EvalConfigError(f"{folder / 'mapping.json'}: category {wrong[0]!r} is not one the evaluator sums "
                              f"({', '.join(s for s in SUBJECTS if s != 'Average')})")
    save_dir = args.get("save_dir")
    if save_dir is not None and os.path.exists(str(save_dir)):
        raise EvalConfigError(f"save_dir={save_dir!r} exists (an earlier run's results?); the evaluator writes a new "
                              "folder: remove it or give another save_dir")


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if not argv or not argv[0].endswith((".yaml", ".yml", ".json")):
        print(USAGE, file=sys.stderr)
        return 2
    activate()
    from llamafactory.eval.evaluator import run_eval
    from llamafactory.hparams.parser import read_args

    sys.argv = [sys.argv[0], *argv]  # LLaMA-Factory reads the YAML (and key=value overrides) from argv
    try:
        check_task(read_args())
    except EvalConfigError as err:
        print(f"kt-sft eval: {err}", file=sys.stderr)
        return 2
    run_eval()
    return 0
