"""`python -m kt_sft env [MODEL_DIR]`: what a bug report needs — versions, how the engine was built (commit,
compiler, its ISA units and flags; compiled into the binary) and installed (wheel tag, editable, source tree), CPU,
the flags the kernels use, ISA, threads, the NUMA layout, the checkpoint formats kt-sft reads and, given a model
directory, what that checkpoint is (family, stored format, host RAM of its experts per expert format, the default
expert format, its experts' nodes).
Also the entry point of the other subcommands: `python -m kt_sft families` (every transformers MoE family and its
status, kt_sft.models.catalog), `python -m kt_sft eval` (kt_sft.llamafactory.evaluate) and `python -m kt_sft export`
(an adapter merged into its base checkpoint, kt_sft.export)."""
from __future__ import annotations

import importlib.metadata as md
import json
import platform
import sys
from pathlib import Path

PACKAGES = ("kt-sft", "torch", "transformers", "peft", "accelerate", "datasets", "trl", "llamafactory",
            "deepspeed", "safetensors")


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


def _cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for cpu in cpus:
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def install_kind() -> str:
    """How the kt_sft package in use got here: a wheel install (its tag), an editable install, or a source tree on
    sys.path (also when a kt-sft installed elsewhere is shadowed by it)."""
    package = Path(__file__).resolve().parent
    try:
        dist = md.distribution("kt-sft")
    except md.PackageNotFoundError:
        return f"source tree {package.parent}, kt-sft not installed"
    url = json.loads(dist.read_text("direct_url.json") or "{}")
    if url.get("dir_info", {}).get("editable"):
        editable = url.get("url", "").removeprefix("file://")
        where = "" if Path(editable).resolve() == package.parent else f", shadowing the editable install of {editable}"
        return ("editable install" if not where else f"source tree {package.parent}") + where
    if Path(dist.locate_file("kt_sft/__init__.py")).resolve() != package / "__init__.py":
        return f"source tree {package.parent}, shadowing the kt-sft installed in {dist.locate_file('')}"
    tags = [line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
            if line.startswith("Tag:")]
    return f"wheel {', '.join(tags) or '(no tag recorded)'}"


def build_lines(runtime) -> list[str]:
    """How the loaded engine binary was built (runtime.build_info(), compiled into it) and where it was loaded from."""
    from . import _engine

    info = runtime.build_info()
    units = ", ".join(f"{isa} ({' '.join(flags) or 'baseline'})" for isa, flags in info["isa_units"].items())
    return [f"kt-sft build: commit {info['commit']}, {info['compiler']}, {info['python']}, "
            f"pybind11 {info['pybind11']}",
            f"  engine: {_engine.__file__} ({install_kind()})",
            f"  isa units: {units}",
            f"  flags: {' '.join(info['base_flags'])}; link: {' '.join(info['link_flags'])}"]


def cpu_lines(runtime) -> list[str]:
    """CPU model, its feature flags (KT_SFT_CPU_FLAGS_FOR_TESTS may hide some) and the OS state for them."""
    info = runtime.cpu_info()
    lines = [f"cpu: {info['model'] or info['vendor']} ({info['physical_cores']} physical cores available)"]
    shown = info["flags_for_tests"]
    hidden = "" if shown is None else f" (KT_SFT_CPU_FLAGS_FOR_TESTS shows only: {','.join(shown) or 'none'})"
    lines.append("cpu flags: " + " ".join(f"{f}={'yes' if v else 'no'}" for f, v in info["flags"].items()) + hidden)
    lines.append("os state: " + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["os"].items()))
    if info["amx_note"]:
        lines.append(f"amx: unavailable ({info['amx_note']})")
    return lines


