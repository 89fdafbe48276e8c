"""The text layout every stage shares: a completion's steps (split at blank lines) and the prompts (templates,
chat templates, the BOS rule)."""

from __future__ import annotations

import re
import typing

# Steps are separated by a blank line (the format the prompts ask for, and the paper's Fig. 1 style).
# STEP_SEPARATOR is how steps are written (stepkto/arith_task.py's solutions, GSM8K references, the prefix an mc
# rollout continues); step_spans splits on any blank line, whitespace-only lines included.
STEP_SEPARATOR = "\n\n"


_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def step_spans(text: str) -> list[tuple[int, int]]:
    """Character spans (start, end) of the non-empty steps of ``text``, separators excluded."""
    spans, start = [], 0
    for m in list(_BLANK_LINE.finditer(text)) + [None]:
        end = m.start() if m else len(text)
        chunk = text[start:end]
        if chunk.strip():
            lead = len(chunk) - len(chunk.lstrip())
            spans.append((start + lead, start + len(chunk.rstrip())))
        start = m.end() if m else len(text)
    return spans


def step_texts(text: str, spans: list[tuple[int, int]]) -> list[str]:
    """The steps of ``text`` at its step_spans (split once, carried in the rows as step_spans)."""
    return [text[a:b] for a, b in spans]


# The one place where prompts are written. "instruct" is used inside the tokenizer's chat template
# when it has one (instruct models) and as plain text otherwise; "minimal" is for the embedded
# default's tiny model trained from scratch, where every prompt token costs training compute;
# "qwen25-math-cot" is the prompt of the Qwen2.5-Math evaluation harness (QwenLM/Qwen2.5-Math,
# evaluation/utils.py), with which published MATH-500 numbers are measured: the instruction is a system
# message, the user message is the problem alone. It does not ask for blank-line-separated steps, which
# the step labeller splits on: generation for training keeps "instruct" (or "minimal", whose tiny model
# was trained on that format).
PromptStyle = typing.Literal["instruct", "minimal", "qwen25-math-cot"]  # the keys of PROMPT_TEMPLATES


PROMPT_TEMPLATES = {
    "instruct": (
        "Solve the following math problem step by step. Separate the steps with a blank line and "
        "put the final answer in \\boxed{{}}.\n\nProblem: {problem}"
    ),
    "minimal": "Problem: {problem}\nSolution:\n",
    "qwen25-math-cot": "{problem}",
}


# System messages of the styles that have one (not format strings: the braces are literal).
SYSTEM_PROMPTS = {
    "qwen25-math-cot": "Please reason step by step, and put your final answer within \\boxed{}.",
}


def build_prompt(tokenizer, problem: str, style: str = "instruct") -> str:
    """The text the model continues. Chat template when the tokenizer has one, else plain text. ``style`` is a
    PromptStyle: every stage refuses another one on its command line (cli.check_choices)."""
    text = PROMPT_TEMPLATES[style].format(problem=problem)
    if style == "minimal":
        return text
    system = SYSTEM_PROMPTS.get(style)
    if system and not getattr(tokenizer, "chat_template", None):
        # the ChatML text the Qwen2.5-Math harness hard-codes, whatever the model's own format
        return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return chat_prompt(tokenizer, text, "\n\nSolution:\n", system)


def chat_prompt(tokenizer, text: str, plain_suffix: str, system: str | None = None) -> str:
    """``text`` as the user message of the tokenizer's chat template (after ``system`` when given), ready for
    the reply; ``text + plain_suffix`` for a tokenizer without a template. The one place prompts (the
    policy's here, the judge's in label.py) go through a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return text + plain_suffix
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """The token ids a model is prompted with: ``text`` encoded as it is, with BOS in front when the tokenizer's
    own encoding starts with one (Llama, Mistral, Gemma base models were trained so) and the text does not
    already begin with it. A chat template writes BOS into the text itself, so it is never doubled; a base model
    prompted with plain text gets it; a tokenizer that adds none (Qwen, SmolLM2, the scratch model's) is left as
    it is. The one rule for every prompt: the policy's (both engines), the judge's, mc rollouts', train.py's."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos) and adds_bos(tokenizer):
        ids = [bos] + ids
    return ids


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encoding (add_special_tokens=True) puts BOS first."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id
