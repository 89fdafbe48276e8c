"""generate.py (transformers engine) against a plain per-problem `model.generate` loop: tokens/s.

    .venv/bin/python bench/bench_generate.py [--model runs/seed0/M0 --problems runs/seed0/data/test.jsonl]

Same model, same prompts (the first `--num_problems` problems, run.sh's minimal prompt), the same
sampling settings (temperature 1, top_p 1, no top_k, `--num_samples` per problem, `--max_new_tokens`), the
same thread count. "plain loop" = for each problem one `model.generate(prompt, num_return_sequences=n)`;
"generate.py" = `generate.generate_rows` (chunks of 256 problems, left-padded, KV-cached, written to JSONL).
Generated tokens are counted from the outputs (EOS included when a sample stopped). The two alternate
`--rounds` times; the fastest of each is reported. Default model: run.sh's seed model (run `bash run.sh`
first), so that samples stop at EOS the way they do in the loop.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import common  # noqa: E402

import models  # noqa: E402
import generate  # noqa: E402


def run_ours(args, out: Path) -> tuple[float, int]:
    settings = generate.Settings(model=args.model, num_samples=args.num_samples, temperature=1.0,
                                 max_new_tokens=args.max_new_tokens, seed=0, engine="transformers", prompt_style="minimal")
    start = time.perf_counter()
    generate.generate_rows(generate.load_problems(args.problems, args.num_problems), str(out), settings)
    seconds = time.perf_counter() - start
    tokenizer = models.load_tokenizer(args.model)
    rows = common.read_jsonl(out, common.SAMPLE_ROW)
    tokens = sum(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) + (r["finish_reason"] == "stop")
                 for r in rows)
    return seconds, tokens


@torch.no_grad()
def run_plain(args) -> tuple[float, int]:
    start = time.perf_counter()
    tokenizer = models.load_tokenizer(args.model)
    model = models.load_model(args.model).eval()
    problems = generate.load_problems(args.problems, args.num_problems)
    torch.manual_seed(0)
    tokens = 0
    for problem in problems:
        enc = tokenizer(common.build_prompt(tokenizer, problem["problem"], "minimal"), return_tensors="pt",
                        add_special_tokens=False)
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=None,
                             max_new_tokens=args.max_new_tokens, num_return_sequences=args.num_samples,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out[:, enc["input_ids"].shape[1]:]  # (n, new)
        for row in new:
            eos = (row == tokenizer.eos_token_id).nonzero()
            tokens += int(eos[0, 0]) + 1 if len(eos) else len(row)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="runs/seed0/M0")
    parser.add_argument("--problems", default="runs/seed0/data/test.jsonl")
    parser.add_argument("--num_problems", type=int, default=128)
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    best = {"generate.py": (float("inf"), 0), "plain loop": (float("inf"), 0)}
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            results = {"generate.py": run_ours(args, Path(tmp) / "samples.jsonl"), "plain loop": run_plain(args)}
        for name, (seconds, tokens) in results.items():
            print(f"round {r} {name}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.0f} tokens/s", flush=True)
            best[name] = min(best[name], (seconds, tokens))
    print(f"\n{args.num_problems} problems x {args.num_samples} samples, up to {args.max_new_tokens} new tokens, "
          f"{args.threads} threads, model {args.model}")
    print("| engine | generated tokens | seconds (fastest) | tokens/s |\n|---|---|---|---|")
    for name, (seconds, tokens) in best.items():
        print(f"| {name} | {tokens} | {seconds:.1f} | {tokens / seconds:.0f} |")
    ours, plain = (best[k][1] / best[k][0] for k in ("generate.py", "plain loop"))
    print(f"generate.py / plain loop tokens/s: {ours / plain:.2f}x")


if __name__ == "__main__":
    main()
