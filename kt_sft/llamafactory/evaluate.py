"""`python -m kt_sft eval cfg.yaml`: LLaMA-Factory's MMLU-style evaluator (local task files) on the CPU engine.

LLaMA-Factory 0.9.5 retired the `llamafactory-cli eval` command (its launcher raises NotImplementedError before
loading anything) but still ships the evaluator, `llamafactory.eval.evaluator`. This entry point runs that stock
evaluator with the hook active, so `use_kt: true` loads the model (and adapter) exactly as training and chat do.
The YAML is LLaMA-Factory's eval format: model_name_or_path, adapter_name_or_path, template, task (e.g.
`mmlu_test`), task_dir (a local directory per task: mapping.json + a datasets folder whose README.md declares one
config per subject with train/validation/test files), n_shot, lang, batch_size, save_dir.
"""
from __future__ import annotations

import sys

from .startup import activate


def main(argv: list[str]) -> int:
    if not argv or not argv[0].endswith((".yaml", ".yml", ".json")):
        print("usage: python -m kt_sft eval config.yaml [key=value ...]", file=sys.stderr)
        return 2
    activate()
    from llamafactory.eval.evaluator import run_eval

    sys.argv = [sys.argv[0], *argv]  # LLaMA-Factory reads the YAML (and key=value overrides) from argv
    run_eval()
    return 0
