"""Label sampled solutions at two levels: the final answer (outcome) and every step (process).

Paper Section 2.1: the outcome label is a rule-based check of the final answer against the gold answer; the
step labels come from a process reward model. Step labellers (``--prm``):

* ``check``: exact, no model. On the built-in arithmetic task (arith_task.py) every step is checked
  against the problem's expression tree (a step is wrong when its equation is false or when it starts
  from a value the previous steps did not produce); on any other text a step is wrong when an
  arithmetic equation it states is false.
* ``judge``: the paper's PRM as we read it (Step-KTO, arXiv 2501.10799, Section 2.1): an LLM (``--judge_model``,
  greedy) sees the problem, the reference solution (the row's ``solution``; the prompt says so when
  there is none) and the student's steps. ``--judge_protocol step`` (default): one call per step, with
  the previous steps and the current one, answered "correct" or "incorrect" (prompt: ``JUDGE_TEMPLATE``,
  parser: ``parse_verdict``: only the judge's own words count, not quoted text or what "the student
  claims"; its explicit verdicts (markers such as "Verdict:" or \\boxed{}, the verdict it opens or
  concludes with) decide and must agree, else its sentences do; a reply that calls the step right and
  something in it wrong, or contradicts itself, gives none; a hedge such as "not entirely correct" is never
  read as right). ``--judge_protocol first_error``: one call per solution naming its first wrong step, as
  ProcessBench asks (``FIRST_ERROR_TEMPLATE``, ``parse_first_error``): the steps before it
  are right, it and the steps after it wrong (train with ``--step_scope first_error`` to score only
  through it). A verdict that cannot be parsed, and a reply cut off at ``--judge_max_new_tokens``
  (finish_reason "length": ``CUT_OFF``, whatever its text says), give no verdict: the step's label is null
  (a step nobody judged is no evidence either way; train.py leaves it out of the step level unless
  ``--unjudged_steps wrong``), counted in the row's ``prm_failures`` (cut-off replies also in ``prm_cutoffs``)
  and in the printed summary. ``--judge_verdict logprobs`` (step protocol) parses nothing: the step's score is
  P(correct) / (P(correct) + P(incorrect)) at the reply's first word (``verdict_score``), written as
  ``step_scores`` and thresholded by ``--judge_threshold``. The judge runs in this process (``--judge_engine
  transformers | vllm``) or on a server (``--judge_engine openai --judge_base_url URL``: served.py; a vLLM or
  SGLang server, or any OpenAI-compatible API), which starts once for a whole run instead of once per stage.
* ``mc``: Monte-Carlo rollouts (Math-Shepherd, arXiv 2312.08935): from the prefix through step k
  (prompt + completion through the end of step k + "\\n\\n") the policy (``--policy_model``, default the
  rows' ``gen.model``) samples ``--mc_rollouts`` continuations; step k is right when at least
  ``--mc_threshold`` of them end in the gold answer (last \\boxed{} of the completion's first k steps
  plus the continuation, graded by grading.grade_answers).

A labeller is ``fn(rows, spans, settings, engine=None) -> [[True | False | None | CUT_OFF per step] per row]``
(None: no verdict; CUT_OFF: none, because the judge's reply was cut off), or, when it scores steps
(``score_threshold``), ``[[P(step right) | None per step] per row]``, where ``spans[i]`` are row i's steps
(common.step_spans, split once in label_rows).
judge and mc generate through generate.py's engines (transformers | vllm), loaded once per process
(``engine`` replaces that engine: the ProcessBench benchmark passes one that counts tokens); all judge
prompts / rollouts of a chunk go through one generation call.

Other stages call ``label_file(samples, output, Settings(...))`` (evaluate.py does) or ``label_rows``,
never ``main``. Input rows must carry common.SAMPLE_ROW; output rows carry common.LABELLED_ROW: the input
rows plus

    {"completions": [step, ...], "step_spans": [[start, end] per step: characters of "completion"],
     "labels": [bool | None per step: None (null) for a step without a verdict], "outcome": bool,
     "pred": str | None, "prm": str, "prm_failures": int (steps without a verdict),
     "prm_cutoffs": int (those of them whose judge reply was cut off at --judge_max_new_tokens),
     "step_scores": [float | None per step], "step_scorer": {...} (a scoring labeller's only: P(step right)
     per step, and the settings that decide them; labelled again with another threshold, the scores are kept)}

where ``prompt`` / ``completions`` / ``labels`` are TRL's stepwise-supervision fields, so a file without null
labels feeds TRL's PRMTrainer as it is.

Usage:

    python label.py --input runs/stepkto/iter1/samples.jsonl --output runs/stepkto/iter1/labels.jsonl --prm check
    python label.py --input samples.jsonl --output labels.jsonl --prm judge \\
        --judge_model Qwen/Qwen2.5-72B-Instruct --judge_engine vllm --judge_tensor_parallel_size 8
    python label.py --input samples.jsonl --output labels.jsonl --prm judge --judge_model Qwen/Qwen2.5-72B-Instruct \
        --judge_engine openai --judge_base_url http://127.0.0.1:8000/v1 --judge_verdict logprobs
    python label.py --input samples.jsonl --output labels.jsonl --prm mc --mc_rollouts 8 --engine vllm

Crash safety and shards (--num_shards, --shard_index) as in generate.py: OUTPUT.partial grows a chunk at a time; a
rerun resumes. mc seeds each chunk from (--seed, the chunk's row ids), so a resumed or sharded run writes what an
uninterrupted one would have.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

import torch

import arith_task
import common
import equations
import generate
import grading
import options
import prm_models
import provenance
import served
from common import option

JudgeEngine = Literal["auto", "transformers", "vllm", "openai"]
# The top log-probs asked for at every token of a judge reply (--judge_verdict logprobs): the most OpenAI's API
# and a vLLM server (its default --max-logprobs) return.
JUDGE_TOP_LOGPROBS = 20


class CutOff:
    """The type of CUT_OFF."""

    def __repr__(self) -> str:
        return "label.CUT_OFF"


# What the judge labeller gives a step whose reply stopped at --judge_max_new_tokens: no verdict, whatever the text
# so far says ("The sum is correct. Next, the student multiplies and gets" is no verdict on the step). label_rows
# writes it as a null label and counts it in prm_failures and prm_cutoffs.
CUT_OFF = CutOff()


@dataclass(frozen=True, kw_only=True)
class Settings(generate.EngineSettings):
    """How to label: every option of label.py but its files; evaluate.py takes them as it takes generate.py's.
    The engine settings (engine, dtype, ...) are those of the mc rollouts' policy; the judge has its own."""

    prm: Literal["check", "judge", "mc", "reward_model"] = option("check", help=(
        "Step labeller: check | judge | mc | reward_model (a trained PRM: --prm_model, --prm_format)."))
    grade_timeout_s: float = option(5.0, help="Hard per-answer timeout of the grader (outcome labels and mc rollouts).")
    judge_model: str = option("", help="--prm judge: the judge LLM (folder or hub id).")
    judge_protocol: Literal["step", "first_error"] = option("step", help=(
        "--prm judge: step (one call per step: is this step correct?) | first_error (one call per solution "
        "naming its first wrong step, as ProcessBench asks; the steps after it are labelled wrong: train with "
        "--step_scope first_error to score only through it)."))
    judge_max_new_tokens: int = option(512, help=(
        "--prm judge: tokens per reply (greedy). A judge that reasons before its verdict needs room: a reply cut "
        "off at this budget gives no verdict, whatever its text says (counted in prm_cutoffs)."))
    judge_engine: JudgeEngine = option("auto", help=(
        "--prm judge: the judge's engine: transformers | vllm | auto (in this process) | openai (a served judge "
        "at --judge_base_url: a vLLM or SGLang server, or any OpenAI-compatible API)."))
    judge_base_url: str = option("", help="--judge_engine openai: the server's API root, e.g. http://127.0.0.1:8000/v1.")
    judge_api: served.Api = option("completions", help=(
        "--judge_engine openai: completions (a self-hosted vLLM / SGLang server: the in-process engines' exact "
        "prompt token ids) | chat (an API with only /v1/chat/completions: the same user message, its template)."))
    judge_tokenizer: str = option("", help=(
        "--judge_api completions: folder or hub id of the judge's tokenizer, which encodes the prompts (default: "
        "--judge_model; set it when the server knows the model by another name)."))
    judge_api_key_env: str = option("OPENAI_API_KEY", help=(
        "--judge_engine openai: the environment variable that holds the API key (read there, written nowhere)."))
    judge_max_concurrency: int = option(8, help="--judge_engine openai: requests in flight at once.")
    judge_timeout_s: float = option(600.0, help="--judge_engine openai: seconds a request may take before it is retried.")
    judge_retries: int = option(5, help=(
        "--judge_engine openai: retries of a transient fault (timeout, refused or reset connection, 408, 409, 429, "
        "5xx), with exponential backoff; then the stage stops, keeping every chunk written."))
    judge_verdict: Literal["text", "logprobs"] = option("text", help=(
        "--prm judge: text (parse_verdict reads the reply) | logprobs (--judge_protocol step: the step's score is "
        "P(correct) / (P(correct) + P(incorrect)) at the reply's first word, from the top log-probs; written as "
        "step_scores and thresholded by --judge_threshold)."))
    judge_threshold: float = option(0.5, help="--judge_verdict logprobs: a step is right when its score is >= this.")
    judge_dtype: generate.Dtype = option("auto", help="--prm judge: the judge's dtype (as --dtype).")
    judge_tensor_parallel_size: int = option(1, help="--prm judge: vLLM tensor parallel size of the judge.")
    judge_gpu_memory_utilization: float = option(0.9, help="--prm judge: vLLM's share of GPU memory for the judge.")
    judge_max_model_len: int = option(0, help="--prm judge: vLLM context length of the judge (0: the model's own).")
    allow_missing_reference: bool = option(False, help=(
        "--prm judge: label even when no row has a reference solution (field 'solution'), which the paper's judge "
        "compares each step with (Section 2.1). Rows without one are always counted and reported."))
    prm_model: str = option("", help=(
        "--prm reward_model: the trained PRM, a folder or hub id (its tokenizer and config are read here; with "
        "--prm_base_url the server must serve it under this name)."))
    prm_format: prm_models.PRMFormat = option("qwen_prm", help=(
        "--prm reward_model: qwen_prm (Qwen2.5-Math-PRM: <extra_0> after each step, a 2-way head) | step_tag "
        "(Math-Shepherd: a causal LM, a tag after each step, P(good) / (P(good) + P(bad)) at it)."))
    prm_threshold: float = option(0.5, help="--prm reward_model: a step is right when its score, P(step right), is >= this.")
    prm_step_tag: str = option(prm_models.STEP_TAG, help="--prm_format step_tag: the tag written after each step.")
    prm_good_token: str = option(prm_models.GOOD_TOKEN, help="--prm_format step_tag: the token that says a step is right.")
    prm_bad_token: str = option(prm_models.BAD_TOKEN, help="--prm_format step_tag: the token that says a step is wrong.")
    prm_base_url: str = option("", help=(
        "--prm reward_model: a vLLM server of the PRM (started with prm_models.vllm_server_args' options), e.g. "
        "http://127.0.0.1:8001/v1; scores come from its /pooling API, with the --judge_* transport settings."))
    prm_dtype: generate.Dtype = option("auto", help="--prm reward_model in this process: the PRM's dtype (as --dtype).")
    prm_batch_size: int = option(8, help="--prm reward_model in this process: solutions per forward pass.")
    policy_model: str = option("", help=(
        "--prm mc: the policy that rolls out (default: the rows' gen.model, the model that sampled them); its engine "
        "runs with --engine, --dtype, --tensor_parallel_size, ..."))
    mc_rollouts: int = option(4, help="--prm mc: continuations sampled per step (K).")
    mc_threshold: int = option(1, help="--prm mc: a step is right when >= this many of K reach the gold answer.")
    mc_temperature: float = option(1.0, help="--prm mc: sampling temperature of the rollouts.")
    mc_max_new_tokens: int = option(1024, help="--prm mc: maximum tokens per rollout.")
    seed: int = option(0, help="--prm mc: seed; each chunk is seeded from (seed, its row ids).")


