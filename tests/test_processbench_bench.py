"""bench/processbench_labellers.py: the GSM8K join that gives ProcessBench rows their gold answers, the F1
helper, the token-counting wrapper around generate.Engine, and a short end-to-end run with the tiny judge."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

import generate

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "processbench_gsm8k.json").exists(), reason="../shared/data is absent")

_spec = importlib.util.spec_from_file_location("processbench_labellers", REPO / "bench" / "processbench_labellers.py")
pb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pb)


@needs_data
def test_gsm8k_join_finds_every_gold_answer():
    bench_rows = json.loads((DATA / "processbench_gsm8k.json").read_text())
    joined = pb.join_gsm8k(bench_rows, DATA)
    assert len(joined) == len(bench_rows) == 400
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", r["gold"]) for r in joined), [r["gold"] for r in joined][:20]
    assert not any("<<" in r["reference"] for r in joined)


@needs_data
def test_gsm8k_join_fails_on_a_problem_without_a_match():
    row = {"id": "gsm8k-x", "problem": "A problem that is not in GSM8K.", "steps": ["1"], "label": -1}
    with pytest.raises(ValueError, match="gsm8k-x"):
        pb.join_gsm8k([row], DATA)


def test_f1_on_a_hand_made_case():
    gold = [-1, -1, -1, 2, 0]
    predicted = [-1, -1, 0, 2, 0]  # rows with an error: 2/2 exact; rows without: 2/3 predicted -1
    s = pb.f1_scores(gold, predicted)
    assert (s["error_hits"], s["error_rows"], s["clean_hits"], s["clean_rows"]) == (2, 2, 2, 3)
    assert s["f1"] == pytest.approx(2 * 1.0 * (2 / 3) / (1.0 + 2 / 3))  # 0.8
    assert pb.f1_scores([-1, 1], [0, 0])["f1"] == 0.0


def test_parse_share_and_predicted_first_error():
    verdicts = [[True, None, False], [None, None], []]
    assert pb.parse_share("judge_step", verdicts) == (2, 5)
    first_error = [[True, False], [None, None], []]  # a reply either parsed (no None) or did not (all None)
    assert pb.parse_share("judge_first_error", first_error) == (1, 2)  # solutions with steps only
    assert pb.parse_share("mc", verdicts) is None
    assert [pb.predicted_first_error(v) for v in ([True, True], [True, None, True], [True, False])] == [-1, 1, 1]


class FakeEngine:
    """A stand-in for generate.Engine that only exists to count: prompt ids = one per character, and
    sample k of a prompt has k + 1 completion ids."""

    tokenizer = None

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling, seed):
        self.calls.append((list(prompts), sampling, seed))
        return [[generate.Sample(f"reply {k} to {p}", "stop", list(range(len(p))), list(range(k + 1)))
                 for k in range(sampling.n)] for p in prompts]


def test_counting_judge_fn_counts_prompt_and_generated_ids():
    fake = FakeEngine()
    counter = pb.CountingEngine(fake)
    judge_fn = counter.judge_fn(max_new_tokens=7, seed=3)
    assert judge_fn(["abc", "de"]) == ["reply 0 to abc", "reply 0 to de"]
    assert judge_fn(["f"]) == ["reply 0 to f"]
    assert fake.calls[0][1:] == (generate.Sampling(1, 0.0, 1.0, 7), 3)  # greedy, one reply
    assert (counter.prompt_tokens, counter.generated_tokens) == (3 + 2 + 1, 3)
    assert counter.example == "reply 0 to abc"


def test_counting_rollout_fn_counts_a_prompt_once_and_every_sample():
    counter = pb.CountingEngine(FakeEngine())
    rollout_fn = counter.rollout_fn(generate.Sampling(3, 1.0, 1.0, 9), seed=0)
    assert rollout_fn(["abcd"]) == [["reply 0 to abcd", "reply 1 to abcd", "reply 2 to abcd"]]
    assert (counter.prompt_tokens, counter.generated_tokens) == (4, 1 + 2 + 3)


@needs_data
def test_tiny_judge_end_to_end(tmp_path):
    """Two rows, the model-free and judge labellers (mc is label.py's, tested in test_labellers.py)."""
    out = tmp_path / "report.md"
    cli = pb.parse_cli(["--rows", "2", "--labellers", "check,judge_step,judge_first_error", "--out", str(out),
                        "--judge_engine", "transformers"])
    pb.run(cli, pb.build_tiny_judge(tmp_path / "judge"))
    text = out.read_text()
    assert "| check | 0.000 (0/1) | 1.000 (1/1) |" in text  # rows 0 and 200: check finds no error in either
    assert re.search(r"\| judge \(`step`\) \|.*\| 0\.000 \(0/\d+\) \| \d+ \(\d+ \+ \d+\) \|", text)
    assert "judge (`first_error`) (first request of the first chunk)" in text
