"""Per-rank RSS of train.py with 2 gloo ranks (FSDP2) against 1 process, and the size of a resume state per
rank, on a real model; run for two checkouts side by side (e.g. before and after a change to the plumbing), under
glibc's own malloc (what users run) or another allocator.

    .venv/bin/python bench/bench_sharded_memory.py --model models/SmolLM2-135M-Instruct --repo . --repo ../old
    .venv/bin/python bench/bench_sharded_memory.py --model models/SmolLM2-135M-Instruct --repo . \
        --ld_preload /usr/lib/x86_64-linux-gnu/libjemalloc.so.2      # Debian's libjemalloc2
    .venv/bin/python bench/bench_sharded_memory.py --model models/SmolLM2-135M-Instruct --repo . \
        --env MALLOC_MMAP_THRESHOLD_=131072                           # a glibc tunable

For each --repo and each launch (1 process; torchrun with 2 ranks) it trains one epoch of --steps step-kto steps
of a global batch of 4 rows (float32, fused AdamW, a resume state every --save_every steps) in its own processes,
each rank under GNU time, and reports: each rank's peak RSS; its RSS after the first and after the last step (what
it holds while training, the checkpoint's broadcast long done); the largest resume state on disk per rank (the
files of torch.distributed.checkpoint that rank wrote, plus its RNG file, or a single state file written by rank
0); and the median samples/s of the steps after the first (train_log.jsonl). On a CPU a rank's RSS holds what a
GPU would (its parameters, gradients, AdamW states, activations) and what the host holds (a checkpoint being
loaded). glibc's malloc keeps freed tensors below its mmap threshold (raised up to 32 MiB as it goes) in its
heaps, one per allocating thread (gloo's, autograd's); --env MALLOC_MMAP_THRESHOLD_=131072 fixes the threshold, so
that they go back to the OS, and --ld_preload runs every process with another allocator (jemalloc).
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from stepkto import jsonl, models, prompting

GLOBAL_BATCH = 4


def rows(model: str, path: Path, count: int) -> Path:
    """count step-kto rows in the model's chat template: 2 steps each, both labels, both outcomes."""
    tokenizer = models.load_tokenizer(model)
    out = []
    for i in range(count):
        a, b = 10 + i, 20 + 3 * i
        completion = f"We add {a} and {b}.\n\n{a} + {b} = {a + b + i % 2}\n\nThe answer is \\boxed{{{a + b}}}."
        steps = prompting.step_texts(completion, prompting.step_spans(completion))
        out.append({"id": f"r{i}", "prompt": prompting.build_prompt(tokenizer, f"What is {a} + {b}?"),
                    "completion": completion, "finish_reason": "stop", "outcome": i % 2 == 0, "completions": steps,
                    "labels": [True, i % 2 == 0, True]})
    jsonl.write_jsonl_atomic(path, out)
    return path


class StateWatcher(threading.Thread):
    """Polls OUTPUT.resume and the ranks while training runs: the largest resume state seen, in bytes per rank, and
    each rank's RSS in bytes at the moment each step's line appears in train_log.jsonl (rss_at_step[step][rank])."""

    def __init__(self, work: Path):
        super().__init__(daemon=True)
        self.work, self.per_rank, self.rss_at_step, self.done = work, {}, {}, False

    def run(self):
        while not self.done:
            for rank, size in self.sizes().items():
                self.per_rank[rank] = max(self.per_rank.get(rank, 0), size)
            steps = self.logged_steps()
            if steps and steps not in self.rss_at_step:
                self.rss_at_step[steps] = rank_rss(self.work.with_suffix(""))
            time.sleep(0.05)

    def logged_steps(self) -> int:
        try:
            return (self.work / "train_log.jsonl").read_text().count("\n")
        except FileNotFoundError:
            return 0

    def sizes(self) -> dict:
        try:
            if (self.work / "state.pt").exists():  # one unsharded file, written by rank 0
                return {0: (self.work / "state.pt").stat().st_size}
            sizes = {}  # the largest one state of each rank: the newest is written before the last is removed
            for folder in self.work.glob("state-*"):
                in_folder = {}
                for f in folder.iterdir():
                    if f.name.endswith(".distcp"):  # __<rank>_<n>.distcp
                        rank = int(f.name[2:].split("_")[0])
                    elif f.name.startswith("rank") and f.suffix == ".pt":
                        rank = int(f.stem[4:])
                    else:
                        continue
                    in_folder[rank] = in_folder.get(rank, 0) + f.stat().st_size
                for rank, size in in_folder.items():
                    sizes[rank] = max(sizes.get(rank, 0), size)
            return sizes
        except (FileNotFoundError, ValueError):
            return {}


