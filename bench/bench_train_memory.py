"""Peak RSS of train.py with and without the chunked LM head (--logits_chunk_mib), side by side.

A large vocabulary makes the float32 logits of a batch the largest tensor of a step: SmolLM2's 49,152
entries x 4 bytes = 192 KiB per completion token, before log-softmax and its gradient. train.py computes
the head over as many tokens at a time as keep their float32 logits under --logits_chunk_mib MiB and
recomputes it in backward. This bench
runs the same few step-kto steps with each setting, in turn (A B A B ...), each in its own process under
GNU time, and reports peak RSS and wall seconds per run.

    .venv/bin/python bench/bench_logits_memory.py --model models/SmolLM2-135M-Instruct \\
        --data runs/smollm2/seed0/step-kto/iter1/labels.jsonl --batch 16 --steps 3 --chunks 0 256 64
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(args, chunk: int, work: Path) -> dict:
    """train.py in a subprocess under /usr/bin/time -v: peak RSS (MiB) and wall seconds."""
    out = work / f"out-{chunk}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".resume"), ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, str(REPO / "train.py"), "--objective", "step-kto",
           "--model", args.model, "--data", args.data, "--output_dir", str(out), "--per_device_batch_size",
           str(args.batch), "--max_steps", str(args.steps), "--lr", "1e-6", "--num_threads", str(args.threads),
           "--save_every", "0", "--logits_chunk_mib", str(chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    fields = dict(line.strip().split(": ", 1) for line in proc.stderr.splitlines() if ": " in line and line.startswith("\t"))
    wall = fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall)))
    return {"chunk": chunk, "peak_rss_mib": int(fields["Maximum resident set size (kbytes)"]) / 1024, "wall_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="label.py output (step-kto rows)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunks", type=float, nargs="+", default=[0, 256], help="--logits_chunk_mib values")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        runs = [one_run(args, chunk, Path(work)) for _ in range(args.rounds) for chunk in args.chunks]
    print(f"| --logits_chunk_mib | peak RSS (MiB), min over {args.rounds} runs | wall s (min) |")
    print("| --- | --- | --- |")
    for chunk in args.chunks:
        mine = [r for r in runs if r["chunk"] == chunk]
        print(f"| {chunk or 'off (0)'} | {min(r['peak_rss_mib'] for r in mine):.0f} | {min(r['wall_s'] for r in mine):.1f} |")
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
