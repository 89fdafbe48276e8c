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
  parser: ``parse_verdict``: an explicit marker such as "Verdict:" or \\boxed{} decides, else a verdict
  the reply opens with, else its last one; a hedge such as "not entirely correct" is never read as
  right). ``--judge_protocol first_error``: one call per solution naming its first wrong step, as
  ProcessBench asks (``FIRST_ERROR_TEMPLATE``, ``parse_first_error``): the steps before it
  are right, it and the steps after it wrong (train with ``--step_scope first_error`` to score only
  through it). A verdict that cannot be parsed is a
  failure: the step is labelled WRONG (``UNPARSEABLE_STEP_LABEL``: a step nobody vouched for must not
  be reinforced as right) and counted in the row's ``prm_failures`` and in the printed summary.
* ``mc``: Monte-Carlo rollouts (Math-Shepherd, arXiv 2312.08935): from the prefix through step k
  (prompt + completion through the end of step k + "\\n\\n") the policy (``--policy_model``, default the
  rows' ``gen.model``) samples ``--mc_rollouts`` continuations; step k is right when at least
  ``--mc_threshold`` of them end in the gold answer (last \\boxed{} of the completion's first k steps
  plus the continuation, graded by grading.grade_answers).

A labeller is ``fn(rows, spans, settings, engine=None) -> [[True | False | None per step] per row]``
(None: no verdict), where ``spans[i]`` are row i's steps (common.step_spans, split once in label_rows).
judge and mc generate through generate.py's engines (transformers | vllm), loaded once per process
(``engine`` replaces that engine: the ProcessBench benchmark passes one that counts tokens); all judge
prompts / rollouts of a chunk go through one generation call.

Other stages call ``label_file(samples, output, Settings(...))`` (evaluate.py does) or ``label_rows``,
never ``main``. Input rows must carry common.SAMPLE_ROW; output rows carry common.LABELLED_ROW: the input
rows plus

    {"completions": [step, ...], "step_spans": [[start, end] per step: characters of "completion"],
     "labels": [bool per step], "outcome": bool, "pred": str | None,
     "prm": str, "prm_failures": int (steps without a verdict, labelled wrong)}

where ``prompt`` / ``completions`` / ``labels`` are TRL's stepwise-supervision fields, so the file feeds
TRL's PRMTrainer as it is.

Usage:

    python label.py --input runs/stepkto/iter1/samples.jsonl --output runs/stepkto/iter1/labels.jsonl --prm check
    python label.py --input samples.jsonl --output labels.jsonl --prm judge \\
        --judge_model Qwen/Qwen2.5-72B-Instruct --judge_engine vllm --judge_tensor_parallel_size 8
    python label.py --input samples.jsonl --output labels.jsonl --prm mc --mc_rollouts 8 --engine vllm

Crash safety and shards (--num_shards, --shard_index) as in generate.py: OUTPUT.partial grows a chunk at a time; a
rerun resumes. mc seeds each chunk from (--seed, the chunk's row ids), so a resumed or sharded run writes what an
uninterrupted one would have.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal


import arith_task
import common
import equations
import generate
import grading
import options
from common import option

# The label of a step whose judge verdict could not be parsed (counted in prm_failures): wrong, because a
# step that no judge vouched for must not be reinforced as right by the step-level loss.
UNPARSEABLE_STEP_LABEL = False


@dataclass(frozen=True, kw_only=True)
class Settings(generate.EngineSettings):
    """How to label: every option of label.py but its files; evaluate.py takes them as it takes generate.py's.
    The engine settings (engine, dtype, ...) are those of the mc rollouts' policy; the judge has its own."""

    prm: Literal["check", "judge", "mc"] = option("check", help="Step labeller: check | judge | mc.")
    grade_timeout_s: float = option(5.0, help="Hard per-answer timeout of the grader (outcome labels and mc rollouts).")
    judge_model: str = option("", help="--prm judge: the judge LLM (folder or hub id).")
    judge_protocol: Literal["step", "first_error"] = option("step", help=(
        "--prm judge: step (one call per step: is this step correct?) | first_error (one call per solution "
        "naming its first wrong step, as ProcessBench asks; the steps after it are labelled wrong: train with "
        "--step_scope first_error to score only through it)."))
    judge_max_new_tokens: int = option(512, help=(
        "--prm judge: tokens per reply (greedy). A judge that reasons before its verdict needs room: a reply cut "
        "off before it has no verdict, and its step is labelled wrong."))
    judge_engine: generate.EngineName = option("auto", help="--prm judge: the judge's engine: transformers | vllm | auto.")
    judge_dtype: generate.Dtype = option("auto", help="--prm judge: the judge's dtype (as --dtype).")
    judge_tensor_parallel_size: int = option(1, help="--prm judge: vLLM tensor parallel size of the judge.")
    judge_gpu_memory_utilization: float = option(0.9, help="--prm judge: vLLM's share of GPU memory for the judge.")
    judge_max_model_len: int = option(0, help="--prm judge: vLLM context length of the judge (0: the model's own).")
    allow_missing_reference: bool = option(False, help=(
        "--prm judge: label even when no row has a reference solution (field 'solution'), which the paper's judge "
        "compares each step with (Section 2.1). Rows without one are always counted and reported."))
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


def check_args(settings: Settings) -> None:
    """Fail before any work on an option combination that cannot run."""
    common.check_choices(settings)
    options.refuse_inapplicable("label.py", settings, engine=lambda: generate.resolve_engine(settings.engine),
                                judge_engine=lambda: generate.resolve_engine(settings.judge_engine))
    if settings.prm == "judge" and not settings.judge_model:
        raise ValueError("--prm judge needs --judge_model (a folder or hub id)")
    if settings.prm == "mc" and not 1 <= settings.mc_threshold <= settings.mc_rollouts:
        raise ValueError(f"--mc_threshold must be in 1..--mc_rollouts ({settings.mc_rollouts}), got {settings.mc_threshold}")


def judge_engine_settings(settings: Settings) -> generate.EngineSettings:
    """The judge's engine: its own engine, dtype, TP size, memory share and context; prefix caching as the process's."""
    return generate.EngineSettings(
        engine=settings.judge_engine, dtype=settings.judge_dtype, tensor_parallel_size=settings.judge_tensor_parallel_size,
        gpu_memory_utilization=settings.judge_gpu_memory_utilization, max_model_len=settings.judge_max_model_len,
        enable_prefix_caching=settings.enable_prefix_caching,
    )


# ----------------------------------------------------------------------------- check


def check_labeller(rows: list[dict], spans: list, settings: Settings, engine=None) -> list[list[bool]]:
    """Exact step labels: the expression-tree checker on built-in problems, equations elsewhere (no model)."""
    labels = []
    for row, row_spans in zip(rows, spans):
        steps = common.step_texts(row["completion"], row_spans)
        if arith_task.is_arith_problem(row["problem"]):
            labels.append(arith_task.check_steps(row["problem"], steps))
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


def build_judge_prompt(tokenizer, problem: str, reference: str | None, previous: list[str], step: str) -> str:
    text = JUDGE_TEMPLATE.format(
        problem=problem, reference=reference or NO_REFERENCE, previous=numbered_steps(previous) or NO_PREVIOUS_STEPS,
        step=step,
    )
    return common.chat_prompt(tokenizer, text, "\n\nVerdict:")


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
    """The phrases of the reply's explicit markers, in order: a box's content, a marker's next sentence."""
    phrases = []
    for marker in _MARKER.finditer(text):
        rest = marker.group("boxed") if marker.group("boxed") is not None else text[marker.end():]
        phrases.append((_sentences(rest) or [""])[0])
    return phrases


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

    1. Explicit markers decide first, and the last one that holds a verdict wins: \\boxed{...} (also
       \\boxed{\\text{...}}), "Verdict: ...", "Final verdict: ...", "Judgement: ...", "Final answer: ...",
       "Answer: ..." at a line's start, markdown-bold or not ("**Verdict:** Incorrect").
    2. Else a reply that opens with a verdict ("Incorrect. The correct value is 12.", "The step is not
       quite correct."; after markdown / punctuation noise and a subject such as "The step is") is read
       by its first sentence.
    3. Else the last sentence (not a question) that holds a verdict decides: a judge that reasons first
       ends on its verdict.
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
    6. All verdicts positive -> True; negatives and no positive -> False; both -> None (a contradiction);
       none -> None. A hedge is never True: a step nobody vouched for must not be reinforced.
    """
    text = text.replace("\u2019", "'")  # a typographic apostrophe: "isn\u2019t correct"
    for phrase in reversed(_marked_phrases(text)):
        if values := _phrase_verdicts(phrase, answer_first=True):
            return _decide(values)
    opening = _opening_phrase(text)
    if opening is not None:
        return _decide(_phrase_verdicts(opening, answer_first=True))
    for sentence in reversed(_sentences(text)):
        if not sentence.rstrip().endswith("?") and (values := _phrase_verdicts(sentence)):
            return _decide(values)
    return None


def judge_step_verdicts(solutions: list[tuple[str, str | None, list[str]]], tokenizer, judge_fn) -> list[list[bool | None]]:
    """Verdict of every step; ``solutions`` = (problem, reference solution or None, steps) each.

    judge_fn(prompts) -> [reply text per prompt]: all steps of all solutions go through one call.
    """
    prompts = [
        [build_judge_prompt(tokenizer, problem, reference, steps[:k], steps[k]) for k in range(len(steps))]
        for problem, reference, steps in solutions
    ]
    flat = [prompt for per_solution in prompts for prompt in per_solution]
    verdicts = iter([parse_verdict(reply) for reply in judge_fn(flat)] if flat else [])
    return [[next(verdicts) for _ in per_solution] for per_solution in prompts]


def judge_labeller(rows: list[dict], spans: list, settings: Settings, engine=None) -> list[list[bool | None]]:
    """The LLM judge's verdict per step (greedy), by --judge_protocol: one call per step or per solution."""
    engine = engine or generate.get_engine(settings.judge_model, judge_engine_settings(settings))
    greedy = generate.Sampling(1, 0.0, 1.0, settings.judge_max_new_tokens)
    solutions = [(r["problem"], r.get("solution"), common.step_texts(r["completion"], s)) for r, s in zip(rows, spans)]
    judge_fn = lambda prompts: [o[0].text for o in engine.generate(prompts, greedy, settings.seed)]  # noqa: E731
    return JUDGE_PROTOCOLS[settings.judge_protocol](solutions, engine.tokenizer, judge_fn)


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


def build_first_error_prompt(tokenizer, problem: str, reference: str | None, steps: list[str]) -> str:
    text = FIRST_ERROR_TEMPLATE.format(problem=problem, reference=reference or NO_REFERENCE, steps=numbered_steps(steps))
    return common.chat_prompt(tokenizer, text, "\n\nFirst wrong step:")


def parse_first_error(text: str, num_steps: int) -> int | None:
    """0-based index of the first wrong step, -1 for "none", None when the reply names no valid step.

    The last \\boxed{} when there is one, else the reply's first word ("3", "Step 3", "none").
    """
    boxed = grading.extract_boxed(text)
    answer = (boxed if boxed is not None else text).strip().lower().strip(".:*` ")
    if boxed is None:
        answer = re.sub(r"^step\s+", "", answer)
        answer = re.match(r"-?\d+|none|no error|all correct", answer)
        answer = answer.group(0) if answer else ""
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


def judge_first_error_verdicts(solutions, tokenizer, judge_fn) -> list[list[bool | None]]:
    """One judge call per solution (with steps): it names the first wrong step; see judge_step_verdicts."""
    with_steps = [i for i, (_, _, steps) in enumerate(solutions) if steps]
    prompts = [build_first_error_prompt(tokenizer, *solutions[i]) for i in with_steps]
    replies = dict(zip(with_steps, judge_fn(prompts) if prompts else []))
    return [
        verdicts_from_first_error(parse_first_error(replies[i], len(steps)), len(steps)) if steps else []
        for i, (_, _, steps) in enumerate(solutions)
    ]


JUDGE_PROTOCOLS = {"step": judge_step_verdicts, "first_error": judge_first_error_verdicts}


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


# ----------------------------------------------------------------------------- rows

LABELLERS = {"check": check_labeller, "judge": judge_labeller, "mc": mc_labeller}


def labels_from_verdicts(verdicts: list[bool | None]) -> tuple[list[bool], int]:
    """(step labels, number of steps without a verdict); those get UNPARSEABLE_STEP_LABEL."""
    labels = [UNPARSEABLE_STEP_LABEL if v is None else v for v in verdicts]
    return labels, sum(v is None for v in verdicts)


def label_rows(rows: list[dict], settings: Settings) -> list[dict]:
    """Outcome label (math-verify, gold first, hard timeout) and one label per step (Section 2.1); each
    row's steps are split here, once, and passed to the step labeller."""
    spans = [common.step_spans(r["completion"]) for r in rows]
    preds = [grading.extract_boxed(r["completion"]) for r in rows]
    outcomes = grading.grade_answers([r["answer"] for r in rows], preds, timeout_s=settings.grade_timeout_s)
    verdicts = LABELLERS[settings.prm](rows, spans, settings)
    out = []
    for row, row_spans, pred, outcome, row_verdicts in zip(rows, spans, preds, outcomes, verdicts):
        labels, failures = labels_from_verdicts(row_verdicts)
        out.append({**row, "completions": common.step_texts(row["completion"], row_spans), "step_spans": row_spans,
                    "labels": labels, "outcome": outcome, "pred": pred, "prm": settings.prm, "prm_failures": failures})
    return out


def summary(rows: list[dict]) -> str:
    steps = sum(len(r["labels"]) for r in rows)
    wrong = sum(r["labels"].count(False) for r in rows)
    failures = sum(r["prm_failures"] for r in rows)
    return (f"{len(rows)} samples, {steps} steps: {steps - wrong} right, {wrong} wrong, of which "
            f"{failures} without a verdict (prm_failures, labelled wrong)")


def labeller_settings(settings: Settings) -> str:
    """One line saying which model labels, and how: the judge's / rollout policy's engine, dtype and TP size."""
    if settings.prm == "check":
        return "step labeller: check (exact, no model)"
    judge = settings.prm == "judge"
    model = settings.judge_model if judge else settings.policy_model
    engine = judge_engine_settings(settings) if judge else settings
    how = f"protocol {settings.judge_protocol}, up to {settings.judge_max_new_tokens} tokens per reply" if judge else \
        f"{settings.mc_rollouts} rollouts of up to {settings.mc_max_new_tokens} tokens"
    return (f"step labeller: {settings.prm} with {model} (engine {engine.engine}, dtype {engine.dtype}, "
            f"tensor_parallel_size {engine.tensor_parallel_size}; {how})")


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
               shard: common.Shard = common.Shard()) -> bool:
    """Label this shard's chunks (``chunk_size`` rows each) of the SAMPLE_ROW rows of ``samples`` into ``output``
    (LABELLED_ROW rows), resuming after the chunks a killed run finished. True when ``output`` is complete."""
    if Path(output).exists():  # the one place that looks
        print(f"{output} is complete; nothing to do.")
        return True
    check_args(settings)
    rows = common.read_jsonl(samples, common.SAMPLE_ROW)
    if settings.prm == "mc" and not settings.policy_model:
        settings = replace(settings, policy_model=policy_model_of(rows, samples))
    check_references(rows, settings, samples)
    chunks = common.chunked(rows, chunk_size)
    return label_chunks([[r["id"] for r in c] for c in chunks], chunks.__getitem__, output, settings, shard)


def label_chunks(chunk_ids: list[list[str]], rows_of_chunk, output: str, settings: Settings,
                 shard: common.Shard) -> bool:
    """Label chunk i's rows (``rows_of_chunk(i)``, ids ``chunk_ids[i]``) for this shard's chunks into ``output``;
    True when ``output`` is complete, after which the summary line is printed."""
    print(labeller_settings(settings), flush=True)
    signature = {"labeller": {f.name: getattr(settings, f.name) for f in fields(Settings)}}
    label = lambda i: label_rows(rows_of_chunk(i), settings)  # noqa: E731
    done = common.write_chunks(output, chunk_ids, label, common.LABELLED_ROW, shard, signature, f"label ({settings.prm})")
    if done:
        print(f"labelled {summary(common.read_jsonl(output, common.LABELLED_ROW))} into {output}")
    return done


def main(args: Args) -> None:
    shard = args.shard()
    if not label_file(args.input, args.output, args, args.chunk_size, shard):
        print(f"shard {shard.index} of {shard.count} done: the last shard to finish writes {args.output}")


if __name__ == "__main__":
    common.run_cli(Args, main)
