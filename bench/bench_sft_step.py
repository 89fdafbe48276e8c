"""Time one SFT step of the embedded default's tiny model (eager, torch.compile, bf16 autocast) and profile it.

    .venv/bin/python bench/bench_sft_step.py                      # eager, compile, bf16: ms/step and tokens/s
    .venv/bin/python bench/bench_sft_step.py --modes eager eager_attention bf16_compile eager eager_attention bf16_compile
    .venv/bin/python bench/bench_sft_step.py --modes eager --profile   # where an eager step's CPU time goes

The model is run.sh's M0 architecture (models.make_tiny_llama: hidden 128, 2 layers, MLP 384); a step is a batch of
32 rows x 110 tokens (--length), the causal-LM loss, backward and an AdamW step: what `train.py --objective sft`
spent 488 of its 512 s on in the previous default's run (bench/BENCHMARKS.md section 12). 110 tokens is the previous
default's row, one token per character (SCRATCH_TOKENIZER=char): seed 0's SFT rows average 121.5 tokens with run.sh's
minimal prompt (the mean of policy.pair_length over train.load_examples of runs/seed0/data/sft.jsonl), so real rows
are about 10% longer. With the phrase tokenizer run.sh now uses they average 49.2 tokens (--length 49; bench/BENCHMARKS.md
section 13). Each mode builds a fresh model, runs 5 untimed steps, then times
--steps steps. Modes: eager (as train.py), compile (torch.compile of the forward), bf16 (bf16 autocast),
bf16_compile (both), eager_attention (transformers' plain attention instead of SDPA).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stepkto import models


MODES = ["eager", "compile", "bf16", "bf16_compile", "eager_attention"]


def sft_step_fn(mode: str, batch: int, length: int):
    """A closure doing one SFT step of a fresh tiny model in this mode."""
    model = models.make_tiny_llama(models.make_char_tokenizer(), 128, 2, 384, 512)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(4, 90, (batch, length), generator=torch.Generator().manual_seed(0))  # (B, S)
    if mode == "eager_attention":
        model.set_attn_implementation("eager")
    if mode in ("compile", "bf16_compile"):
        model.forward = torch.compile(model.forward)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("bf16")):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["eager", "compile", "bf16"], choices=MODES)
    parser.add_argument("--steps", type=int, default=40, help="Timed steps per mode.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=110)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="Profile 10 steps of each mode instead of timing.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for mode in args.modes:
        step = sft_step_fn(mode, args.batch, args.length)
        for _ in range(5):
            step()
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    step()
            print(f"== {mode}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
            continue
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = (time.perf_counter() - start) / args.steps
        print(f"{mode}: {1000 * seconds:.1f} ms/step, {args.batch * args.length / seconds:,.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
