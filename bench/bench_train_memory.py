"""Peak RSS and speed of train.py under several settings, side by side (each run its own process).

Each variant is a name and the train.py options it adds; the variants run in turn (A B A B ...), each the
same few step-kto steps on the same rows under GNU time, and the bench prints peak RSS, wall seconds and
the training loop's samples/s (train_log.jsonl, steps after the first) per variant, with ratios to the first.

Full fine-tuning vs LoRA (BENCHMARKS "LoRA"):

    .venv/bin/python bench/bench_train_memory.py --model models/SmolLM2-135M-Instruct \\
        --data runs/smollm2/seed0/step-kto/iter1/labels.jsonl --batch 16 --steps 5 --rounds 2 \\
        --variant "full=--optim adamw_fused" --variant "lora=--optim adamw_fused --lora_r 16"

The chunked LM head (BENCHMARKS section 10):

    .venv/bin/python bench/bench_train_memory.py --model models/SmolLM2-135M-Instruct \\
        --data runs/smollm2/gsm8k_zero_shot/greedy_labels.jsonl --batch 16 --steps 2 --rounds 1 \\
        --variant "chunk 0=--logits_chunk_mib 0" --variant "chunk 256=--logits_chunk_mib 256" \\
        --variant "chunk 64=--logits_chunk_mib 64"
"""

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(args, name: str, options: str, work: Path) -> dict:
    """train.py in a subprocess under /usr/bin/time -v: peak RSS (MiB), wall seconds, loop samples/s."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".resume"), ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, str(REPO / "train.py"), "--objective", "step-kto",
           "--model", args.model, "--data", args.data, "--output_dir", str(out), "--per_device_batch_size",
           str(args.batch), "--max_steps", str(args.steps), "--lr", "1e-6", "--num_threads", str(args.threads),
           "--save_every", "0", "--log_every", "1", *shlex.split(options)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    fields = dict(line.strip().split(": ", 1) for line in proc.stderr.splitlines() if ": " in line and line.startswith("\t"))
    wall = fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().split("\n") if line]
    return {
        "variant": name,
        "peak_rss_mib": int(fields["Maximum resident set size (kbytes)"]) / 1024,
        "wall_s": sum(float(part) * 60**i for i, part in enumerate(reversed(wall))),
        "samples_per_s": statistics.median(entry["samples_per_s"] for entry in log[1:] or log),
    }


def table(runs: list[dict], variants: list[tuple[str, str]]) -> str:
    best = {name: {key: (max if key == "samples_per_s" else min)(r[key] for r in runs if r["variant"] == name)
                   for key in ("peak_rss_mib", "wall_s", "samples_per_s")} for name, _ in variants}
    first = best[variants[0][0]]
    lines = ["| variant | train.py options | peak RSS (MiB) | wall s | loop samples/s |", "| --- | --- | --- | --- | --- |"]
    for name, options in variants:
        b = best[name]
        ratios = [b[k] / first[k] for k in ("peak_rss_mib", "wall_s", "samples_per_s")]
        lines.append(f"| {name} | `{options}` | {b['peak_rss_mib']:,.0f} ({ratios[0]:.2f}x) | {b['wall_s']:.1f} "
                     f"({ratios[1]:.2f}x) | {b['samples_per_s']:.3f} ({ratios[2]:.2f}x) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="label.py output (step-kto rows)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", action="append", required=True, help="NAME=train.py options (repeat)")
    args = parser.parse_args()
    variants = [tuple(v.split("=", 1)) if "=" in v else (v, "") for v in args.variant]
    with tempfile.TemporaryDirectory() as work:
        runs = [one_run(args, name, options, Path(work)) for _ in range(args.rounds) for name, options in variants]
    print(f"best of {args.rounds} round(s) per variant; ratios to {variants[0][0]}")
    print(table(runs, variants))
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
