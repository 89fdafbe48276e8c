"""Trained process reward models as step scorers, in-process and served (docs/guide.md, label.py --prm reward_model).
A PRM scores every step in one forward pass, read at the marker token written after each step:

* ``qwen_prm``: Qwen2.5-Math-PRM-7B / 72B (arXiv 2501.07301): the model card's chat input with ``<extra_0>`` after
  each step, a step's score softmax(head logits)[1] there. ``qwen2_prm_class`` is that head on transformers'
  ``Qwen2Model``: the hub's remote code (unreviewed, and unreachable offline) is never run.
* ``step_tag``: Math-Shepherd's PRM (arXiv 2312.08935), a causal LM: ``problem + " " + "\\n".join(step + " ки")``,
  the score P(+) / (P(+) + P(-)) of the next token at each tag.

Served: vLLM's pooling runner returns the scores at the markers from ``POST /pooling`` (``vllm_server_args``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from stepkto import cli, jsonl, models, prompting, sharding

PRMFormat = Literal["qwen_prm", "step_tag"]
# The Qwen2.5-Math-PRM model card's separator and system prompt (the same text as the qwen25-math-cot prompt style)
QWEN_PRM_SEPARATOR = "<extra_0>"
QWEN_PRM_SYSTEM = prompting.SYSTEM_PROMPTS["qwen25-math-cot"]
# Math-Shepherd's step tag and its two answer tokens (label.py's --prm_step_tag, --prm_good_token, --prm_bad_token)
STEP_TAG = " ки"
GOOD_TOKEN = "+"
BAD_TOKEN = "-"
# Values per marker in vLLM's /pooling response: qwen_prm's (wrong, right); step_tag's sigmoid(logit_good - logit_bad)
SERVED_WIDTH = {"qwen_prm": 2, "step_tag": 1}


@dataclass(frozen=True)
class PRMSpec:
    """What a format needs of its model, resolved once from the tokenizer and config (load_spec)."""
    format: str  # qwen_prm | step_tag
    marker: str  # the text written after every step: QWEN_PRM_SEPARATOR, or the step tag
    marker_id: int  # its token: a step's score is read at its position
    max_len: int  # the model's context (max_position_embeddings): no input may be longer
    good_id: int | None = None  # step_tag: the tokens whose probabilities at the tag make the score
    bad_id: int | None = None


class Encoded(NamedTuple):
    """One solution as the PRM reads it."""
    ids: list[int]  # the input's token ids
    positions: list[int]  # the marker's positions in ids, one per step, in step order


def load_spec(path: str, fmt: PRMFormat, step_tag: str = STEP_TAG, good_token: str = GOOD_TOKEN,
              bad_token: str = BAD_TOKEN) -> tuple[object, PRMSpec]:
    """(tokenizer, PRMSpec) of the PRM at ``path`` in format ``fmt``; UsageError when the tokenizer lacks a token
    the format needs or the config has no context length. ``step_tag`` and the good / bad tokens are step_tag's."""
    from transformers import AutoConfig

    tokenizer = models.load_tokenizer(path, padding_side="right")
    max_len = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    if not isinstance(max_len, int):
        raise cli.UsageError(f"{path}: its config has no max_position_embeddings (the model's context)")
    if fmt == "qwen_prm":
        marker_id = single_token_id(tokenizer, QWEN_PRM_SEPARATOR, f"{path}: the qwen_prm separator")
        return tokenizer, PRMSpec(fmt, QWEN_PRM_SEPARATOR, marker_id, max_len)
    marker_id = single_token_id(tokenizer, step_tag, f"{path}: the step tag (--prm_step_tag)")
    good_id = single_token_id(tokenizer, good_token, f"{path}: the good token (--prm_good_token)")
    bad_id = single_token_id(tokenizer, bad_token, f"{path}: the bad token (--prm_bad_token)")
    if good_id == bad_id:
        raise cli.UsageError(f"{path}: the good and bad tokens {good_token!r} / {bad_token!r} are one token")
    return tokenizer, PRMSpec(fmt, step_tag, marker_id, max_len, good_id, bad_id)


