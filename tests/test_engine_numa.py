"""NUMA (csrc/numa.h, `ke.set_numa` / `use_numa`, KT_SFT_NUMA, LoadOptions.numa, kt_numa): the experts split over
nodes, each node's range placed in its memory and run by its pinned workers first, which then steal the other nodes'
tasks. This host has one node, so the split is tested on virtual nodes (N > 1 splits its cores): the results must
be bitwise those of one node, on every ISA path, for every format with and without LoRA, and with node counts that do
not divide the experts (3) or exceed them."""
import os
import re
import subprocess
import sys

import pytest
import torch

import kt_sft
import kt_sft.engine as ke
from engine_cases import KINDS, Shape, case_layer, make_case, outputs_equal, run_layer, shape_id
from kt_sft.env import report
from kt_sft.load_options import LoadOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_KINDS = [pytest.param(kind, id=str(kind)) for kind in KINDS if kind.share is None]
# Shape: why it is in the NUMA grid.
SHAPES = {
    Shape(6, 72, 40, 300, 4, "skewed", 16, 8): "skewed routing: one node's experts get most rows (its workers steal)",
    Shape(8, 48, 64, 40, 1, "one_expert", 2, 6): "every token on expert 0: node 0 alone has work",
    Shape(5, 33, 17, 7, 3, "uniform", 3, 5): "odd sizes, 5 experts over 2 or 3 nodes (uneven ranges)",
    Shape(2, 40, 24, 9, 2, "uniform", 2, 3): "fewer experts than 3 nodes: a node without experts",
    Shape(16, 64, 48, 5, 2, "uniform", 8, 4): "more experts than rows: most empty (zero LoRA grads)",
}
# (virtual nodes, engine threads; 0: the default): on a 2-core box (3, 0) leaves a node without workers (its tasks are
# all stolen) and (3, 4) puts workers on every node.
SPLITS = [(2, 0), (3, 0), (3, 4)]


def run_on(setting, threads: int, case):
    """Forward + backward (+ LoRA grads) of the case on a layer made under the NUMA setting, with `threads` workers
    (0: the default); the layer's expert ranges too."""
    before = ke.num_threads()
    with ke.use_numa(setting):
        ke.set_num_threads(threads)
        try:
            layer = case_layer(case)
            return run_layer(layer, case), layer.expert_nodes
        finally:
            ke.set_num_threads(before)


@pytest.mark.parametrize("kind", ENGINE_KINDS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=[shape_id(s) for s in SHAPES])
def test_split_over_nodes_is_bitwise_one_node(isa, kind, shape):
    case = make_case(shape, kind.format, kind.lora)
    one, ranges = run_on("off", 0, case)
    assert ranges == [(0, shape.E, -1)]
    for nodes, threads in SPLITS:
        got, ranges = run_on(nodes, threads, case)
        assert len(ranges) == nodes and ranges[0][0] == 0 and ranges[-1][1] == shape.E
        assert outputs_equal(got, one), f"{nodes} nodes, {threads} threads: {SHAPES[shape]}"