@dataclass(frozen=True, kw_only=True)
class Args(common.ShardArgs, Settings):
    """label.py's command line: Settings, plus the files and their chunking."""

    input: str = option(help="Samples JSONL written by generate.py.")
    output: str = option(help="Labelled JSONL (written as OUTPUT.partial until complete).")
    chunk_size: int = option(1024, help=(
        "Rows per chunk: the unit of resuming and sharding, and of batching for judge and mc (one generation call "
        "per chunk; with the transformers engine that is one padded batch, so keep it small there)."))
    on_change: provenance.OnChange = option("stop", help=provenance.ON_CHANGE_HELP)


def check_args(settings: Settings) -> None:
    """Fail before any work on an option combination that cannot run (main refuses those that would do nothing)."""
    common.check_choices(settings)
    if settings.prm == "judge" and not settings.judge_model:
        raise ValueError("--prm judge needs --judge_model (a folder or hub id; a served judge's name on its server)")
    if settings.prm == "reward_model" and not settings.prm_model:
        raise ValueError("--prm reward_model needs --prm_model (a folder or hub id of the PRM)")
    check_judge_args(settings)
    if settings.prm == "mc" and not 1 <= settings.mc_threshold <= settings.mc_rollouts:
        raise ValueError(f"--mc_threshold must be in 1..--mc_rollouts ({settings.mc_rollouts}), got {settings.mc_threshold}")


def check_judge_args(settings: Settings) -> None:
    """The judge's option combinations that cannot run (which options a served or in-process judge uses: options.py)."""
    is_served = settings.judge_engine == "openai"
    if is_served and not settings.judge_base_url:
        raise common.UsageError("--judge_engine openai needs --judge_base_url (e.g. http://127.0.0.1:8000/v1)")
    if settings.judge_verdict == "logprobs" and settings.judge_protocol != "step":
        raise common.UsageError("--judge_verdict logprobs reads a one-word verdict: it needs --judge_protocol step")
    if is_served and (settings.judge_max_concurrency < 1 or settings.judge_retries < 0 or settings.judge_timeout_s <= 0):
        raise common.UsageError("need --judge_max_concurrency >= 1, --judge_retries >= 0 and --judge_timeout_s > 0")


