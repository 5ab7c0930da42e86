"""Interpreter-start activation of the LLaMA-Factory hook (the installed `.pth` calls `on_start` when USE_KT is
truthy or the program is llamafactory-cli / lmf).

Nothing heavy happens here: `activate()` only installs an import hook, so `pip`, `python -c ...` and every
other program started with USE_KT=1 pay for one `sys.meta_path` entry. When LLaMA-Factory's modules are
imported later, each patch in `patches.PATCHES` runs right after its module's own code, before anything
else can bind the names it replaces (e.g. `from .loader import load_model` in `llamafactory.model`).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import threading

_lock = threading.Lock()
_activated = False


class _PatchAfterExec(importlib.abc.Loader):
    """Wraps a module's real loader: execute the module, then apply our patch to it."""

    def __init__(self, loader, patch) -> None:
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.patch(module)

    def __getattr__(self, name):  # get_code, get_source, is_package, ... as the real loader has them
        return getattr(self.loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds our target modules through the other finders and swaps in a patching loader."""

    def __init__(self, patches: dict) -> None:
        self.patches = patches
        self._busy: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        patch = self.patches.get(fullname)
        if patch is None or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchAfterExec(spec.loader, patch)
        return spec


def use_kt_env() -> bool:
    return os.environ.get("USE_KT", "").strip().lower() in ("1", "true", "y", "yes", "on")


def on_start() -> None:
    """What the `.pth` runs: the hook when USE_KT is truthy; else (a llamafactory-cli process without it) only the
    hint that a config asking for kt-sft needs USE_KT=1 (patches.patch_parser_hint)."""
    if use_kt_env():
        activate()
        return
    from .patches import HINT_PATCHES

    with _lock:
        sys.meta_path.insert(0, _PostImportFinder(HINT_PATCHES))


def activate() -> None:
    """Install the hook once; patch LLaMA-Factory modules that are already imported right away."""
    global _activated
    with _lock:
        if _activated:
            return
        from .patches import PATCHES

        for name, patch in PATCHES.items():
            if name in sys.modules:
                patch(sys.modules[name])
        sys.meta_path.insert(0, _PostImportFinder(PATCHES))
        _activated = True