def test_experts_in_contiguous_ranges_by_the_rule():
    """Expert e of E on node e * N // E: contiguous, sizes differing by at most one, the same for every layer."""
    for E in (1, 2, 5, 8, 64, 160, 257):
        for N in (2, 3):
            with ke.use_numa(N):
                ranges = ke.expert_nodes(E)
            assert [node for node in range(N) for _ in range(*ranges[node][:2])] == [e * N // E for e in range(E)]


def test_virtual_layout_splits_the_cores_and_binds_memory():
    """N virtual nodes: the process's cpus shared out (each node at least one), the pool's workers spread over them,
    each node's expert pages bound to the one memory node (MPOL_PREFERRED, visible in /proc/self/numa_maps)."""
    cpus = sorted(os.sched_getaffinity(0))
    for nodes in (2, 3):
        with ke.use_numa(nodes) as layout:
            assert layout["setting"] == str(nodes) and layout["virtual"] and len(layout["nodes"]) == nodes
            assert "virtual nodes" in layout["reason"] and not layout["placement_failure"]
            assert sorted({c for n in layout["nodes"] for c in n["cpus"]}) == cpus
            assert all(n["cpus"] for n in layout["nodes"])
            assert sum(n["workers"] for n in layout["nodes"]) == ke.num_threads()
            layer = ke.ExpertLayer(8, 64, 96, "bf16")
            memory = layout["nodes"][0]["memory_node"]
            assert [r[2] for r in layer.expert_nodes] == [memory] * nodes
            address, nbytes = layer._layer.panel_storage(0)
            if memory >= 0 and os.path.exists("/proc/self/numa_maps"):
                assert f"prefer:{memory}" in _numa_policy(address), _numa_policy(address)
    with ke.use_numa("off") as layout:
        assert len(layout["nodes"]) == 1 and layout["reason"] == "the setting is off"
        layer = ke.ExpertLayer(8, 64, 96, "bf16")
        assert layer.expert_nodes == [(0, 8, -1)]  # one node: nothing bound


def _numa_policy(address: int) -> str:
    """The /proc/self/numa_maps line of the mapping that holds `address` ("" if none)."""
    with open("/proc/self/numa_maps") as f:
        starts = [(int(line.split()[0], 16), line) for line in f]
    below = [item for item in starts if item[0] <= address]
    return max(below)[1] if below else ""


def test_layers_made_before_a_change_keep_their_ranges_and_results():
    """A layer made on one node still runs (on one range) after set_numa(2), bitwise as before, and vice versa."""
    case = make_case(Shape(6, 72, 40, 50, 2, "skewed", 4, 4), "bf16", True)
    with ke.use_numa("off"):
        on_one = case_layer(case)
        want = run_layer(on_one, case)
    with ke.use_numa(2):
        on_two = case_layer(case)
        assert outputs_equal(run_layer(on_one, case), want)
    assert len(on_two.expert_nodes) == 2 and outputs_equal(run_layer(on_two, case), want)


@pytest.mark.parametrize("value", ["abc", 0, -1, "0", "-1", 65, True, "2.5", ""])
def test_bad_settings_are_refused(value):
    with pytest.raises(ValueError, match=r"numa: expected auto \(the host's nodes\), off, or a number of nodes"):
        ke.set_numa(value)
    with pytest.raises(ValueError, match=r"numa: expected auto"):
        LoadOptions(numa=value)


def test_load_options_normalize_the_setting():
    assert LoadOptions(numa="2").numa == 2 and LoadOptions(numa=3).numa == 3
    assert LoadOptions(numa="off").numa == "off" and LoadOptions().numa is None


def test_load_model_places_the_layers_on_the_nodes(tiny_checkpoint):
    with ke.use_numa("off"):
        model = kt_sft.load_model(tiny_checkpoint("qwen3_moe"), device="cpu", dtype=torch.float32, progress=False,
                                  numa=2)
        layers = [m.kt_layer for m in model.modules() if hasattr(m, "kt_layer")]
        assert layers and all(len(layer.expert_nodes) == 2 for layer in layers)
        assert len(ke.numa_layout()["nodes"]) == 2


def test_env_report_shows_the_layout():
    with ke.use_numa(2):
        text = report()
    assert re.search(r"^numa: 2 virtual nodes \(setting 2: 2 virtual nodes over the \d+ cores of one node", text, re.M)
    assert re.search(r"^  node 1: cpus [\d,-]+ \(\d+ cores?, \d+ workers?\), memory node \d+$", text, re.M)
    assert "expert e of E on node e * 2 // E" in text
    with ke.use_numa("off"):
        assert re.search(r"^numa: 1 node \(setting off: the setting is off\)$", report(), re.M)


def _engine_in_subprocess(code: str, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KT_SFT_")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          timeout=180, cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize("value", ["abc", "0", "-1", "2x", " 2"])
def test_bad_variable_fails_at_start_up(value):
    proc = _engine_in_subprocess("import kt_sft.engine", KT_SFT_NUMA=value)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ValueError: KT_SFT_NUMA='{value}': expected auto (the host's nodes), off, or a number of "
                           "nodes from 1 to 64"), proc.stderr[-2000:]


@pytest.mark.slow
def test_variable_sets_the_layout_at_start_up():
    code = ("import kt_sft.engine as ke; l = ke.numa_layout(); "
            "print(l['setting'], len(l['nodes']), ke.ExpertLayer(5, 32, 32).expert_nodes)")
    proc = _engine_in_subprocess(code, KT_SFT_NUMA="3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split(" ", 2)[:2] == ["3", "3"]
    assert [r[:2] for r in eval(proc.stdout.split(" ", 2)[2])] == [(0, 2), (2, 4), (4, 5)]