def single_token_id(tokenizer, text: str, what: str) -> int:
    """The one token ``text`` encodes to; a sentencepiece dummy prefix first (" ки" -> "▁", "▁ки") is skipped, as
    Math-Shepherd's tag reading does. UsageError for any other split or the unknown token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    last = tokenizer.decode(ids[-1:]) if ids else ""
    prefix = tokenizer.decode(ids[:-1])
    unknown = tokenizer.unk_token_id is not None and ids[-1:] == [tokenizer.unk_token_id]
    if not text.strip() or unknown or last.strip() != text.strip() or prefix.strip():
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise cli.UsageError(f"{what} {text!r} is not one token of the tokenizer (it encodes to {pieces})")
    return ids[-1]


def solution_text(tokenizer, spec: PRMSpec, problem: str, steps: list[str]) -> str:
    """The text the PRM reads (the module docstring gives each format's); a qwen_prm tokenizer without a chat
    template gets the ChatML text of Qwen2.5's, the format the Qwen PRMs were trained on."""
    if spec.format == "step_tag":
        return f"{problem} " + "\n".join(step + spec.marker for step in steps)
    reply = spec.marker.join(steps) + spec.marker
    if not getattr(tokenizer, "chat_template", None):
        return prompting.build_prompt(tokenizer, problem, "qwen25-math-cot") + reply + "<|im_end|>\n"
    messages = [{"role": "system", "content": QWEN_PRM_SYSTEM}, {"role": "user", "content": problem},
                {"role": "assistant", "content": reply}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def encode_solution(tokenizer, spec: PRMSpec, problem: str, steps: list[str], row: str) -> Encoded:
    """The token ids of ``solution_text`` and the marker's positions, one per step; DataError naming ``row`` when
    the markers are not one per step or the input is longer than the model's context."""
    if not steps:
        raise jsonl.DataError(f"{row}: a solution without steps has nothing for a PRM to score")
    for where, text in [("the problem", problem)] + [(f"step {k + 1}", step) for k, step in enumerate(steps)]:
        if spec.marker in text:
            raise jsonl.DataError(f"{row}: {where} contains the PRM's step marker {spec.marker!r}")
    ids = prompting.encode_prompt(tokenizer, solution_text(tokenizer, spec, problem, steps))
    positions = [i for i, token in enumerate(ids) if token == spec.marker_id]
    if len(positions) != len(steps):
        raise jsonl.DataError(
            f"{row}: {len(positions)} step markers {spec.marker!r} in the PRM's input for {len(steps)} steps "
            f"(the marker merged with the text beside it, or the text encodes to it)")
    if len(ids) > spec.max_len:
        raise jsonl.DataError(
            f"{row}: the PRM's input is {len(ids)} tokens, longer than the model's context of {spec.max_len}")
    return Encoded(ids, positions)


@functools.cache
def qwen2_prm_class():
    """Qwen2ForProcessRewardModel without remote code, with the checkpoint's parameter names (model.*, score.0.*,
    score.2.*); built on first use, so that importing this module does not import transformers' models."""
    from transformers import Qwen2Model, Qwen2PreTrainedModel

    class Qwen2ProcessRewardModel(Qwen2PreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.model = Qwen2Model(config)
            h = config.hidden_size
            self.score = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 2))
            self.post_init()

        def forward(self, input_ids, attention_mask, keep):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, S, H)
            return self.score(hidden[:, keep])  # (B, K, 2): logits of (wrong, right) at the positions keep

    return Qwen2ProcessRewardModel


def load_model(path: str, spec: PRMSpec, dtype: str = "float32", device: str = "cpu"):
    """The PRM at ``path`` in eval mode: qwen_prm as qwen2_prm_class() (UsageError when the checkpoint is not
    a Qwen2 model or lacks weights of the head or the backbone), step_tag as its causal LM (models.load_model)."""
    if spec.format == "step_tag":
        return models.load_model(path, dtype).to(device).eval()
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type != "qwen2":
        raise cli.UsageError(f"{path}: the qwen_prm format needs a Qwen2 checkpoint, this one is {model_type!r}")
    model, info = qwen2_prm_class().from_pretrained(path, dtype=getattr(torch, dtype), output_loading_info=True)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])[:4]
        raise cli.UsageError(f"{path}: not a Qwen2ForProcessRewardModel checkpoint: no weights for {missing}")
    return model.to(device).eval()