def judge_endpoint(settings: Settings) -> served.Endpoint:
    """The served judge (--judge_engine openai)."""
    return served.Endpoint(settings.judge_base_url, settings.judge_model, settings.judge_api, settings.judge_tokenizer,
                           settings.judge_api_key_env, settings.judge_max_concurrency, settings.judge_timeout_s,
                           settings.judge_retries)


def get_judge(settings: Settings) -> generate.Engine:
    """The judge's engine: the served one, or one loaded in this process (generate.get_engine: one at a time)."""
    if settings.judge_engine == "openai":
        return served.get_engine(judge_endpoint(settings))
    return generate.get_engine(settings.judge_model, judge_engine_settings(settings))


def judge_engine_settings(settings: Settings) -> generate.EngineSettings:
    """The judge's engine: its own engine, dtype, TP size, memory share and context; prefix caching as the process's."""
    return generate.EngineSettings(
        engine=settings.judge_engine, dtype=settings.judge_dtype, tensor_parallel_size=settings.judge_tensor_parallel_size,
        gpu_memory_utilization=settings.judge_gpu_memory_utilization, max_model_len=settings.judge_max_model_len,
        enable_prefix_caching=settings.enable_prefix_caching,
    )


# ----------------------------------------------------------------------------- check


def check_labeller(rows: list[dict], spans: list, settings: Settings, engine=None) -> list[list[bool]]:
    """Exact step labels: the expression-tree checker on built-in problems, equations elsewhere (no model). A step
    too large to verify is wrong; a built-in problem too large to check is refused (DataError naming the row)."""
    labels = []
    for row, row_spans in zip(rows, spans):
        steps = common.step_texts(row["completion"], row_spans)
        if arith_task.is_arith_problem(row["problem"]):
            try:
                labels.append(arith_task.check_steps(row["problem"], steps))
            except arith_task.TooLarge as error:
                raise common.DataError(f"row {row['id']!r}: field 'problem': {error}: it cannot be checked") from None
        else:
            labels.append(equations.label_steps_by_equations(steps))
    return labels


# ----------------------------------------------------------------------------- models


# ----------------------------------------------------------------------------- judge

# The one place where the judge prompt is written. Inside the judge tokenizer's chat template when it
# has one; as plain text followed by "Verdict:" otherwise. A judge may reason before its verdict or
# explain after it; parse_verdict reads which words decide.
JUDGE_TEMPLATE = (
    "You are checking one step of a student's solution to a math problem.\n\n"
    "Problem:\n{problem}\n\n"
    "Reference solution:\n{reference}\n\n"
    "Previous steps of the student's solution:\n{previous}\n\n"
    "Step to check:\n{step}\n\n"
    "Is the step to check correct, that is, mathematically right and a valid continuation of the "
    "previous steps? Answer with one word: correct or incorrect."
)
NO_REFERENCE = "(none available: judge the step on its own)"
NO_PREVIOUS_STEPS = "(none: this is the first step)"


def numbered_steps(steps: list[str]) -> str:
    return common.STEP_SEPARATOR.join(f"Step {i + 1}: {s}" for i, s in enumerate(steps))


def judge_step_question(problem: str, reference: str | None, previous: list[str], step: str) -> str:
    """The judge's user message about one step (JUDGE_TEMPLATE)."""
    return JUDGE_TEMPLATE.format(
        problem=problem, reference=reference or NO_REFERENCE, previous=numbered_steps(previous) or NO_PREVIOUS_STEPS,
        step=step,
    )


def judge_prompt(tokenizer, text: str, plain_suffix: str):
    """A judge prompt as its engine takes it: ``text`` as the user message of the judge tokenizer's chat template
    (``text + plain_suffix`` without one); the message itself for a chat API, which has no tokenizer here."""
    if tokenizer is None:
        return [{"role": "user", "content": text}]
    return common.chat_prompt(tokenizer, text, plain_suffix)


# A verdict's contrast and condition words. A positive verdict followed by one is qualified (a hedge):
# "correct, but the sign is off", "correct except for the sign", "correct if x > 0". Verdicts after one
# are a concession or a part of the qualification, and only their negatives count ("incorrect, but the
# final answer is correct" is a negative).
_CONTRAST = re.compile(
    r"\b(?:but|however|though|although|except|yet|whereas|while|wait|if|unless|assuming|provided"
    r"|apart\s+from|aside\s+from|other\s+than|save\s+for)\b",
    re.IGNORECASE,
)
# Sentence breaks: after . ! ? or at a line break; not before a contrast word, so that "Correct. However,
# the sign is off." stays one phrase and is read as the hedge it is.
_SENTENCE_BREAK = re.compile(
    r"(?:(?<=[.!?])[ \t]+|[ \t]*\n\s*)(?=\S)(?!(?:but|however|though|although|except|yet|wait)\b)",
    re.IGNORECASE,
)
# What stands for a quotation in the judge's words: right before a verdict word it qualifies it, as scare quotes
# do ("it's 'mostly' correct" is a hedge).
_QUOTE_MARK = "⟨quoted⟩"
# A verb before "right" / "true" / "false": those words are verdicts only in this position ("is right",
# "that's true"), never in "right triangle" or "the right side".
_COPULA = r"(?:\bis|\bwas|\bare|\bbe|\bbeen|'s|\bseems?|\blooks?|\bsounds?|\bappears?)\s+(?:to\s+be\s+)?"
# Adverbs that hedge a positive word into something short of right: "partially correct", "mostly right".
_HEDGE = (r"(?:partially|partly|mostly|almost|largely|somewhat|half|nearly|essentially|basically|mainly"
          r"|roughly|approximately|technically|arguably|probably|possibly|likely|seemingly|apparently"
          r"|hardly|barely|scarcely|kind\s+of|sort\s+of|more\s+or\s+less)")
