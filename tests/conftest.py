"""Shared fixtures: the ISA paths (`isa`, `vector_isa`) and the tiny-family table (`family`, `tiny_checkpoint`,
`ckpt`); the engine tester's tables are in engine_cases.py, the families' configs in tiny_models.py."""
import os

import pytest
import torch

import kt_sft.engine as ke
from tiny_models import FAMILIES, make_tiny_checkpoint

ISAS = ("scalar", "avx2", "avx512", "amx")


def pytest_configure(config):
    """One torch thread: the tests' tensors are tiny, and torch's intra-op threads only add overhead there (index_add
    of [300, 72]: 0.009 ms on one thread, 0.55 ms on two of a 2-core box; test_offload_parity.py 34 s instead of
    178 s while other processes load those cores). The engine keeps its own pool (KT_SFT_THREADS)."""
    torch.set_num_threads(1)


def isas_under_test() -> list[str]:
    """KT_SFT_ISA pins the run to one path (CI matrix, device runs); otherwise every path is tested."""
    forced = os.environ.get("KT_SFT_ISA")
    return [forced] if forced else list(ISAS)


def _use_isa(request):
    name = request.param
    if name == "amx":
        request.applymarker(pytest.mark.amx)
    ok, why = ke.isa_supported(name)
    if not ok:
        pytest.skip(f"{name} path unavailable here: {why}")
    return ke.use_isa(name)


@pytest.fixture(params=isas_under_test())
def isa(request):
    """Runs the test on one ISA path; skips paths this CPU/OS cannot run (with the reason)."""
    with _use_isa(request):
        yield request.param


@pytest.fixture(params=[name for name in isas_under_test() if name != "scalar"])
def vector_isa(request):
    """`isa` without the scalar path: for tests that compare a path with the scalar one (the executable spec)."""
    with _use_isa(request):
        yield request.param


@pytest.fixture(params=FAMILIES)
def family(request):
    """Every family of tiny_models.FAMILIES (a test parametrizes `family` itself for a subset)."""
    return request.param


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """family -> its tiny fp32 checkpoint (tiny_models.make_tiny_checkpoint), written on first use, once per session.
    Tests must not modify it (copy it first)."""
    root = tmp_path_factory.mktemp("tiny_moe")

    def path(family: str):
        target = root / family
        if not (target / "config.json").exists():
            make_tiny_checkpoint(family, target)
        return target

    return path


@pytest.fixture
def ckpt(tiny_checkpoint, family):
    """The tiny checkpoint of the test's `family` (read-only)."""
    return tiny_checkpoint(family)