def numa_lines(runtime) -> list[str]:
    """The engine's NUMA layout: its nodes, each one's cpus, cores, workers and memory node, and the experts' rule."""
    layout = runtime.numa_layout()
    nodes = layout["nodes"]
    kind = "virtual nodes" if layout["virtual"] else "nodes" if len(nodes) > 1 else "node"
    lines = [f"numa: {len(nodes)} {kind} (setting {layout['setting']}"
             + (f": {layout['reason']})" if layout["reason"] else ")")]
    for i, node in enumerate(nodes):
        memory = f"memory node {node['memory_node']}" if len(nodes) > 1 and node["memory_node"] >= 0 else \
            "memory not bound"
        counts = ", ".join(f"{n} {what}{'s' if n != 1 else ''}" for n, what in ((node["cores"], "core"),
                                                                             (node["workers"], "worker")))
        lines.append(f"  node {i}: cpus {_cpu_list(node['cpus'])} ({counts}), {memory}")
    if len(nodes) > 1:
        lines.append(f"  experts: a layer's expert e of E on node e * {len(nodes)} // E (contiguous ranges, weights in "
                     "that node's memory, its workers first; they help the other nodes when done)")
    if layout["placement_failure"]:
        lines.append(f"  expert memory placement failed: {layout['placement_failure']}")
    return lines


def report(checkpoint: str | None = None) -> str:
    """The environment; with `checkpoint` (a model directory), also what kt-sft makes of that checkpoint."""
    from .checkpoint_formats import SOURCE_FORMATS

    lines = [f"python: {sys.version.split()[0]} ({platform.platform()})"]
    lines += [f"{name}: {_version(name)}" for name in PACKAGES]
    try:
        from .engine import runtime
    except (RuntimeError, ValueError) as err:  # a bad KT_SFT_* variable: the engine refuses to start
        lines.append(f"isa chosen: none ({err})")
        return "\n".join(lines)
    lines += build_lines(runtime)
    lines += cpu_lines(runtime)
    lines.append("isa paths available: " + ", ".join(runtime.available_isas()))
    try:
        lines.append(f"isa chosen: {runtime.current_isa()}  threads: {runtime.num_threads()}")
    except (RuntimeError, ValueError) as err:  # e.g. KT_SFT_ISA names a path this CPU cannot run
        lines.append(f"isa chosen: none ({err})")
    lines += numa_lines(runtime)
    lines.append("checkpoint formats read:")
    lines += [f"  {name:<12} {doc}" for name, doc in SOURCE_FORMATS.items()]
    if checkpoint is not None:
        from .loader import describe

        lines += describe(checkpoint)
    return "\n".join(lines)


def families(readme: str | None = None) -> int:
    """`python -m kt_sft families`: the table of every transformers MoE family with fused experts, the transformers
    it needs and its status; `... families README.md` rewrites that file's table of the installed transformers
    instead (LLaMA-Factory's pin: every family; a newer one: its families beyond the pin's; catalog.readme_table)."""
    from . import readme_tables
    from .models import catalog

    if readme is None:
        sys.stdout.write(catalog.table())
    else:
        readme_tables.rewrite(readme, *catalog.readme_table())
    return 0


USAGE = """usage: python -m kt_sft env [MODEL_DIR]        versions, CPU, ISA paths, threads, NUMA; with MODEL_DIR,
                                               what kt-sft makes of that checkpoint (family, formats, RAM)
       python -m kt_sft families [README.md]   every transformers MoE family, the transformers it needs and
                                               its status (or rewrite README.md's table of this transformers)
       python -m kt_sft eval config.yaml       LLaMA-Factory's MMLU-style evaluator with the hook
                                               (example: examples/eval/demo_eval_kt.yaml)
       python -m kt_sft export --model DIR --adapter DIR --out DIR [--shard-size 5GB] [--format bf16|fp8]
                                               the adapter merged into its base checkpoint, streamed"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:
        from .llamafactory.evaluate import main as run_eval

        return run_eval(argv[1:])
    if argv[:1] == ["export"]:
        from .export import main as run_export

        return run_export(argv[1:])
    if any(a in ("-h", "--help") for a in argv[:2]):
        print(USAGE)
        return 0
    if argv[:1] == ["families"] and len(argv) <= 2:
        return families(*argv[1:])
    if argv[:1] != ["env"] or len(argv) > 2:
        print(USAGE, file=sys.stderr)
        return 2
    print(report(*argv[1:]))
    return 0
