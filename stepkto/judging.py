"""The LLM judge of label.py ``--prm judge`` (the paper's PRM as we read it, Section 2.1): its prompts and how a
verdict is read from its reply.

* ``--judge_protocol step``: one call per step (``JUDGE_TEMPLATE``: the problem, the reference solution, the previous
  steps and the step), read by ``parse_verdict`` (True, False or None: no verdict), or scored from the log-probs of
  its first word (``verdict_score``).
* ``--judge_protocol first_error``: one call per solution naming its first wrong step, as ProcessBench asks
  (``FIRST_ERROR_TEMPLATE``, ``parse_first_error``): the steps before it are right, it and the steps after it wrong.
* A reply cut off at the token budget is ``CUT_OFF``: no verdict, whatever its text says.

``parse_verdict`` reads only the judge's own words (quoted text and what "the student claims" never decide); its
explicit verdicts must agree; a hedge is never right. Its docstring lists the rules; tests/test_labellers.py holds
the table of replies and verdicts."""

from __future__ import annotations

import math
import re

from stepkto import engines, grading, prompting


class CutOff:
    """The type of CUT_OFF."""

    def __repr__(self) -> str:
        return "judging.CUT_OFF"


# What the judge labeller gives a step whose reply stopped at --judge_max_new_tokens: no verdict, whatever the text
# so far says ("The sum is correct. Next, the student multiplies and gets" is no verdict on the step). label_rows
# writes it as a null label and counts it in prm_failures and prm_cutoffs.
CUT_OFF = CutOff()


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
    return prompting.STEP_SEPARATOR.join(f"Step {i + 1}: {s}" for i, s in enumerate(steps))


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
    return prompting.chat_prompt(tokenizer, text, plain_suffix)


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
    decisions = [_agreed(values) for values in _explicit_verdicts(text)]
    sentences = [_agreed(v) for s in _sentences(text) if not s.rstrip().endswith("?") and (v := _phrase_verdicts(s))]
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


def _agreed(values: list[bool | None]) -> bool | None:
    """True when all values are True, False when all are False, None for a contradiction (or when all are None)."""
    return values[0] if len(set(values)) == 1 else None


def _concluded(sentences: list[bool | None]) -> bool | None:
    """Rule 3: True when every verdict sentence is positive, False when the last is negative, else None."""
    if not sentences:
        return None
    return True if all(sentences) else False if sentences[-1] is False else None


def judge_step_verdicts(solutions: list[tuple[str, str | None, list[str]]], tokenizer, ask, read) -> list[list]:
    """Verdict (or score) of every step; ``solutions`` = (problem, reference solution or None, steps) each.

    ask(prompts) -> [engines.Sample per prompt]: all steps of all solutions go through one call; read(sample) ->
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


def text_verdict(sample: engines.Sample):
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
                words = [_word(engines.decode_token(tokenizer, i)) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
                pieces[verdict].add(next(w for w in words if w))
    return pieces


def verdict_score(logprobs: list[engines.TokenLogprobs] | None, pieces: dict[str, set[str]]) -> float | None:
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
    boxes = grading.all_boxed(text)
    if not boxes:
        first = re.sub(r"^step\s+", "", text.strip().lower().strip(".:*` "))
        word = re.match(r"-?\d+|none|no error|all correct", first)
        return _first_error_of(word.group(0) if word else "", num_steps)
    answers = {_first_error_of(b.strip().lower().strip(".:*` "), num_steps) if b is not None else None for b in boxes}
    return answers.pop() if len(answers) == 1 else None


def _first_error_of(answer: str, num_steps: int) -> int | None:
    if answer in _NO_ERROR_WORDS:
        return -1
    number = re.fullmatch(r"(?:step\s*)?(\d+)", answer)
    return int(number.group(1)) - 1 if number and 1 <= int(number.group(1)) <= num_steps else None


def judge_first_error_verdicts(solutions, tokenizer, ask) -> list[list]:
    """One judge call per solution (with steps): it names the first wrong step; see judge_step_verdicts. Every step
    of a solution whose reply was cut off at the token budget is CUT_OFF."""
    with_steps = [i for i, (_, _, steps) in enumerate(solutions) if steps]
    prompts = [judge_prompt(tokenizer, first_error_question(*solutions[i]), "\n\nFirst wrong step:") for i in with_steps]
    replies = dict(zip(with_steps, ask(prompts) if prompts else []))
    return [first_error_verdicts(replies[i], len(steps)) if steps else [] for i, (_, _, steps) in enumerate(solutions)]


def first_error_verdicts(reply: engines.Sample, num_steps: int) -> list:
    """The verdicts of a solution's steps from the judge's first-error reply: right before the first error, wrong
    from it on (a step built on a wrong one is not vouched for); None each when the reply names no valid step,
    CUT_OFF each when it was cut off."""
    if reply.finish_reason == "length":
        return [CUT_OFF] * num_steps
    first_error = parse_first_error(reply.text, num_steps)
    if first_error is None:
        return [None] * num_steps
    first_error = num_steps if first_error == -1 else first_error
    return [True] * first_error + [False] * (num_steps - first_error)
