"""Standard evaluation settings: the Qwen2.5-Math CoT prompt preset, the unbiased pass@k estimator,
evaluate.py's defaults and its --report_to tracking."""

import itertools
import json
import os
import random
import re
from math import comb
from pathlib import Path

import pytest

from stepkto import arith_task, jsonl, models, prompting
import evaluate

REPO = Path(__file__).resolve().parents[1]
REAL_MODEL = REPO / "models" / "SmolLM2-135M-Instruct"
# the prompt QwenLM/Qwen2.5-Math evaluation/utils.py hard-codes for --prompt_type qwen25-math-cot
QWEN25_MATH_COT = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n"
    "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
)
PROBLEM = "Find $x$ if $\\frac{x}{2} = \\{3\\}$."  # braces of its own: the problem is not a format string


def test_qwen_prompt_without_chat_template_is_the_harness_text():
    tok = models.make_char_tokenizer()
    assert not getattr(tok, "chat_template", None)
    assert prompting.build_prompt(tok, PROBLEM, "qwen25-math-cot") == QWEN25_MATH_COT.format(input=PROBLEM)
    assert prompting.SYSTEM_PROMPTS["qwen25-math-cot"].endswith("within \\boxed{}.")  # a literal \boxed{}


def test_qwen_prompt_uses_a_system_message_in_the_chat_template():
    tok = models.make_char_tokenizer()
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    system = "Please reason step by step, and put your final answer within \\boxed{}."
    assert prompting.build_prompt(tok, PROBLEM, "qwen25-math-cot") == f"<|system|>{system}<|user|>{PROBLEM}<|assistant|>"
    assert prompting.build_prompt(tok, PROBLEM, "instruct").startswith("<|user|>Solve")  # no system message


@pytest.mark.skipif(not REAL_MODEL.exists() and not os.environ.get("STEPKTO_REQUIRE_REAL_MODEL"),
                    reason=f"{REAL_MODEL} is absent: run `bash setup.sh --models`")
def test_qwen_prompt_in_a_real_chatml_template_equals_the_harness_text():
    """SmolLM2's ChatML template, given a system message, yields the harness's text to the character."""
    tok = models.load_tokenizer(str(REAL_MODEL))
    assert tok.chat_template
    assert prompting.build_prompt(tok, PROBLEM, "qwen25-math-cot") == QWEN25_MATH_COT.format(input=PROBLEM)


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of the k-subsets of n samples (the first c correct) that hold a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_the_count_over_all_subsets():
    rng = random.Random(0)
    cases = [(5, 0, 2), (5, 5, 2), (6, 3, 6), (1, 0, 1), (1, 1, 1), (8, 1, 8), (8, 7, 1)]
    for _ in range(40):
        n = rng.randint(1, 10)
        cases.append((n, rng.randint(0, n), rng.randint(1, n)))
    for n, c, k in cases:
        assert evaluate.pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
        assert evaluate.pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    assert evaluate.pass_at_k(1000, 1, 1) == pytest.approx(0.001)  # large n: no overflow


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match=f"n={n}, c={c}, k={k}"):
        evaluate.pass_at_k(n, c, k)


def test_pass_k_values():
    assert evaluate.pass_k_values(1) == [1]
    assert evaluate.pass_k_values(8) == [1, 2, 4, 8]
    assert evaluate.pass_k_values(6) == [1, 2, 4, 6]