# The verdict phrases of a reply, tried left to right, each alternative in this order at a position.
# void: words that look like verdicts and are not ("not wrong" is no vouching; "the correct value is 12"
# and "correct answer: 21" name a value; "to correct it" is a verb). neg: negated or hedged positives
# ("not entirely correct", "isn't right", "neither correct nor ...", "partially correct", "correct up
# to a sign", "correct in its setup"), negative words, "is false", "contains an error". pos: correct,
# valid, "is right" / "is true", "no errors", "error-free", "nothing is wrong". \b keeps the "correct"
# in "incorrect", "correctly", "correction", "correctness" from being read.
_TOKEN = re.compile(
    r"(?P<void>(?:\bnot|n't)\s+(?:\w+\s+)?(?:wrong|incorrect|invalid)\b|\bthe\s+correct\s+\w+"
    r"|\bcorrect\s+(?:value|answer|result|product|sum|total|number|expression|equation|formula)s?\b"
    r"|\b(?:to|must|should|can|could|would|please|we|i)\s+correct\b)"
    r"|(?P<neg>(?:\bnot|n't|\bnever|\bneither|\bnor)\s+(?:[\w']+\s+){0,4}?(?:correct|valid)\b"
    r"|(?:\bnot|n't)\s+(?:\w+\s+)?(?:right|true)\b"
    rf"|\b{_HEDGE}(?:\s+\w+)?[\s-]+(?:correct|valid|right|true)\b"
    r"|\b(?:correct|valid)\s+(?:in\b|up\s+to|only|as\s+far\s+as|for\s+the\s+most\s+part|to\s+some\s+extent)"
    rf"|{_QUOTE_MARK}[\s-]*(?:correct|valid|right|true)\b"
    r"|\b(?:incorrect|wrong|invalid|erroneous|flawed|mistaken)\b"
    rf"|{_COPULA}false\b"
    r"|\b(?:contains?|has|had|have|makes?|made|is|was|there's|there\s+(?:is|are|was))\s+(?!no\b|not\b|any\b)"
    r"(?:[\w-]+\s+){0,2}?(?:errors?|mistakes?|flaws?)\b(?!-free))"
    r"|(?P<pos>\bnothing\s+(?:is\s+)?wrong\b|\bno\s+(?:[\w-]+\s+)?(?:errors?|mistakes?)\b"
    r"|\b(?:error|mistake)-free\b"
    rf"|{_COPULA}(?:right|true)\b|\b(?:correct|valid)\b)",
    re.IGNORECASE,
)
# A one-word answer at the start of an opening or marked phrase: alone ("Yes.", "**No**", "True") or
# before a statement about the step ("No, the step is wrong"); not "No error ..." or "Right triangle",
# nor the filler "Right, let me check".
_ANSWER_WORD = re.compile(
    r"(?:(?P<pos>yes|right|true)|(?P<neg>no|false))\b"
    r"(?=[ \t*_}]*(?:[.!:;)\n]|$)|[ \t*_]*,\s*(?:the|this|it|that)\b)",
    re.IGNORECASE,
)
# Explicit answer markers: \boxed{...} (also \boxed{\text{...}}), whose content is the phrase; "Verdict:",
# "Final verdict:", "The verdict is", "Judgement:" / "Judgment:", "Final answer:" and a line's opening
# "Answer:" ("check the answer: 3 + 4 = 7 ..." is reasoning), markdown-bold or not ("**Verdict:**
# Incorrect"), whose phrase is the sentence after them.
_MARKER = re.compile(
    r"\\boxed\s*\{(?P<boxed>(?:[^{}]|\{[^{}]*\})*)\}"
    r"|(?<![a-z])(?:verdict|judge?ment)\b[\s*_:#=-]*(?:is\b)?"
    r"|(?:\bfinal\s+|(?:^|\n)[\s*#_>-]*)answer[\s*_]*:[\s*_]*",
    re.IGNORECASE,
)
# Markdown, punctuation and LaTeX wrappers before a reply's or a phrase's first word.
_LEADING_NOISE = re.compile(r"^(?:\\(?:boxed|text|textbf|mathrm)\b|[\W_])*")
# The subject before an opening verdict: "The step is", "This step is", "It's", "That is", "I think it is".
_SUBJECT = re.compile(
    r"(?:i\s+(?:think|believe)\s+)?"
    r"(?:(?:(?:the|this)(?:\s+[\w'-]+){0,2}?\s+)?step(?:\s+\d+|\s+to\s+check)?\s+(?:is|was)"
    r"|it\s+is|it's|that\s+is|that's|this\s+is)\s+",
    re.IGNORECASE,
)


# Quoted text: "...", “...”, `...` / ``...'', and '...' whose quote marks are not apostrophes (an opening
# one not after a letter, so "isn't" and "the student's" open nothing; a closing one not before a letter, so
# "isn't" inside a quote does not close it). A double quote or “ that never closes quotes the rest.
_QUOTED = re.compile(
    r'"[^"]*(?:"|$)|“[^”]*(?:”|$)|‘[^’]*?’(?!\w)|(`+)[^`]*?\1|``[^`]*?' + "''"
    + r"|(?<![\w'’])'(?=\S)(?:[^'\n]|'(?=\w))*?(?<=\S)'(?!\w)"
)
# Reported speech: what the student (the solution, its author) claims, says, writes or thinks is theirs, not
# the judge's verdict ("The student claims the step is correct. Actually 6 + 1 = 7, not 8."). The clause
# runs to the next comma, semicolon, sentence end or contrast word.
_REPORTED = re.compile(
    r"\b(?:(?:the\s+)?(?:student|solution|solver|author|writer|model|step)s?|he|she|they|it)\s+(?:\w+ly\s+)?"
    r"(?:claim|say|state|write|wrote|written|assert|believe|think|thought|argue|assume|suggest|conclude"
    r"|insist|report|declare|call|consider|mark|label)(?:s|ed|d|ing)?\b[^,;.!?\n]*?"
    r"(?=[,;.!?\n]|\b(?:but|however|though|although|yet|whereas|while|actually)\b|$)"
    r"|\baccording\s+to\s+the\s+(?:student|solution|solver|author)\b[^.!?\n]*",
    re.IGNORECASE,
)
# A verdict on the step as a whole ("the step is correct", "this step was wrong"), wherever it stands in a
# sentence; "step 1 is correct" may be about a previous step and is not one.
_WHOLE_STEP = re.compile(
    r"\b(?:the|this)\s+(?:(?:current|last|given|final|student's)\s+)?step(?:\s+to\s+check)?\s+(?:is|was)\s+",
    re.IGNORECASE,
)
# A sentence that opens with a conclusion word states the judge's verdict as explicitly as a marker does.
_CONCLUSION = re.compile(
    r"^[\s*_#>-]*(?:so|thus|hence|therefore|overall|in\s+conclusion|in\s+summary|in\s+short|to\s+conclude"
    r"|to\s+summari[sz]e|all\s+in\s+all)\b[\s,:]*",
    re.IGNORECASE,
)


def judged_text(text: str) -> str:
    """The reply's own words: quoted text replaced by _QUOTE_MARK, reported speech by "…", typographic
    apostrophes made plain ("isn’t correct")."""
    text = _QUOTED.sub(f" {_QUOTE_MARK} ", text)
    return _REPORTED.sub("…", text.replace("\u2019", "'"))


def _phrase_verdicts(phrase: str, answer_first: bool = False) -> list[bool]:
    """The verdicts of one phrase, in order (rules 4 and 5 of parse_verdict); a one-word answer at its
    start counts when ``answer_first``."""
    phrase = _LEADING_NOISE.sub("", phrase)
    answer = _ANSWER_WORD.match(phrase) if answer_first else None
    head, *qualified = _CONTRAST.split(phrase[answer.end():] if answer else phrase, maxsplit=1)
    values = [answer.group("pos") is not None] if answer else []
    values += [t.group("pos") is not None for t in _TOKEN.finditer(head) if not t.group("void")]
    if qualified:  # a qualified positive is a hedge; after the contrast word only negatives count
        values = [False] * len(values) + [False for t in _TOKEN.finditer(qualified[0]) if t.group("neg")]
    return values


def _decide(values: list[bool]) -> bool | None:
    """True when all verdicts are positive, False when all are negative, None for a contradiction."""
    return values[0] if len(set(values)) == 1 else None


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_BREAK.split(text) if s.strip()]


