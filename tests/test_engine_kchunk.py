"""The K-chunk setting (`ke.set_kchunk` / `ke.use_kchunk`; `KT_SFT_KCHUNK` at start-up). That chunked GEMMs are
bitwise the one-pass ones is a row of the engine tester (test_engine_parity.py, every kind x shape x path)."""
import pytest

import kt_sft.engine as ke


def test_use_kchunk_restores_the_setting():
    before = ke.kchunk()
    with ke.use_kchunk(64) as k:
        assert k == 64 and ke.kchunk() == 64
        with ke.use_kchunk(None):  # the default: KT_SFT_KCHUNK, else the ISA path's own
            assert ke.kchunk() == before
    assert ke.kchunk() == before


@pytest.mark.parametrize("value", [48, -32, 33])
def test_bad_kchunk_is_refused(value):
    with pytest.raises(ValueError, match=r"kchunk must be 0 \(one pass\) or a positive multiple of 32"):
        ke.set_kchunk(value)