def rank_rss(out: Path) -> dict:
    """{rank: RSS in bytes} of the train.py processes writing OUTPUT=out (their RANK, 0 without torchrun)."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if len(argv) < 2 or not argv[1].endswith(b"train.py") or str(out).encode() not in argv:
                continue
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
            status = (proc / "status").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
        found[int(env.get(b"RANK", b"0"))] = rss
    return found


def launch(repo: Path, model: str, data: Path, ranks: int, work: Path, steps: int, save_every: int, env: dict) -> dict:
    out = work / f"out{ranks}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}.resume", ignore_errors=True)
    train = [str(repo / "train.py"), "--objective", "step-kto", "--model", model, "--data", str(data), "--output_dir",
             str(out), "--per_device_batch_size", str(GLOBAL_BATCH // ranks), "--max_steps", str(steps),
             "--save_every", str(save_every), "--lr", "1e-5", "--optim", "adamw_fused", "--num_threads", "1",
             "--log_every", "1"]
    timed = f'/usr/bin/time -f %M -o "{work}/rss-{ranks}-$RANK" {shlex.quote(sys.executable)} "$@"'
    if ranks == 1:
        cmd = ["bash", "-c", timed.replace("$RANK", "0"), "--", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "--no-python", "bash", "-c", timed, "--", *train]
    watcher = StateWatcher(Path(f"{out}.resume"))
    watcher.start()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env})
    watcher.done = True
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss = [int((work / f"rss-{ranks}-{r}").read_text().split()[-1]) / 1024 for r in range(ranks)]
    log = [json.loads(line) for line in jsonl.jsonl_lines((out / "train_log.jsonl").read_text())]
    at_step = {step: [by_rank.get(r, 0) / 2**20 for r in range(ranks)] for step, by_rank in watcher.rss_at_step.items()}
    return {"repo": str(repo), "ranks": ranks, "peak_rss_mib": rss, "rss_at_step_mib": at_step,
            "state_mib": {r: s / 2**20 for r, s in sorted(watcher.per_rank.items())},
            "samples_per_s": statistics.median(e["samples_per_s"] for e in log[1:] or log),  # after the first step
            "wall_s": time.perf_counter() - start}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--repo", action="append", required=True, help="A checkout whose train.py to run (repeatable).")
    parser.add_argument("--ld_preload", default="", help="A malloc to run every process with (LD_PRELOAD).")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for every process (repeatable).")
    parser.add_argument("--steps", type=int, default=3, help="Training steps per launch.")
    parser.add_argument("--save_every", type=int, default=1, help="Steps between resume states (past --steps: none).")
    args = parser.parse_args()
    env = dict(kv.split("=", 1) for kv in args.env) | ({"LD_PRELOAD": args.ld_preload} if args.ld_preload else {})
    with tempfile.TemporaryDirectory() as tmp:
        data = rows(args.model, Path(tmp) / "rows.jsonl", GLOBAL_BATCH * args.steps)  # one epoch of --steps steps
        results = [launch(Path(repo).resolve(), str(Path(args.model).resolve()), data, ranks, Path(tmp), args.steps,
                          args.save_every, env) for repo in args.repo for ranks in (1, 2)]
    print(f"environment: {env or 'glibc malloc, no tunables'}")
    print("| checkout | processes | peak RSS per rank (MiB) | RSS after step 1 | RSS after the last step | "
          "resume state per rank (MiB) | samples/s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        per_rank = lambda values: " / ".join(f"{v:,.0f}" for v in values) or "-"  # noqa: E731
        steps = r["rss_at_step_mib"]
        first, last = (steps[min(steps)], steps[max(steps)]) if steps else ([], [])
        print(f"| {r['repo']} | {r['ranks']} | {per_rank(r['peak_rss_mib'])} | {per_rank(first)} | {per_rank(last)} "
              f"| {per_rank(r['state_mib'].values())} | {r['samples_per_s']:.2f} | {r['wall_s']:.0f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
