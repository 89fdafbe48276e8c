"""The text layout every stage shares: a completion's steps (split at blank lines) and the prompts (templates,
chat templates, the BOS rule)."""

from __future__ import annotations

import re
import typing

# Steps are separated by a blank line (the format the prompts ask for, the paper's Fig. 1 style): STEP_SEPARATOR is
# how steps are written; step_spans splits on any blank line, whitespace-only lines included.
STEP_SEPARATOR = "\n\n"
_STEP = re.compile(r"\S(?:(?!\n[ \t]*\n).)*", re.S)  # from a non-space character up to a blank line


def step_spans(text: str) -> list[tuple[int, int]]:
    """Character spans (start, end) of the non-empty steps of ``text``, separators and surrounding spaces excluded."""
    return [(m.start(), m.start() + len(m.group().rstrip())) for m in _STEP.finditer(text)]


def step_texts(text: str, spans: list[tuple[int, int]]) -> list[str]:
    """The steps of ``text`` at its step_spans (split once, carried in the rows as step_spans)."""
    return [text[a:b] for a, b in spans]


# The one place where prompts are written. "instruct": in the tokenizer's chat template when it has one, else plain
# text; "minimal": for the tiny model trained from scratch, where every prompt token costs training compute;
# "qwen25-math-cot": the Qwen2.5-Math evaluation harness's prompt (QwenLM/Qwen2.5-Math, evaluation/utils.py), with
# which published MATH-500 numbers are measured. It does not ask for the blank-line-separated steps the labeller
# splits on: generation for training keeps "instruct" or "minimal".
PromptStyle = typing.Literal["instruct", "minimal", "qwen25-math-cot"]  # the keys of PROMPT_TEMPLATES
PROMPT_TEMPLATES = {
    "instruct": ("Solve the following math problem step by step. Separate the steps with a blank line and "
                 "put the final answer in \\boxed{{}}.\n\nProblem: {problem}"),
    "minimal": "Problem: {problem}\nSolution:\n",
    "qwen25-math-cot": "{problem}",
}
# System messages of the styles that have one (not format strings: the braces are literal).
SYSTEM_PROMPTS = {"qwen25-math-cot": "Please reason step by step, and put your final answer within \\boxed{}."}


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
    """``text`` as the user message of the tokenizer's chat template (after ``system`` when given), ready for the
    reply; ``text + plain_suffix`` without a template. The one place prompts go through a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return text + plain_suffix
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """The token ids of every prompt (the policy's on both engines, the judge's, mc rollouts', train.py's): ``text``
    as it is, with BOS in front when the tokenizer's own encoding starts with one (Llama, Mistral, Gemma) and the
    text does not already (a chat template writes it into the text: never doubled)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos] and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]:
        ids = [bos] + ids
    return ids
