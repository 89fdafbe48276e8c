"""What a provenance record costs (stepkto/provenance.py): hashing a large samples file, against reading its rows.

    .venv/bin/python bench/bench_provenance.py --rows 100000 --repeats 3

Writes a samples file of --rows rows shaped as generate.py's (a 600-character completion, its token ids and
offsets), then times, each --repeats times and best-of: provenance.file_sha256 (the stage's record, streamed),
jsonl.read_jsonl (what label.py does with the file anyway), and a repeated file_sha256 of a file large enough to be
remembered in the digest cache (a model's weights). Prints one JSON line.
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepkto import jsonl, provenance


def sample_row(i: int, rng: random.Random) -> dict:
    completion = "".join(rng.choice("0123456789 +-*=\n") for _ in range(600))
    ids = [rng.randrange(50000) for _ in range(200)]
    return {"id": f"p{i}#0", "problem_id": f"p{i}", "problem": "Compute 3 + 4 * 5.", "answer": "23",
            "prompt": "Problem: Compute 3 + 4 * 5.\nSolution:\n", "completion": completion, "finish_reason": "stop",
            "sample_index": 0, "gen": {"model": "M0", "temperature": 1.0}, "prompt_ids": ids[:20],
            "completion_ids": ids, "completion_offsets": list(range(0, 600, 3))}


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = tmp  # a cache of its own: the repeated hash below starts uncached
        path, rng = Path(tmp) / "samples.jsonl", random.Random(0)
        with open(path, "w", encoding="utf-8") as f:
            for i in range(args.rows):
                f.write(json.dumps(sample_row(i, rng)) + "\n")
        size = path.stat().st_size
        hashed = best_of(lambda: provenance.sha256_of(path), args.repeats)
        read = best_of(lambda: jsonl.read_jsonl(path, jsonl.SAMPLE_ROW), args.repeats)
        first = time.perf_counter()
        provenance.file_sha256(path)  # remembered: the file is over the cache threshold
        first = time.perf_counter() - first
        again = best_of(lambda: provenance.file_sha256(path), args.repeats)
    print(json.dumps({"rows": args.rows, "mib": round(size / 2**20, 1), "sha256_s": round(hashed, 3),
                      "sha256_mib_per_s": round(size / 2**20 / hashed), "read_jsonl_s": round(read, 3),
                      "sha256_share_of_read": round(hashed / read, 3), "cached_first_s": round(first, 3),
                      "cached_again_s": round(again, 4)}))


if __name__ == "__main__":
    main()
