"""Generation speed on a DeepSeek-V2-Lite-shaped random checkpoint: kt-sft (experts on the CPU engine, the rest on
the GPU) against stock transformers with the whole model on the GPU, in the same run.

Reports prefill tokens/s for one long prompt and decode tokens/s (stock `generate`, KV cache, greedy) at batch 1
and batch 8. Decode speed is measured as the difference of two generate calls (N and N/8 new tokens) so prompt
processing does not count; every call is forced to its full length (no EOS).

    python benchmarks/bench_decode.py --dir /tmp/v2lite-rand --layers 27      # the full V2-Lite shape (31 GB)

--json prints one JSON row per side and measurement on stdout (the table goes to stderr); --record appends them to
benchmarks/results/bench_decode.csv (or --results-dir), the rows BENCHMARKS.md's tables are generated from.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import write_checkpoint  # noqa: E402  (same random checkpoint writer)
import results  # noqa: E402  (benchmarks/results.py: the rows every benchmark records)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prefill_tokens_per_s(model, prompt: int, vocab: int, repeats: int = 3) -> float:
    ids = torch.randint(0, vocab, (1, prompt), device=model.device, generator=None)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            _sync()
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            _sync()
            best = min(best, time.perf_counter() - start)
    return prompt / best


def _generate_seconds(model, batch: int, prompt: int, new: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (batch, prompt), device=model.device)
    _sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    _sync()
    assert out.shape[1] == prompt + new
    return time.perf_counter() - start


def decode_tokens_per_s(model, batch: int, new: int, vocab: int, prompt: int = 32) -> float:
    _generate_seconds(model, batch, prompt, 4, vocab)  # warm-up (allocator, engine buffers, kernels)
    short = _generate_seconds(model, batch, prompt, new // 8, vocab)
    long = _generate_seconds(model, batch, prompt, new, vocab)
    return batch * (new - new // 8) / (long - short)


class ExpertsTimer:
    """Wall time spent inside the kt experts calls (sync on the inputs + engine + staging), to split a step."""

    def __init__(self) -> None:
        import kt_sft.models.experts as experts

        self.module, self.seconds, self.calls = experts, 0.0, 0
        self.original = experts.moe_experts

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = self.original(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

        experts.moe_experts = timed

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def measure(model, args, vocab: int, timer: ExpertsTimer | None = None) -> dict:
    result = {"prefill": prefill_tokens_per_s(model, args.prompt, vocab)}
    for batch in args.batches:
        if timer:
            timer.reset()
        start = time.perf_counter()
        result[f"decode_b{batch}"] = decode_tokens_per_s(model, batch, args.new_tokens, vocab)
        if timer:
            total = time.perf_counter() - start
            result[f"experts_share_b{batch}"] = timer.seconds / total
            print(f"decode b{batch}: {timer.seconds / total:.0%} of the time in {timer.calls} experts calls "
                  f"({timer.seconds / max(timer.calls, 1) * 1e6:.0f} us each)", flush=True)
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/v2lite-rand"))
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--skip-stock", action="store_true", help="only ours (e.g. when the GPU is too small)")
    results.add_arguments(parser)
    return parser.parse_args()


def run(args) -> dict:
    """Both sides measured and the human table printed (ratios last); {side: {metric: value}} returned."""
    if not (args.dir / "config.json").exists():
        start = time.time()
        write_checkpoint(args.dir, args.layers, 2 * 1024 ** 3)
        print(f"wrote {args.dir} ({args.layers} layers) in {time.time() - start:.0f}s", flush=True)

    import kt_sft
    import kt_sft.engine as ke
    from transformers import AutoModelForCausalLM

    ours = kt_sft.load_model(args.dir, dtype=torch.bfloat16, progress=False).eval()
    vocab = ours.config.vocab_size
    print(ours.kt_summary, flush=True)
    measured = {"kt-sft": measure(ours, args, vocab, ExpertsTimer())}
    del ours
    gc.collect()
    torch.cuda.empty_cache()

    if not args.skip_stock:
        stock = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.bfloat16, device_map="cuda").eval()
        impl = getattr(stock.config, "_experts_implementation", None)
        print(f"stock: whole model on {stock.device}, experts_implementation={impl}, "
              f"GPU memory {torch.cuda.memory_allocated() / 1e9:.1f} GB", flush=True)
        measured["stock (all on GPU)"] = measure(stock, args, vocab)

    keys = ["prefill"] + [f"decode_b{b}" for b in args.batches]
    print(f"\n{'tokens/s':<22}" + "".join(f"{k:>14}" for k in keys))
    for name, row in measured.items():
        print(f"{name:<22}" + "".join(f"{row[k]:>14.1f}" for k in keys))
    if len(measured) == 2:
        ours_row, stock_row = measured["kt-sft"], measured["stock (all on GPU)"]
        print(f"{'ratio ours/stock':<22}" + "".join(f"{ours_row[k] / stock_row[k]:>14.2f}" for k in keys))
    print(f"(engine: {ke.current_isa()}, {ke.num_threads()} threads; prompt {args.prompt} tokens for prefill, "
          f"{args.new_tokens} new tokens per decode run)")
    return measured


def result_rows(measured: dict, args) -> list[dict]:
    """One results row per side and measurement (prefill, decode at each batch); ours carries ours/stock."""
    import kt_sft.engine as ke

    run_info = {**results.provenance(ke.current_isa(), ke.num_threads()), "layers": args.layers,
                "prompt": args.prompt, "new_tokens": args.new_tokens}
    stock = measured.get("stock (all on GPU)")
    rows = []
    for side, values in measured.items():
        for phase, batch, key in [("prefill", 1, "prefill")] + [("decode", b, f"decode_b{b}") for b in args.batches]:
            row = {**run_info, "variant": "ours" if side == "kt-sft" else "stock", "phase": phase, "batch": batch,
                   "tokens_per_s": values[key],
                   "experts_share": values.get(f"experts_share_b{batch}") if phase == "decode" else None}
            if side == "kt-sft" and stock:
                row.update(ratio=round(values[key] / stock[key], 3), ratio_of="ours/stock")
            rows.append(row)
    return rows


def main() -> None:
    args = parse_args()
    with results.human_output(args):
        measured = run(args)
    results.emit("bench_decode", result_rows(measured, args), args)


if __name__ == "__main__":
    main()