def test_sampled_metrics_pass_at_k_beside_mean_pass1():
    """pass@1 by the estimator is mean Pass@1; pass@K is the share of problems with a correct sample.
    No sample has an answer (pred None), so no grading worker starts: Maj@K is 0."""
    outcomes = {"a": [True, False, False, False], "b": [True, True, False, True], "c": [False] * 4}
    rows = [{"problem_id": pid, "answer": "1", "pred": None, "outcome": o, "labels": [True]}
            for pid, outs in outcomes.items() for o in outs]
    m = evaluate.sampled_metrics(rows, 4)
    assert m["pass@1_over_4"] == pytest.approx(m["mean_pass@1_over_4"]) == pytest.approx(4 / 12)
    assert m["pass@2_over_4"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # a: 1 - C(3,2)/C(4,2); b: 3 correct of 4
    assert m["pass@4_over_4"] == pytest.approx(2 / 3) and m["maj@4"] == 0.0
    assert [key for key in m if key.startswith("pass@")] == ["pass@1_over_4", "pass@2_over_4", "pass@4_over_4"]


def test_the_stepwise_error_rate_runs_over_the_judged_correct_solutions():
    """Among correct answers: flawed (a step labelled wrong, even beside a null one), clean (every step right), and
    undetermined (no wrong step, a step without a verdict), which is left out of the rate and its interval."""
    labels = [[True, True], [True, False], [None, False], [True, None], [None], [False], [None]]
    outcomes = [True] * 5 + [False] * 2
    rows = [{"problem_id": f"p{i}", "answer": "1", "pred": None, "outcome": outcome, "labels": steps,
             "prm_failures": steps.count(None), "finish_reason": "stop"}
            for i, (steps, outcome) in enumerate(zip(labels, outcomes))]
    m = evaluate.greedy_metrics(rows)
    assert m["stepwise_error_rate"] == pytest.approx(2 / 3)  # 2 flawed, 1 clean; 2 undetermined left out
    assert m["stepwise_error_rate_ci95"] == evaluate.wilson_interval(2, 3)
    assert (m["n_correct"], m["n_correct_with_wrong_step"], m["n_correct_unjudged"], m["prm_failures"]) == (5, 2, 2, 4)
    assert evaluate.sampled_metrics(rows, 1)["stepwise_error_rate_sampled"] == pytest.approx(2 / 3)
    undetermined = [dict(row, labels=[None], prm_failures=1) for row in rows]
    assert evaluate.greedy_metrics(undetermined)["stepwise_error_rate"] is None


def test_evaluate_defaults_to_the_harness_budget():
    assert evaluate.Args(model="m", benchmark="b", output_dir="o").max_new_tokens == 2048


@pytest.mark.parametrize("settings, message", [
    ({"report_to": "mlflow"}, "none | tensorboard | wandb"),
    ({"prompt_style": "qwen"}, "instruct | minimal | qwen25-math-cot"),
    ({"step": 2}, "--step does nothing unless --report_to is not none"),
    ({"step": -1, "report_to": "tensorboard"}, "--step must be >= 0"),
])
def test_evaluate_refuses_bad_settings_before_any_work(tmp_path, settings, message):
    args = evaluate.Args(model="no-such-model", benchmark="no-such-file.jsonl", output_dir=str(tmp_path / "eval"),
                         **settings)
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate.main(args)
    assert not (tmp_path / "eval").exists()


def test_evaluate_logs_result_to_tensorboard(tiny_model, tmp_path):
    """In process on the untrained tiny model (3 problems, 6 new tokens), with the Qwen preset: result.json's
    numbers land in OUTPUT_DIR/tracking as eval/<metric> at step --step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bench = tmp_path / "test.jsonl"
    jsonl.write_jsonl_atomic(bench, arith_task.make_split("test", 3, seed=0))
    out = tmp_path / "eval"
    evaluate.main(evaluate.Args(model=tiny_model, benchmark=str(bench), output_dir=str(out), step=2,
                                max_new_tokens=6, prompt_style="qwen25-math-cot", sample_k=2, report_to="tensorboard"))
    result = json.loads((out / "result.json").read_text())
    prompt = jsonl.read_jsonl(out / "greedy_samples.jsonl")[0]["prompt"]
    assert prompt.startswith("<|im_start|>system\nPlease reason step by step") and prompt.endswith("<|im_start|>assistant\n")
    acc = EventAccumulator(str(out / "tracking"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/pass@1", "eval/n_problems", "eval/maj@2", "eval/pass@1_over_2", "eval/pass@2_over_2"} <= tags
    assert not tags & {"eval/model", "eval/pass@1_ci95"}  # strings and intervals are not scalars
    (event,) = acc.Scalars("eval/pass@1")
    assert event.step == 2 and event.value == pytest.approx(result["pass@1"])
    (event,) = acc.Scalars("eval/n_problems")
    assert event.value == 3
