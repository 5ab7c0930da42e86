import os

import pytest

import kt_sft.engine as ke

ISAS = ("scalar", "avx2", "avx512", "amx")


def isas_under_test() -> list[str]:
    """KT_SFT_ISA pins the run to one path (CI matrix, device runs); otherwise every path is tested."""
    forced = os.environ.get("KT_SFT_ISA")
    return [forced] if forced else list(ISAS)


@pytest.fixture(params=isas_under_test())
def isa(request):
    """Runs the test on one ISA path; skips paths this CPU/OS cannot run (with the reason)."""
    name = request.param
    if name == "amx":
        request.applymarker(pytest.mark.amx)
    ok, why = ke.isa_supported(name)
    if not ok:
        pytest.skip(f"{name} path unavailable here: {why}")
    with ke.use_isa(name):
        yield name
