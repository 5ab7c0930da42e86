"""The LLaMA-Factory hook: `USE_KT=1 llamafactory-cli train cfg.yaml` with `use_kt: true` runs stock
LLaMA-Factory 0.9.5 with the routed experts on kt-sft's CPU engine.

- `startup`: what the installed `kt_sft-llamafactory-hook.pth` calls at interpreter start when USE_KT is truthy.
- `patches`: the few LLaMA-Factory names the hook replaces (argument parsing, model loading) and why.
- `config`: the `kt_*` keys, their meaning, and the checks that run before any weight is loaded.
- `loading`: LLaMA-Factory's `from_pretrained` call answered by `kt_sft.loader.load_model`.

This package imports nothing heavy at module level, so activating the hook costs nothing until LLaMA-Factory
itself is imported.
"""
