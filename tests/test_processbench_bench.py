"""bench/processbench_labellers.py: the GSM8K join that gives ProcessBench rows their gold answers, the F1
helper, the token-counting wrapper around engines.Engine, and a short end-to-end run with the tiny judge."""
import json
import re
from pathlib import Path

import pytest

from stepkto import engines, judging, models, prompting, sharding
import label
import processbench_labellers as pb  # bench/ (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "processbench_gsm8k.json").exists(), reason="../shared/data is absent")


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
    # a reply cut off at the token budget is no verdict: it counts as the error, and not as parsed
    assert pb.predicted_first_error([True, judging.CUT_OFF, True]) == 1
    assert pb.parse_share("judge_step", [[True, judging.CUT_OFF]]) == (1, 2)
    assert pb.parse_share("judge_first_error", [[judging.CUT_OFF] * 2, [True, False]]) == (1, 2)


class FakeEngine:
    """A stand-in for engines.Engine that only exists to count: prompt ids = one per character, and
    sample k of a prompt has k + 1 completion ids. Its tokenizer has no chat template: prompts are plain text."""

    tokenizer = models.make_char_tokenizer()

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling, seed):
        self.calls.append((list(prompts), sampling, seed))
        return [[engines.Sample(f"reply {k} to {p}", "stop", list(range(len(p))), list(range(k + 1)))
                 for k in range(sampling.n)] for p in prompts]


def test_counting_engine_under_the_judge_counts_prompt_and_generated_ids():
    """label.judge_labeller through the counting engine: greedy, one reply per step, seed --seed."""
    fake = FakeEngine()
    counter = pb.CountingEngine(fake)
    settings = label.Settings(prm="judge", judge_model="unused", judge_max_new_tokens=7, seed=3)
    rows = [{"problem": "p", "completion": "abc\n\nde"}, {"problem": "q", "completion": "f"}]
    spans = [prompting.step_spans(r["completion"]) for r in rows]
    assert label.judge_labeller(rows, spans, settings, counter) == [[None, None], [None]]  # "reply 0 to ..." parses to none
    assert [call[1:] for call in fake.calls] == [(engines.Sampling(1, 0.0, 1.0, 7), 3)]  # one call, greedy, one reply
    prompt_chars = sum(len(p) for p in fake.calls[0][0])
    assert (counter.prompt_tokens, counter.generated_tokens) == (prompt_chars, 3)
    assert counter.example == "reply 0 to " + fake.calls[0][0][0]


def test_counting_engine_counts_a_prompt_once_and_every_sample():
    counter = pb.CountingEngine(FakeEngine())
    outs = counter.generate(["abcd"], engines.Sampling(3, 1.0, 1.0, 9), seed=0)
    assert [s.text for s in outs[0]] == ["reply 0 to abcd", "reply 1 to abcd", "reply 2 to abcd"]
    assert (counter.prompt_tokens, counter.generated_tokens) == (4, 1 + 2 + 3)


def test_chunk_verdicts_run_label_pys_labellers():
    """check, judge (each protocol) and mc: label.py's labellers, the judge protocol taken from the name."""
    settings = label.Settings(prm="judge", judge_model="unused", mc_rollouts=2, mc_max_new_tokens=5, seed=1)
    chunk = [{"id": "a", "problem": "Compute 3 + 4.", "answer": "7", "prompt": "P:",
              "completion": "3 + 4 = 8\n\nThe answer is \\boxed{8}."}]  # a wrong step, then its value boxed
    assert pb.chunk_verdicts("check", chunk, None, settings) == [[False, True]]
    fake = FakeEngine()
    # the fake echoes the prompt, whose boxes (the step's \\boxed{8}, the examples \\boxed{2} and \\boxed{none})
    # name different first errors: no verdict
    assert pb.chunk_verdicts("judge_first_error", chunk, pb.CountingEngine(fake), settings) == [[None, None]]
    assert "first step that is wrong" in fake.calls[-1][0][0]  # the first_error prompt, one call per solution
    assert pb.chunk_verdicts("mc", chunk, pb.CountingEngine(fake), settings) == [[False, False]]
    assert fake.calls[-1][1:] == (engines.Sampling(2, 1.0, 1.0, 5), sharding.derived_seed(1, ["a"]))


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


@needs_data
def test_tiny_prm_f1_at_every_threshold(tmp_path):
    """The PRM path: one scoring, F1 per threshold from 0.05 to 0.95, and the best one named."""
    out = tmp_path / "report.md"
    cli = pb.parse_cli(["--rows", "4", "--labellers", "reward_model", "--out", str(out)])
    pb.run(cli, "", pb.build_tiny_prm(tmp_path / "prm"))
    text = out.read_text()
    assert "tiny RANDOM Qwen2 PRM" in text and text.count("\n| 0.") == 19 and "| 0.95 |" in text
    best = re.search(r"Best threshold: \*\*(0\.\d\d)\*\* \(F1 (\d\.\d{3})\)", text)
    f1s = [float(line.rsplit("|", 2)[1]) for line in text.splitlines() if line.startswith("| 0.")]
    assert best and float(best.group(2)) == max(f1s)
