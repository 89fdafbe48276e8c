"""The served judge against the in-process one, side by side in one run: labels per second of label.py's step
protocol, the server's prefix-cache hit rate, and the start-up each in-process stage pays for its judge.

The same rows (ProcessBench GSM8K, evenly spaced, with GSM8K's reference solutions) and the same model, greedy:

* in-process: a fresh ``label.py``-like process in .venv-vllm (``--judge_engine vllm``): its engine start-up, then
  label.label_rows over the rows;
* served: a vLLM server of the same model started once (its start-up until /health answers), then label.label_rows
  through it (``--judge_engine openai``) at each --concurrency, the server's prefix cache emptied before each
  (VLLM_SERVER_DEV_MODE's /reset_prefix_cache) and its hit rate read from /metrics after.

    .venv-vllm/bin/python bench/bench_served_judge.py --model models/SmolLM2-135M-Instruct --rows 24

Prints a markdown table (bench/BENCHMARKS.md section 18). Both sides run on the same CPU cores, one after the other.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

from stepkto import jsonl, models, prompting
import label  # noqa: E402
from helpers import vllm_server  # noqa: E402
from processbench_labellers import as_label_rows, evenly_spaced, join_gsm8k  # noqa: E402

IN_PROCESS = """
import json, sys, time
start = time.perf_counter()
sys.path.insert(0, ".")
import generate, label
rows, settings = json.load(open(sys.argv[1])), label.Settings(**json.loads(sys.argv[2]))
imported = time.perf_counter()
label.get_judge(settings)
started = time.perf_counter()
labelled = label.label_rows(rows, settings)
done = time.perf_counter()
print("RESULT " + json.dumps({"imports_s": imported - start, "engine_s": started - imported, "label_s": done - started,
                              "labels": [r["labels"] for r in labelled]}))
"""


def load_rows(model: str, data: Path, count: int) -> list[dict]:
    bench_rows = join_gsm8k(evenly_spaced(jsonl.read_json(data / "processbench_gsm8k.json"), count), data)
    rows = as_label_rows(bench_rows, models.load_tokenizer(model), with_reference=True)
    return [{**r, "problem_id": r["id"], "finish_reason": "stop"} for r in rows]


def in_process(rows_file: Path, settings: label.Settings) -> dict:
    """One fresh process with the in-process vLLM judge: its wall time, split into imports, engine and labelling."""
    options = {"prm": "judge", "judge_model": settings.judge_model, "judge_engine": "vllm",
               "judge_max_new_tokens": settings.judge_max_new_tokens}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", IN_PROCESS, str(rows_file), json.dumps(options)], cwd=REPO,
                          capture_output=True, text=True, check=True)
    return {**json.loads(proc.stdout.split("RESULT ")[-1]), "wall_s": time.perf_counter() - start}


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=30) as reply:
        lines = reply.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{") or line.startswith(name + " "))


def served_run(url: str, rows: list[dict], settings: label.Settings, concurrency: int) -> dict:
    """label_rows through the server at ``concurrency``, from an empty prefix cache."""
    urllib.request.urlopen(urllib.request.Request(url.removesuffix("/v1") + "/reset_prefix_cache", method="POST"))
    before = {name: metric(url, name) for name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total")}
    start = time.perf_counter()
    labelled = label.label_rows(rows, replace(settings, judge_max_concurrency=concurrency))
    seconds = time.perf_counter() - start
    after = {name: metric(url, name) for name in before}
    queries = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    return {"label_s": seconds, "hit_rate": hits / queries if queries else float("nan"),
            "labels": [r["labels"] for r in labelled]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--rows", type=int, default=24, help="ProcessBench GSM8K rows, evenly spaced")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated requests in flight")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="tokens per judge reply")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_served_judge"))
    cli = parser.parse_args()
    cli.workdir.mkdir(parents=True, exist_ok=True)
    rows = load_rows(cli.model, cli.data, cli.rows)
    steps = sum(len(prompting.step_spans(r["completion"])) for r in rows)
    jsonl.write_json_atomic(cli.workdir / "rows.json", rows)
    settings = label.Settings(prm="judge", judge_model=cli.model, judge_max_new_tokens=cli.max_new_tokens)
    local = in_process(cli.workdir / "rows.json", settings)
    start = time.perf_counter()
    with vllm_server(cli.model, cli.workdir / "server.log", env={"VLLM_SERVER_DEV_MODE": "1"}) as url:
        server_s = time.perf_counter() - start
        remote = replace(settings, judge_engine="openai", judge_base_url=url)
        label.label_rows(rows[:1], remote)  # the first request's one-time costs, outside the timed runs
        runs = {c: served_run(url, rows, remote, c) for c in map(int, cli.concurrency.split(","))}
    print(report(cli, len(rows), steps, local, server_s, runs))


def report(cli, n_rows: int, steps: int, local: dict, server_s: float, runs: dict) -> str:
    lines = [f"{n_rows} ProcessBench GSM8K rows, {steps} steps, judge {Path(cli.model).name}, step protocol, "
             f"up to {cli.max_new_tokens} tokens per reply", "",
             "| judge | start-up (s) | labelling (s) | labels / s | prefix-cache hit rate | labels as in-process |",
             "|---|---|---|---|---|---|",
             f"| in-process vLLM | {local['imports_s'] + local['engine_s']:.1f} (imports {local['imports_s']:.1f}, "
             f"engine {local['engine_s']:.1f}) | {local['label_s']:.1f} | {steps / local['label_s']:.2f} | - | - |"]
    for c, run in runs.items():
        lines.append(f"| served, concurrency {c} | {server_s:.1f} once per run (server) | {run['label_s']:.1f} | "
                     f"{steps / run['label_s']:.2f} | {run['hit_rate']:.1%} | {run['labels'] == local['labels']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
