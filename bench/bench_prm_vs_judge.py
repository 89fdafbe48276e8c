"""A trained PRM against the LLM judge as step labeller, in one run on the same solutions: model tokens processed per
solution and wall time of label.py's reward_model labeller (one forward pass per solution) against its judge's step
protocol (one generation per step) and first_error protocol (one per solution).

The models are tiny random Qwen2s of the same size (hidden 128, 2 layers; tests/helpers.py): a
Qwen2ForProcessRewardModel and a Qwen2ForCausalLM judge, both in this process (transformers, float32, CPU), so the
ratio is one of tokens and passes, not of model quality. A random judge never stops early: every reply runs to
--judge_max_new_tokens (a one-word verdict's budget; a judge that reasons first spends far more).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_prm_vs_judge.py --rows 100

Prints a markdown table (bench/BENCHMARKS.md section 19).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

from stepkto import jsonl, prm_models, prompting
import label  # noqa: E402
from helpers import save_tiny_qwen_lm, save_tiny_qwen_prm  # noqa: E402
from processbench_labellers import CountingEngine, as_label_rows, evenly_spaced, join_gsm8k  # noqa: E402


def load_rows(tokenizer, data: Path, count: int) -> list[dict]:
    bench_rows = join_gsm8k(evenly_spaced(jsonl.read_json(data / "processbench_gsm8k.json"), count), data)
    return as_label_rows(bench_rows, tokenizer, with_reference=True)


def run_prm(rows: list[dict], spans: list, prm: str, chunk: int) -> dict:
    settings = label.Settings(prm="reward_model", prm_model=prm)
    tokenizer, spec, _ = label.get_prm(settings)  # loaded outside the timed part, as the judge's engine is
    start = time.perf_counter()
    for i in range(0, len(rows), chunk):  # label.py's chunks: one labeller call each
        label.reward_model_labeller(rows[i : i + chunk], spans[i : i + chunk], settings)
    seconds = time.perf_counter() - start
    tokens = sum(len(prm_models.encode_solution(tokenizer, spec, r["problem"], prompting.step_texts(r["completion"], s),
                                                r["id"]).ids) for r, s in zip(rows, spans))
    return {"tokens": tokens, "seconds": seconds, "passes": len(rows)}


def run_judge(rows: list[dict], spans: list, judge: str, protocol: str, max_new_tokens: int, chunk: int) -> dict:
    settings = label.Settings(prm="judge", judge_model=judge, judge_engine="transformers", judge_protocol=protocol,
                              judge_max_new_tokens=max_new_tokens)
    counter = CountingEngine(label.get_judge(settings))
    start = time.perf_counter()
    for i in range(0, len(rows), chunk):  # the transformers engine pads a chunk's prompts into one batch
        label.judge_labeller(rows[i : i + chunk], spans[i : i + chunk], settings, counter)
    seconds = time.perf_counter() - start
    passes = sum(len(s) for s in spans) if protocol == "step" else sum(bool(s) for s in spans)
    return {"tokens": counter.prompt_tokens + counter.generated_tokens, "seconds": seconds, "passes": passes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100, help="ProcessBench GSM8K rows, evenly spaced")
    parser.add_argument("--judge_max_new_tokens", type=int, default=8, help="tokens per judge reply")
    parser.add_argument("--chunk_size", type=int, default=4, help="rows per labeller call (label.py --chunk_size)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    cli = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        _, _, tokenizer = save_tiny_qwen_prm(Path(tmp) / "prm", max_len=16384)
        judge = save_tiny_qwen_lm(Path(tmp) / "judge", max_len=16384)  # byte-level: a token a byte
        rows = load_rows(tokenizer, cli.data, cli.rows)
        spans = [prompting.step_spans(r["completion"]) for r in rows]
        results = {"reward_model (qwen_prm)": run_prm(rows, spans, str(Path(tmp) / "prm"), cli.chunk_size)}
        for protocol in ("step", "first_error"):
            results[f"judge, {protocol} protocol"] = run_judge(rows, spans, judge, protocol, cli.judge_max_new_tokens,
                                                               cli.chunk_size)
    steps = sum(map(len, spans))
    print(f"{len(rows)} ProcessBench GSM8K rows ({steps} steps), tiny random Qwen2s of one size, transformers, float32; "
          f"judge replies of {cli.judge_max_new_tokens} tokens; {cli.chunk_size} rows per labeller call\n")
    print("| labeller | model passes | model tokens per solution | wall time (s) | x the PRM's tokens | x the PRM's time |")
    print("|---|---|---|---|---|---|")
    base = results["reward_model (qwen_prm)"]
    for name, r in results.items():
        print(f"| {name} | {r['passes']} | {r['tokens'] / len(rows):,.0f} | {r['seconds']:.1f} | "
              f"{r['tokens'] / base['tokens']:.1f} | {r['seconds'] / base['seconds']:.1f} |")


if __name__ == "__main__":
    main()