def _marked_phrases(text: str) -> list[str]:
    """The phrases of the reply's explicit markers, in order: a box's content, a marker's next sentence, a
    sentence that opens with a conclusion word ("So the step is wrong.")."""
    phrases = []
    for marker in _MARKER.finditer(text):
        rest = marker.group("boxed") if marker.group("boxed") is not None else text[marker.end():]
        phrases.append((_sentences(rest) or [""])[0])
    return phrases + [s[c.end():] for s in _sentences(text) if (c := _CONCLUSION.match(s))]


def _opening_phrase(text: str) -> str | None:
    """The reply's first sentence from its verdict on, when it opens with one (after noise and subject);
    a question ("Correct? ...") opens with none."""
    first = (_sentences(_LEADING_NOISE.sub("", text)) or [""])[0]
    if first.rstrip().endswith("?"):
        return None
    subject = _SUBJECT.match(first)
    rest = first[subject.end():] if subject else first
    token = _TOKEN.match(rest)
    return rest if _ANSWER_WORD.match(rest) or (token and not token.group("void")) else None


def parse_verdict(text: str) -> bool | None:
    """The judge's verdict on a step: True (right), False (wrong) or None (no verdict, or a contradiction).

    Rules, in order:

    1. Only the judge's own words count: quoted text ("...", '...', “...”, `...`) and reported speech ("the
       student claims the step is correct") are removed first (``judged_text``).
    2. The explicit verdicts decide: every explicit marker that holds a verdict (\\boxed{...}, also
       \\boxed{\\text{...}}; "Verdict: ...", "Final verdict: ...", "Judgement: ...", "Final answer: ...",
       "Answer: ..." at a line's start, markdown-bold or not; a sentence opening with "So", "Thus",
       "Therefore", "Overall", "In conclusion") and the verdict the reply opens with ("Incorrect. The correct
       value is 12."; after markdown / punctuation noise and a subject such as "The step is"), and every
       verdict on the step as a whole ("..., so the step is correct"). They must all agree:
       "\\boxed{incorrect} ... \\boxed{correct}" is a contradiction, no verdict.
    3. Else every sentence (not a question) that holds a verdict counts: all positive -> True; the last one
       negative -> False (a judge that reasons first ends on its verdict); else no verdict.
    4. A phrase's verdicts. Positive: correct, valid, "is right" / "is true", "no errors", "nothing is
       wrong", and yes / right / true as the first word of an opening or marked phrase. Negative:
       incorrect, wrong, invalid, erroneous, flawed, mistaken, "not / isn't / never ... correct", "not
       right", "is false", "contains an error / a mistake", no / false as that first word, and hedges
       ("not entirely / quite ... correct", "partially / mostly / almost ... correct", "correct up to").
       "right" / "true" / "false" count only after a verb ("is right", not "right triangle"); "the
       correct value", "correctly", "correction", "not wrong" are no verdict.
    5. A positive followed by a qualification (but, however, except, though, if, ...; also in the next
       sentence: "Correct. However, ...") is a hedge, a negative; after the qualification word only
       negatives count ("Incorrect, but the final answer is correct" is negative).
    6. A step is right only when all of it is: a reply that calls a part right and the step wrong is
       negative, and one that calls the step right and anything in it wrong is a contradiction (None). A
       hedge is never True: a step nobody vouched for must not be reinforced.
    """
    text = judged_text(text)
    decisions = [_decide(values) for values in _explicit_verdicts(text)]
    sentences = [_decide(v) for s in _sentences(text) if not s.rstrip().endswith("?") and (v := _phrase_verdicts(s))]
    verdict = _agreed(decisions) if decisions else _concluded(sentences)
    return None if verdict and not all(sentences) else verdict


def _explicit_verdicts(text: str) -> list[list[bool]]:
    """The verdicts of rule 2's phrases that hold one: the markers', the opening one and each sentence about the
    whole step."""
    opening = _opening_phrase(text)
    marked = _marked_phrases(text) + ([opening] if opening is not None else [])
    values = [_phrase_verdicts(p, answer_first=True) for p in marked]
    values += [_phrase_verdicts(s) for s in _sentences(text) if _WHOLE_STEP.search(s)]
    return [v for v in values if v]


def _agreed(decisions: list[bool | None]) -> bool | None:
    return decisions[0] if len(set(decisions)) == 1 else None


def _concluded(sentences: list[bool | None]) -> bool | None:
    """Rule 3: True when every verdict sentence is positive, False when the last is negative, else None."""
    if not sentences:
        return None
    return True if all(sentences) else False if sentences[-1] is False else None


def judge_step_verdicts(solutions: list[tuple[str, str | None, list[str]]], tokenizer, ask, read) -> list[list]:
    """Verdict (or score) of every step; ``solutions`` = (problem, reference solution or None, steps) each.

    ask(prompts) -> [generate.Sample per prompt]: all steps of all solutions go through one call; read(sample) ->
    the step's verdict (text_verdict) or score (verdict_score of its log-probs).
    """
    prompts = [
        [judge_prompt(tokenizer, judge_step_question(problem, reference, steps[:k], steps[k]), "\n\nVerdict:")
         for k in range(len(steps))]
        for problem, reference, steps in solutions
    ]
    flat = [prompt for per_solution in prompts for prompt in per_solution]
    verdicts = iter([read(reply) for reply in ask(flat)] if flat else [])
    return [[next(verdicts) for _ in per_solution] for per_solution in prompts]


def text_verdict(sample: generate.Sample):
    """A reply's verdict on its step: parse_verdict of its text, or CUT_OFF when it stopped at the token budget."""
    return CUT_OFF if sample.finish_reason == "length" else parse_verdict(sample.text)


VERDICTS = ("correct", "incorrect")  # the one-word answers JUDGE_TEMPLATE asks for


def _word(token: str) -> str:
    """A token's text without case, spaces and markup: what decides which verdict it begins."""
    return re.sub(r"^[\W_]+|[\W_]+$", "", token.lower())