@torch.no_grad()
def marker_scores(model, spec: PRMSpec, input_ids, attention_mask, keep):
    """P(step right) at the positions ``keep`` (1-D) of every row of the batch, in float32."""
    if spec.format == "qwen_prm":
        return model(input_ids, attention_mask, keep).float().softmax(-1)[..., 1]  # (B, K)
    # logits_to_keep: the LM head runs only at the markers, not over the vocabulary at every position
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits  # (B, K, V)
    pair = logits[..., [spec.good_id, spec.bad_id]].float()  # (B, K, 2)
    return pair.softmax(-1)[..., 0]  # (B, K): P(good) / (P(good) + P(bad))


def step_scores(model, spec: PRMSpec, encoded: list[Encoded], batch_size: int = 8) -> list[list[float]]:
    """[[P(step right) per step] per solution], ``batch_size`` solutions of similar length at a time. Right padding:
    real positions never attend to the padding after them, so any pad id does."""
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    scores: list[list[float]] = [[] for _ in encoded]
    for chunk in sharding.chunked(order, batch_size):
        width = max(len(encoded[i].ids) for i in chunk)
        input_ids = torch.tensor([encoded[i].ids + [0] * (width - len(encoded[i].ids)) for i in chunk])  # (B, S)
        attention_mask = (torch.arange(width) < torch.tensor([[len(encoded[i].ids)] for i in chunk])).long()  # (B, S)
        keep = sorted({p for i in chunk for p in encoded[i].positions})
        column = {p: k for k, p in enumerate(keep)}
        probs = marker_scores(model, spec, input_ids.to(device), attention_mask.to(device),
                              torch.tensor(keep, device=device)).cpu()  # (B, K)
        for b, i in enumerate(chunk):
            scores[i] = [probs[b, column[p]].item() for p in encoded[i].positions]
    return scores


def vllm_server_args(tokenizer, spec: PRMSpec) -> list[str]:
    """The options after ``--model PATH`` that make vLLM's server return the scores at the markers from /pooling;
    the marker id is a setting of the server, not of a request."""
    if spec.format == "qwen_prm":
        return ["--runner", "pooling", "--pooler-config", json.dumps({"step_tag_id": spec.marker_id})]
    bad, good = tokenizer.convert_ids_to_tokens([spec.bad_id, spec.good_id])
    overrides = {"method": "from_2_way_softmax", "classifier_from_token": [bad, good]}
    pooler = {"task": "token_classify", "tok_pooling_type": "STEP", "step_tag_id": spec.marker_id}
    return ["--runner", "pooling", "--convert", "classify", "--hf-overrides", json.dumps(overrides),
            "--pooler-config", json.dumps(pooler)]


def pooling_request(model_name: str, encoded: list[Encoded]) -> dict:
    """The body of one POST /pooling for several solutions, as token ids (the server does not tokenize again)."""
    return {"model": model_name, "task": "token_classify", "input": [e.ids for e in encoded]}


def parse_pooling_response(response: dict, spec: PRMSpec, encoded: list[Encoded], rows: list[str]) -> list[list[float]]:
    """[[P(step right) per step] per solution] from a /pooling response; DataError naming the row when the server
    returned another count of scores than of steps (no vllm_server_args --pooler-config) or another width."""
    items = sorted(response["data"], key=lambda item: item["index"])
    if len(items) != len(encoded):
        raise jsonl.StageError(f"/pooling returned {len(items)} results for {len(encoded)} solutions")
    width, scores = SERVED_WIDTH[spec.format], []
    for item, solution, row in zip(items, encoded, rows):
        values = item["data"]  # [[value per label] per marker]
        if len(values) != len(solution.positions):
            raise jsonl.DataError(
                f"{row}: the server returned {len(values)} step scores for {len(solution.positions)} steps: its "
                f"--pooler-config must hold \"step_tag_id\": {spec.marker_id} ({spec.marker!r}; vllm_server_args)")
        if any(len(v) != width for v in values):
            raise jsonl.DataError(f"{row}: the server returned scores of another width than {spec.format}'s {width}")
        scores.append([v[-1] for v in values])  # qwen_prm: P(right) of (wrong, right); step_tag: the one value
    return scores
