"""Padding waste of train.py's batches: the share of computed token positions that are real tokens, over
every forward of a run (training batches, and for kto/step-kto the KL-pair batches; the reference pass
uses the same batches), with random batches ("before") and with train.py's length grouping ("after").

    .venv/bin/python bench/bench_padding.py [--labels runs/seed0/step-kto/iter1/labels.jsonl]

"before" = train.build_plan with mega_batches=1 (each batch a random draw; rows padded to the longest);
"after"  = train.build_plan as train.py calls it (random mega-batches of 50 batches, sorted by length
inside, then the batch order shuffled). Counting only, no model: seconds on a CPU.
"""

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import arith_task  # noqa: E402
import policy  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402


def fractions(objective: str, data: Path, batch: int) -> tuple[float, float, int]:
    args = train.Args(objective=objective, model="scratch", data=str(data), output_dir="-", prompt_style="minimal",
                      per_device_batch_size=batch)
    examples = train.load_examples(args, models.make_char_tokenizer())
    lengths = [policy.pair_length(e.pair) for e in examples]
    kto = objective != "sft"
    out = []
    for mega_batches in (1, 50):
        plan = train.build_plan(lengths, batch, 1, 1, 0, 2 if kto else 1, mega_batches=mega_batches)
        out.append(train.plan_token_fraction(plan, examples, 1, with_kl=kto))
    return out[0], out[1], len(examples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--labels", default="", help="a label.py output of the embedded default (run.sh's iter1)")
    parser.add_argument("--batch", type=int, default=32)
    opts = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    arith_task.main(["--output_dir", str(tmp / "task"), "--num_train", "10", "--num_test", "10", "--num_sft", "5000"])
    import bench_train_efficiency  # long solutions of 24-40 steps, as the GPU bench uses

    bench_train_efficiency.write_data(tmp / "long.jsonl", 800, 24, 40)
    cases = [("sft", tmp / "task" / "sft.jsonl", "embedded default SFT data (5000 rows)"),
             ("step-kto", tmp / "long.jsonl", "long solutions, 24-40 steps (GPU bench data)")]
    if opts.labels:
        cases.insert(1, ("step-kto", Path(opts.labels), f"{opts.labels}"))
    print("\n| data | objective | rows | real tokens, random batches | real tokens, length-grouped |")
    print("|---|---|---|---|---|")
    for objective, path, name in cases:
        before, after, rows = fractions(objective, path, opts.batch)
        print(f"| {name} | {objective} | {rows} | {before:.1%} | {after:.1%} |")


if __name__ == "__main__":
    main()