def verdict_pieces(tokenizer) -> dict[str, set[str]]:
    """By verdict, the tokens (as _word) that begin it in a reply: with the judge's tokenizer, the first token of
    each way of writing it ("correct", " Correct", "INCORRECT", ...); without one (a chat API), any start of the
    word of 3 letters or more."""
    if tokenizer is None:
        return {v: {v[:k] for k in range(3, len(v) + 1)} for v in VERDICTS}
    pieces = {v: set() for v in VERDICTS}
    for verdict in VERDICTS:
        for form in (verdict, verdict.capitalize(), verdict.upper()):
            for text in (form, " " + form):
                words = [_word(generate.decode_token(tokenizer, i)) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
                pieces[verdict].add(next(w for w in words if w))
    return pieces


def verdict_score(logprobs: list[generate.TokenLogprobs] | None, pieces: dict[str, set[str]]) -> float | None:
    """P(correct) / (P(correct) + P(incorrect)) at the reply's first word (its first token with a letter or digit),
    from the top log-probs there: the probability mass on the tokens that begin each verdict (verdict_pieces).
    None when neither is among them."""
    first = next((entry for entry in logprobs or [] if re.search(r"\w", entry.token)), None)
    if first is None:
        return None
    mass = {verdict: sum(math.exp(logprob) for token, logprob in first.top.items() if _word(token) in words)
            for verdict, words in pieces.items()}
    total = mass["correct"] + mass["incorrect"]
    return mass["correct"] / total if total > 0 else None


def judge_labeller(rows: list[dict], spans: list, settings: Settings, engine=None) -> list[list]:
    """The LLM judge's verdict per step (greedy), by --judge_protocol: one call per step or per solution (CUT_OFF
    where the reply was cut off); with --judge_verdict logprobs a score per step instead (verdict_score: the first
    word decides, so a reply cut off after it still has one)."""
    engine = engine or get_judge(settings)
    logprobs = JUDGE_TOP_LOGPROBS if settings.judge_verdict == "logprobs" else 0
    greedy = generate.Sampling(1, 0.0, 1.0, settings.judge_max_new_tokens, logprobs)
    solutions = [(r["problem"], r.get("solution"), common.step_texts(r["completion"], s)) for r, s in zip(rows, spans)]
    ask = lambda prompts: [o[0] for o in engine.generate(prompts, greedy, settings.seed)]  # noqa: E731
    if settings.judge_protocol == "first_error":
        return judge_first_error_verdicts(solutions, engine.tokenizer, ask)
    if not logprobs:
        return judge_step_verdicts(solutions, engine.tokenizer, ask, text_verdict)
    pieces = verdict_pieces(engine.tokenizer)
    return judge_step_verdicts(solutions, engine.tokenizer, ask, lambda s: verdict_score(s.logprobs, pieces))


# The first-error protocol (ProcessBench, Zheng et al. 2024, arXiv 2412.06559: one reply per solution that
# names the earliest wrong step). Steps are numbered from 1 as in JUDGE_TEMPLATE.
FIRST_ERROR_TEMPLATE = (
    "You are checking a student's step-by-step solution to a math problem.\n\n"
    "Problem:\n{problem}\n\n"
    "Reference solution:\n{reference}\n\n"
    "The student's solution, step by step:\n{steps}\n\n"
    "Find the first step that is wrong, that is, mathematically wrong or not a valid continuation of the "
    "steps before it. Answer with its number in \\boxed{{}}, for example \\boxed{{2}}. If every step is "
    "correct, answer \\boxed{{none}}."
)
_NO_ERROR_WORDS = {"none", "-1", "no error", "all correct", "correct"}


def first_error_question(problem: str, reference: str | None, steps: list[str]) -> str:
    """The judge's user message about a whole solution (FIRST_ERROR_TEMPLATE)."""
    return FIRST_ERROR_TEMPLATE.format(problem=problem, reference=reference or NO_REFERENCE, steps=numbered_steps(steps))


def parse_first_error(text: str, num_steps: int) -> int | None:
    """0-based index of the first wrong step, -1 for "none", None when the reply names no valid step.

    Quoted text is not the judge's answer (``judged_text``). Every \\boxed{} counts when there is one, and
    boxes naming different first errors, or a box never closed (a truncated reply), give no verdict; else the
    reply's first word ("3", "Step 3", "none").
    """
    text = judged_text(text)
    if not grading.has_box(text):
        first = re.sub(r"^step\s+", "", text.strip().lower().strip(".:*` "))
        word = re.match(r"-?\d+|none|no error|all correct", first)
        return _first_error_of(word.group(0) if word else "", num_steps)
    boxes = grading.all_boxed(text)
    answers = {_first_error_of(b.strip().lower().strip(".:*` "), num_steps) if b is not None else None for b in boxes}
    return answers.pop() if len(answers) == 1 else None


def _first_error_of(answer: str, num_steps: int) -> int | None:
    if answer in _NO_ERROR_WORDS:
        return -1
    number = re.fullmatch(r"(?:step\s*)?(\d+)", answer)
    return int(number.group(1)) - 1 if number and 1 <= int(number.group(1)) <= num_steps else None


def verdicts_from_first_error(first_error: int | None, num_steps: int) -> list[bool | None]:
    """Right before the first error, wrong from it on (a step built on a wrong one is not vouched for);
    no verdict at all when the reply could not be parsed."""
    if first_error is None:
        return [None] * num_steps
    if first_error == -1:
        return [True] * num_steps
    return [True] * first_error + [False] * (num_steps - first_error)


def judge_first_error_verdicts(solutions, tokenizer, ask) -> list[list]:
    """One judge call per solution (with steps): it names the first wrong step; see judge_step_verdicts. Every step
    of a solution whose reply was cut off at the token budget is CUT_OFF."""
    with_steps = [i for i, (_, _, steps) in enumerate(solutions) if steps]
    prompts = [judge_prompt(tokenizer, first_error_question(*solutions[i]), "\n\nFirst wrong step:") for i in with_steps]
    replies = dict(zip(with_steps, ask(prompts) if prompts else []))
    return [first_error_verdicts(replies[i], len(steps)) if steps else [] for i, (_, _, steps) in enumerate(solutions)]


def first_error_verdicts(reply: generate.Sample, num_steps: int) -> list:
    """The verdicts of a solution's steps from the judge's first-error reply (CUT_OFF each when it was cut off)."""
    if reply.finish_reason == "length":
        return [CUT_OFF] * num_steps
    return verdicts_from_first_error(parse_first_error(reply.text, num_steps), num_steps)


# ----------------------------------------------------------------------------- Monte-Carlo rollouts


def solution_prefixes(completion: str, spans: list[tuple[int, int]]) -> list[str]:
    """The completion through the end of each step (``spans``), followed by the step separator."""
    return [completion[:end] + common.STEP_SEPARATOR for _, end in spans]


def mc_step_labels(rows: list[dict], spans: list, rollout_fn, threshold: int, timeout_s: float) -> list[list[bool]]:
    """Step k is right when >= ``threshold`` rollouts from the prefix through step k reach the gold answer.

    rollout_fn(prompts) -> [[continuation text] * K per prompt], all prefixes of all rows in one call.
    A rollout's answer is the last \\boxed{} of (solution prefix + continuation): a continuation that
    stops at once after a step holding the final answer keeps that answer.
    """
    prefixes = [solution_prefixes(r["completion"], s) for r, s in zip(rows, spans)]
    flat = [(row, prefix) for row, per_row in zip(rows, prefixes) for prefix in per_row]
    rollouts = rollout_fn([row["prompt"] + prefix for row, prefix in flat]) if flat else []  # (P, K)
    golds = [row["answer"] for (row, _), conts in zip(flat, rollouts) for _ in conts]
    preds = [grading.extract_boxed(prefix + c) for (_, prefix), conts in zip(flat, rollouts) for c in conts]
    reached = iter(grading.grade_answers(golds, preds, timeout_s=timeout_s) if preds else [])
    hits = iter([sum(next(reached) for _ in conts) for conts in rollouts])
    return [[next(hits) >= threshold for _ in per_row] for per_row in prefixes]


def mc_labeller(rows: list[dict], spans: list, settings: Settings, engine=None) -> list[list[bool]]:
    """Math-Shepherd labels from K policy rollouts per step; the chunk is seeded from (seed, its row ids)."""
    if engine is None and not settings.policy_model:
        raise ValueError("--prm mc needs --policy_model (label_file fills it in from the rows' gen.model)")
    engine = engine or generate.get_engine(settings.policy_model, settings)
    sampling = generate.Sampling(settings.mc_rollouts, settings.mc_temperature, 1.0, settings.mc_max_new_tokens)
    seed = common.derived_seed(settings.seed, [r["id"] for r in rows])
    rollout_fn = lambda prompts: [[o.text for o in outs] for outs in engine.generate(prompts, sampling, seed)]  # noqa: E731
    return mc_step_labels(rows, spans, rollout_fn, settings.mc_threshold, settings.grade_timeout_s)


def policy_model_of(rows: list[dict], path: str) -> str:
    """The one model that sampled ``rows`` (their gen.model), for mc rollouts without --policy_model."""
    for index, row in enumerate(rows, start=1):
        gen = row.get("gen")
        if not isinstance(gen, dict) or not isinstance(gen.get("model"), str):
            raise common.DataError(f"{path}: row {index} (id {row['id']!r}): field 'gen.model' missing; pass --policy_model")
    models = sorted({row["gen"]["model"] for row in rows})
    if len(models) > 1:
        raise common.DataError(f"{path}: field 'gen.model': rows were sampled by {len(models)} models {models}; pass --policy_model")
    return models[0]


# ----------------------------------------------------------------------------- trained PRMs


def prm_endpoint(settings: Settings) -> served.Endpoint:
    """The served PRM (--prm_base_url), reached with the judge's transport settings."""
    return served.Endpoint(settings.prm_base_url, settings.prm_model, api_key_env=settings.judge_api_key_env,
                           max_concurrency=settings.judge_max_concurrency, timeout_s=settings.judge_timeout_s,
                           retries=settings.judge_retries)


@functools.cache
def get_prm(settings: Settings) -> tuple:
    """(tokenizer, PRMSpec, score(encoded solutions) -> [[P(step right) per step] per solution]) of the PRM, loaded
    once per process: its model in this process, or its server, checked to serve it."""
    tokenizer, spec = prm_models.load_spec(settings.prm_model, settings.prm_format, settings.prm_step_tag,
                                           settings.prm_good_token, settings.prm_bad_token)
    if settings.prm_base_url:
        endpoint = prm_endpoint(settings)
        served.check_endpoint(endpoint)
        post = lambda path, body: served.post_all(endpoint, path, [body])[0]  # noqa: E731
        return tokenizer, spec, lambda encoded, rows: prm_models.served_step_scores(post, settings.prm_model, spec,
                                                                                    encoded, rows)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = prm_models.load_model(settings.prm_model, spec, generate.resolve_dtype(settings.prm_model,
                                                                                   settings.prm_dtype), device)
    return tokenizer, spec, lambda encoded, rows: prm_models.step_scores(model, spec, encoded, settings.prm_batch_size)


def reward_model_labeller(rows: list[dict], spans: list, settings: Settings, engine=None) -> list[list[float]]:
    """P(step right) of every step from a trained PRM, one forward pass per solution (prm_models); rows without
    steps get none."""
    tokenizer, spec, score = get_prm(settings)
    scored = [i for i, row_spans in enumerate(spans) if row_spans]
    names = [f"row {rows[i]['id']!r}" for i in scored]
    encoded = [prm_models.encode_solution(tokenizer, spec, rows[i]["problem"],
                                          common.step_texts(rows[i]["completion"], spans[i]), name)
               for i, name in zip(scored, names)]
    scores = dict(zip(scored, score(encoded, names) if encoded else []))
    return [scores.get(i, []) for i in range(len(rows))]


# ----------------------------------------------------------------------------- rows

LABELLERS = {"check": check_labeller, "judge": judge_labeller, "mc": mc_labeller, "reward_model": reward_model_labeller}


def labels_from_verdicts(verdicts: list) -> tuple[list[bool | None], int, int]:
    """(step labels: the verdicts, None for a step without one; the steps without a verdict; those of them whose
    reply was cut off, CUT_OFF)."""
    labels = [None if v is CUT_OFF else v for v in verdicts]
    return labels, sum(v is None for v in labels), sum(v is CUT_OFF for v in verdicts)


def score_threshold(settings: Settings) -> float | None:
    """The threshold of a labeller that scores steps (a float per step, P(step right)); None for one that gives
    verdicts."""
    if settings.prm == "judge" and settings.judge_verdict == "logprobs":
        return settings.judge_threshold
    if settings.prm == "reward_model":
        return settings.prm_threshold
    return None


def step_scorer(settings: Settings) -> dict | None:
    """Who scored a row's steps (its ``step_scorer`` field): the settings that decide a scoring labeller's scores,
    not its threshold nor how its server is reached. None for a labeller that gives verdicts."""
    if score_threshold(settings) is None:
        return None
    if settings.prm == "reward_model":
        tag = {"step_tag": settings.prm_step_tag, "good_token": settings.prm_good_token,
               "bad_token": settings.prm_bad_token} if settings.prm_format == "step_tag" else {}
        return {"prm": "reward_model", "model": settings.prm_model, "format": settings.prm_format, **tag}
    return {"prm": "judge", "model": settings.judge_model, "protocol": settings.judge_protocol,
            "verdict": settings.judge_verdict}


def step_verdicts(rows: list[dict], spans: list, settings: Settings) -> list[list]:
    """The step labeller's verdicts (or scores) of ``rows``. Rows that carry step_scores from this labeller's
    scorer (a labelled file labelled again with another threshold) keep them: no model is loaded for them."""
    scorer = step_scorer(settings)
    reuse = [scorer is not None and r.get("step_scorer") == scorer and len(r.get("step_scores") or []) == len(s)
             for r, s in zip(rows, spans)]
    todo = [i for i, kept in enumerate(reuse) if not kept]
    fresh = iter(LABELLERS[settings.prm]([rows[i] for i in todo], [spans[i] for i in todo], settings) if todo else [])
    return [row["step_scores"] if kept else next(fresh) for row, kept in zip(rows, reuse)]


def label_rows(rows: list[dict], settings: Settings) -> list[dict]:
    """Outcome label (math-verify, gold first, hard timeout) and one label per step (Section 2.1); each
    row's steps are split here, once, and passed to the step labeller. A scoring labeller's scores are written
    as step_scores, with their step_scorer, and thresholded into the labels."""
    spans = [common.step_spans(r["completion"]) for r in rows]
    preds = [grading.extract_boxed(r["completion"]) for r in rows]
    outcomes = grading.grade_answers([r["answer"] for r in rows], preds, timeout_s=settings.grade_timeout_s)
    verdicts, threshold, scorer = step_verdicts(rows, spans, settings), score_threshold(settings), step_scorer(settings)
    out = []
    for row, row_spans, pred, outcome, row_verdicts in zip(rows, spans, preds, outcomes, verdicts):
        scores = {"step_scores": row_verdicts, "step_scorer": scorer} if scorer is not None else {}
        if threshold is not None:
            row_verdicts = [None if score is None else score >= threshold for score in row_verdicts]
        labels, failures, cutoffs = labels_from_verdicts(row_verdicts)
        out.append({**row, "completions": common.step_texts(row["completion"], row_spans), "step_spans": row_spans,
                    "labels": labels, **scores, "outcome": outcome, "pred": pred, "prm": settings.prm,
                    "prm_failures": failures, "prm_cutoffs": cutoffs})
    return out


# The share of steps cut off at the judge's token budget from which the summary says to raise the budget.
CUTOFF_WARNING_SHARE = 0.05


def summary(rows: list[dict]) -> str:
    steps = sum(len(r["labels"]) for r in rows)
    right, wrong = (sum(r["labels"].count(verdict) for r in rows) for verdict in (True, False))
    failures, cutoffs = sum(r["prm_failures"] for r in rows), sum(r["prm_cutoffs"] for r in rows)
    line = (f"{len(rows)} samples, {steps} steps: {right} right, {wrong} wrong, {failures} without a verdict "
            f"(no evidence: left out of the step level)")
    if cutoffs:
        line += f", {cutoffs} of them because the judge's reply was cut off at its token budget"
    if cutoffs and cutoffs >= CUTOFF_WARNING_SHARE * steps:
        line += f" ({cutoffs / steps:.0%} of the steps: raise --judge_max_new_tokens)"
    return line


def labeller_settings(settings: Settings) -> str:
    """One line saying which model labels, and how: the judge's endpoint or engine, the rollout policy's engine."""
    if settings.prm == "check":
        return "step labeller: check (exact, no model)"
    if settings.prm == "reward_model":
        where = (f"served at {common.redact_url(settings.prm_base_url)}" if settings.prm_base_url else
                 f"(dtype {settings.prm_dtype})")
        return (f"step labeller: reward_model {settings.prm_model} {where}, format {settings.prm_format}, "
                f"threshold {settings.prm_threshold}")
    if settings.prm == "mc":
        return (f"step labeller: mc with {settings.policy_model} (engine {settings.engine}, dtype {settings.dtype}, "
                f"tensor_parallel_size {settings.tensor_parallel_size}; {settings.mc_rollouts} rollouts of up to "
                f"{settings.mc_max_new_tokens} tokens)")
    engine = judge_engine_settings(settings)
    where = (f"served at {common.redact_url(settings.judge_base_url)} (api {settings.judge_api}, up to "
             f"{settings.judge_max_concurrency} requests at once)" if settings.judge_engine == "openai" else
             f"(engine {engine.engine}, dtype {engine.dtype}, tensor_parallel_size {engine.tensor_parallel_size})")
    verdict = settings.judge_verdict + (f", threshold {settings.judge_threshold}" if score_threshold(settings) else "")
    return (f"step labeller: judge with {settings.judge_model} {where}; protocol {settings.judge_protocol}, verdict "
            f"{verdict}, up to {settings.judge_max_new_tokens} tokens per reply")


def check_references(rows: list[dict], settings: Settings, path: str) -> None:
    """The paper's judge compares each step with a reference solution (Section 2.1): say how many rows lack
    one, and refuse when none has one (unless --allow_missing_reference)."""
    if settings.prm != "judge":
        return
    missing = sum(not isinstance(r.get("solution"), str) or not r["solution"].strip() for r in rows)
    if missing == len(rows) and not settings.allow_missing_reference:
        raise common.DataError(
            f"{path}: no row has a reference solution (field 'solution'), which the judge compares each step with: "
            "sample from problems that carry one (e.g. math_train, gsm8k_train), or pass --allow_missing_reference")
    if missing:
        print(f"{path}: {missing} of {len(rows)} rows have no reference solution: the judge sees none for them",
              flush=True)


def label_file(samples: str, output: str, settings: Settings, chunk_size: int = 1024,
               shard: common.Shard = common.Shard(), on_change: str = "stop") -> bool:
    """Label this shard's chunks (``chunk_size`` rows each) of the SAMPLE_ROW rows of ``samples`` into ``output``
    (LABELLED_ROW rows), resuming after the chunks a killed run of the same provenance finished. True when ``output``
    is complete."""
    check_args(settings)
    inputs = {"samples": provenance.file_input(samples)}  # the bytes as they are when the stage starts
    rows = common.read_jsonl(samples, common.SAMPLE_ROW)
    if settings.prm == "mc" and not settings.policy_model:
        settings = replace(settings, policy_model=policy_model_of(rows, samples))
    if provenance.settle_jsonl(output, labelling_provenance(settings, inputs, chunk_size), on_change):
        return True
    check_references(rows, settings, samples)
    chunks = common.chunked(rows, chunk_size)
    try:
        return label_chunks([[r["id"] for r in c] for c in chunks], chunks.__getitem__, output, settings, shard)
    except common.DataError as error:  # a labeller names the row by its id ("row 'p3#1': step 2 ..."); add the file
        raise common.DataError(f"{samples}: {error}" if str(error).startswith("row ") else str(error)) from None


# How a served judge is reached: settings that never change what it replies, left out of the provenance record.
TRANSPORT = ("judge_base_url", "judge_api_key_env", "judge_max_concurrency", "judge_timeout_s", "judge_retries",
             "prm_base_url", "prm_batch_size")
# The models a labeller may use: recorded by what they are (provenance.model_identity), not by their paths.
LABELLER_MODELS = ("judge_model", "judge_tokenizer", "prm_model", "policy_model")


def labelling_provenance(settings: Settings, inputs: dict, chunk_size: int) -> dict:
    """The labels' provenance record: the samples, the labeller's models and every setting that decides a label,
    only those that apply to this labeller (options.py), never how a server is reached."""
    applied = options.applicable("label.py", settings)
    values = {f.name: getattr(applied, f.name) for f in fields(Settings) if f.name not in TRANSPORT + LABELLER_MODELS}
    models = {name: provenance.model_identity(getattr(applied, name)) for name in LABELLER_MODELS
              if getattr(applied, name)}
    return provenance.make_record("label.py", inputs, models, {**values, "chunk_size": chunk_size})


def label_chunks(chunk_ids: list[list[str]], rows_of_chunk, output: str, settings: Settings,
                 shard: common.Shard) -> bool:
    """Label chunk i's rows (``rows_of_chunk(i)``, ids ``chunk_ids[i]``) for this shard's chunks into ``output``,
    whose provenance the caller settled; True when ``output`` is complete, after which the summary line is printed."""
    print(labeller_settings(settings), flush=True)
    label = lambda i: label_rows(rows_of_chunk(i), settings)  # noqa: E731
    done = common.write_chunks(output, chunk_ids, label, common.LABELLED_ROW, shard, f"label ({settings.prm})")
    if done:
        print(f"labelled {summary(common.read_jsonl(output, common.LABELLED_ROW))} into {output}")
    return done


def main(args: Args) -> None:
    options.refuse_inapplicable("label.py", args, engine=lambda: generate.resolve_engine(args.engine),
                                judge_engine=lambda: generate.resolve_engine(args.judge_engine))
    shard = args.shard()
    if not label_file(args.input, args.output, args, args.chunk_size, shard, args.on_change):
        print(f"shard {shard.index} of {shard.count} done: the last shard to finish writes {args.output}")


if __name__ == "__main__":
    common.run_cli(Args, main)
