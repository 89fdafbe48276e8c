"""Host memory of each rank right after train.py's sharded load (distributed.build_policy under torchrun: rank 0 reads
the checkpoint, broadcasts it into every rank's FSDP2 shard and frees it), for checkouts side by side: what glibc's
malloc keeps of rank 0's freed copy of the model before training allocates anything.

    .venv/bin/python bench/bench_load_memory.py --model models/SmolLM2-135M-Instruct --repo ../old --repo .
    .venv/bin/python bench/bench_load_memory.py --model models/SmolLM2-135M-Instruct --repo . --dtype bfloat16 \
        --env MALLOC_MMAP_THRESHOLD_=131072

For each --repo: torchrun with --ranks gloo ranks runs this file's worker, which imports that checkout's train.py
and stepkto/distributed.py and reports each rank's RSS before the load (torch imported, the process group up), after
build_policy returns, and its peak (VmHWM), with the size of the model's weights.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def status_mib(field: str) -> float:
    """VmRSS or VmHWM of this process, in MiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def worker(repo: str, model: str, dtype: str) -> None:
    """One rank: the sharded load of that checkout's train.py, its RSS before and after."""
    sys.path.insert(0, repo)
    import torch

    from stepkto import distributed, models, scoring
    import train

    args = train.Args(objective="step-kto", model=model, data="-", output_dir="-", dtype=dtype)
    env = distributed.init_distributed()
    before = status_mib("VmRSS")
    policy = distributed.build_policy(model, args, models.tokenizer_for(model), None, env, True,
                                      scoring.CompletionLogProbs)
    after, peak = status_mib("VmRSS"), status_mib("VmHWM")
    local = sum(p.to_local().numel() * p.element_size() if hasattr(p, "to_local") else p.numel() * p.element_size()
                for p in policy.parameters()) / 2**20
    rows = distributed.gather_objects({"rank": env.rank, "before": before, "after": after, "peak": peak, "shard": local})
    if env.rank == 0:
        print("RESULT " + json.dumps(rows), flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def launch(repo: Path, args) -> list:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
           __file__, "--worker", str(repo), "--model", args.model, "--dtype", args.dtype]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           **dict(kv.split("=", 1) for kv in args.env)}
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--repo", action="append", default=[], help="A checkout whose train.py to load with.")
    parser.add_argument("--ranks", type=int, default=2, help="gloo ranks under torchrun.")
    parser.add_argument("--dtype", default="float32", help="train.py --dtype: the weights' dtype.")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for every rank (repeatable).")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = str(Path(args.model).resolve())
    if args.worker:
        return worker(args.worker, args.model, args.dtype)
    print(f"environment: {args.env or 'glibc malloc, no tunables'}; --dtype {args.dtype}; {args.ranks} ranks")
    print("| checkout | rank | RSS before the load (MiB) | RSS after the load | peak RSS | its shard of the weights |")
    print("|---|---|---|---|---|---|")
    for repo in args.repo:
        for r in launch(Path(repo).resolve(), args):
            print(f"| {repo} | {r['rank']} | {r['before']:,.0f} | {r['after']:,.0f} | {r['peak']:,.0f} | "
                  f"{r['shard']:,.0f} |")


if __name__ == "__main__":
    main()
