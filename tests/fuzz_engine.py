"""Engine fuzz: random layer shapes, routings, expert formats (with random scale grids), LoRA ranks, GPU shares and
ISA paths, each against its format's plain-PyTorch reference by the engine tester (tests/engine_cases.py
`check_layer`: one tolerance table, the formats' identities). Every case comes from one integer seed and prints it when it fails:

    python tests/fuzz_engine.py --cases 5000             (`make fuzz`; seeds from --start, default 0)
    python tests/fuzz_engine.py --seed 4711              one case again, with its description
    python tests/fuzz_engine.py --seconds 120            as many cases as fit (tests/test_fuzz.py: a short smoke)

Sizes stay small (E <= 12, H and I <= 150, T <= 160): 1000 cases take ~22 s on one core of the 2-core dev box. The
grid of tests/test_engine_parity.py covers the block boundaries deliberately; this covers what nobody thought of.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

import kt_sft.engine as ke
from engine_cases import (REFERENCES, SHARE_DEVICES, Shape, check_layer, format_id, magnitudes, make_case, shape_id,
                          shared_reference)


@dataclass(frozen=True)
class FuzzCase:
    seed: int
    shape: Shape
    format: ke.ExpertFormat
    lora: bool
    share: Optional[str]  # the GPU share's device, or None
    isa: str

    def __str__(self) -> str:
        kind = format_id(self.format) + ("-lora" if self.lora else "") + (f"-share_{self.share}" if self.share else "")
        return f"seed {self.seed}: {shape_id(self.shape)} {kind} on {self.isa}"


def _format(rng: random.Random) -> ke.ExpertFormat:
    """A format row, a third of the time with a random scale grid (fp8 blocks, int4 groups)."""
    fmt = ke.get_format(rng.choice(sorted(ke.FORMATS)))
    if rng.random() < 1 / 3 and fmt.scales == "block":
        if fmt.name == "fp8":
            return fmt.with_scales(block=(rng.randint(1, 40), rng.randint(1, 40)))
        return fmt.with_scales(group=rng.randint(1, 48))
    return fmt


def draw(seed: int) -> FuzzCase:
    """The case of `seed` (the same on every machine but for the ISA, drawn from the paths this CPU runs)."""
    rng = random.Random(seed)
    E = rng.randint(1, 12)
    routing = rng.choice(("uniform", "uniform", "skewed", "one_expert")) if E > 1 else "uniform"
    k = rng.randint(1, min(8, E - 1 if routing == "one_expert" else E))
    share = rng.randint(1, E)
    shape = Shape(E, rng.randint(1, 150), rng.randint(6, 150), rng.choice((1, 2, rng.randint(1, 160))), k, routing,
                  rng.randint(0, 12), rng.randint(0, 12), share, rng.randint(1, share))
    lora = rng.random() < 0.5 and (shape.r_gu > 0 or shape.r_d > 0)  # ranks 0 and 0: no LoRA (the engine refuses)
    return FuzzCase(seed, shape, _format(rng), lora, rng.choice((None, *SHARE_DEVICES)),
                    rng.choice(ke.available_isas()))


def run(case: FuzzCase) -> None:
    """The case against its format's reference (the exact spec), errors relative to the size of each output's terms
    where that is larger (`magnitudes`: a random shape may have one token and rank 1, whose few dw and factor
    gradient values cancel), and not the statistical bound against the unquantized weights, which the grid's sizes
    calibrate. A wrong index or stale buffer still gives errors near 1. An AssertionError says how to run it again."""
    try:
        layer_case = make_case(case.shape, case.format, case.lora, case.share)
        reference = shared_reference(layer_case) if case.share else REFERENCES[case.format.name](layer_case)
        with ke.use_isa(case.isa):
            check_layer(layer_case, str(case), (reference, None), scale=magnitudes(layer_case))
    except Exception as err:  # a mismatch (AssertionError) or an engine error: either way, the seed
        raise AssertionError(f"fuzz case {case} failed: {type(err).__name__}: {err}\n  again: python "
                             f"tests/fuzz_engine.py --seed {case.seed}") from err


def fuzz(start: int = 0, cases: Optional[int] = None, seconds: Optional[float] = None, log=print) -> int:
    """Run seeds start, start + 1, ... until `cases` ran or `seconds` passed; returns how many ran."""
    began, n = time.monotonic(), 0
    while (cases is None or n < cases) and (seconds is None or time.monotonic() - began < seconds):
        case = draw(start + n)
        run(case)
        n += 1
        if log and n % 50 == 0:
            log(f"fuzz: {n} cases passed ({time.monotonic() - began:.0f} s; last {case})")
    return n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, help="how many cases (default 1000 unless --seconds)")
    parser.add_argument("--seconds", type=float, help="stop after this many seconds")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, help="run this one case, printing it")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as tests/conftest.py: the references' tiny ops run ~50x slower on several threads
    if args.seed is not None:
        case = draw(args.seed)
        print(case)
        run(case)
        print("passed")
        return 0
    cases = args.cases if args.cases is not None or args.seconds is not None else 1000
    began = time.monotonic()
    n = fuzz(args.start, cases, args.seconds)
    print(f"fuzz: {n} cases passed (seeds {args.start}..{args.start + n - 1}, {time.monotonic() - began:.0f} s, "
          f"paths {', '.join(ke.available_isas())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
