"""Short runs of the engine fuzz (tests/fuzz_engine.py; `make fuzz` runs 1000 cases) and the training soak
(tests/soak_train.py; `make soak` runs 500 steps) within the test suite's time budget; the longer ones are slow."""
import pytest

from fuzz_engine import draw, fuzz
from soak_train import soak


def test_fuzz_cases_are_reproducible_from_their_seed():
    assert draw(12345) == draw(12345) and str(draw(12345)).startswith("seed 12345: ")
    assert len({str(draw(seed)).split(": ")[1] for seed in range(50)}) == 50


def test_fuzz_smoke():
    """The first seeds, for about 12 s (how many depends on the machine; every one that runs must pass)."""
    assert fuzz(start=0, seconds=12, log=None) >= 1


@pytest.mark.slow
def test_fuzz_forty_seconds():
    """Seeds past the smoke's, for 40 s (was 120 s: trimmed with the suite's growth; `make fuzz` runs 5000 cases)."""
    assert fuzz(start=100_000, seconds=40, log=print) >= 6


# Memory growth allowed after warm-up (tests/soak_train.py `growth`: median of the last fifth of the samples minus
# the first fifth's). Measured on the 2-core dev box: 500 steps, 0.84 MiB of RSS after 50 warm-up steps (Python
# objects surviving gc: ~0.1 MiB of it); a leak of one [batch x len x hidden] fp32 activation per engine call would
# add ~0.25 MiB per step, 110 MiB over the run.
SOAK_GROWTH_MIB = 4.0


def test_soak_smoke():
    result = soak(steps=40, warmup=20, log=None)
    assert result["growth_rss"] / 2**20 < SOAK_GROWTH_MIB, result["rss"]
    assert result["growth_cuda"] == 0 or result["growth_cuda"] / 2**20 < SOAK_GROWTH_MIB


@pytest.mark.slow
def test_soak_500_steps_memory_is_flat():
    result = soak(steps=500, warmup=50, log=print)
    print(f"soak: RSS growth after warm-up {result['growth_rss'] / 2**20:.2f} MiB, CUDA "
          f"{result['growth_cuda'] / 2**20:.2f} MiB, {result['seconds']:.0f} s")
    assert result["growth_rss"] / 2**20 < SOAK_GROWTH_MIB
    assert result["growth_cuda"] / 2**20 < SOAK_GROWTH_MIB
