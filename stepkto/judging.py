"""The LLM judge of label.py ``--prm judge`` (the paper's PRM as we read it, Section 2.1): its prompts, and how a
verdict is read from a reply, per step or per solution (ProcessBench's first wrong step). A reply cut off at the
token budget (CUT_OFF) or quoted text decides nothing: a label is a verdict the judge gave, or none."""

from __future__ import annotations

import math
import re

from stepkto import engines, grading, prompting


class CutOff:
    def __repr__(self) -> str:
        return "judging.CUT_OFF"


# A step whose reply stopped at --judge_max_new_tokens has no verdict, whatever its text says: label_rows writes null.
CUT_OFF = CutOff()

# The judge prompt: the user message of the judge tokenizer's chat template, else plain text and "Verdict:". A judge
# may reason before its verdict or explain after it; parse_verdict reads which words decide.
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
    previous = numbered_steps(previous) or NO_PREVIOUS_STEPS
    return JUDGE_TEMPLATE.format(problem=problem, reference=reference or NO_REFERENCE, previous=previous, step=step)


def judge_prompt(tokenizer, text: str, plain_suffix: str):
    """``text`` as the judge's engine takes it: a chat-template prompt, or the message itself for a chat API."""
    if tokenizer is None:
        return [{"role": "user", "content": text}]
    return prompting.chat_prompt(tokenizer, text, plain_suffix)


# Contrast and condition words: a positive verdict before one is a hedge ("correct, but the sign is off", "correct if
# x > 0"); after one only negatives count ("incorrect, but the final answer is correct" is a negative).
_CONTRAST = re.compile(
    r"\b(?:but|however|though|although|except|yet|whereas|while|wait|if|unless|assuming|provided"
    r"|apart\s+from|aside\s+from|other\s+than|save\s+for)\b", re.IGNORECASE)

# Sentence breaks: after . ! ? or at a line break; not before a contrast word ("Correct. However, ..." is a hedge).
_SENTENCE_BREAK = re.compile(
    r"(?:(?<=[.!?])[ \t]+|[ \t]*\n\s*)(?=\S)(?!(?:but|however|though|although|except|yet|wait)\b)", re.IGNORECASE)

# What stands for a quotation: before a verdict word it is a scare quote ("it's 'mostly' correct" is a hedge).
_QUOTE_MARK = "⟨quoted⟩"

# A verb before "right" / "true" / "false", the only place they are verdicts ("is right", not "right triangle").
_COPULA = r"(?:\bis|\bwas|\bare|\bbe|\bbeen|'s|\bseems?|\blooks?|\bsounds?|\bappears?)\s+(?:to\s+be\s+)?"

# Adverbs that hedge a positive word into something short of right: "partially correct", "mostly right".
_HEDGE = (r"(?:partially|partly|mostly|almost|largely|somewhat|half|nearly|essentially|basically|mainly"
          r"|roughly|approximately|technically|arguably|probably|possibly|likely|seemingly|apparently"
          r"|hardly|barely|scarcely|kind\s+of|sort\s+of|more\s+or\s+less)")

# A reply's verdict phrases, tried in this order at each position. void: look-alikes ("not wrong", "the correct value
# is 12", "to correct it"); neg: negated or hedged positives, negative words, "is false", "contains an error"; pos:
# correct, valid, "is right", "no errors". \b keeps "incorrect", "correctly", "correction" from reading "correct".
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
    rf"|{_COPULA}(?:right|true)\b|\b(?:correct|valid)\b)", re.IGNORECASE)

# A one-word answer opening an opening or marked phrase, alone ("Yes.", "**No**") or before a statement
# about the step ("No, the step is wrong"); not "No error ...", "Right triangle" or the filler "Right, let me check".
_ANSWER_WORD = re.compile(
    r"(?:(?P<pos>yes|right|true)|(?P<neg>no|false))\b"
    r"(?=[ \t*_}]*(?:[.!:;)\n]|$)|[ \t*_]*,\s*(?:the|this|it|that)\b)", re.IGNORECASE)

# Explicit answer markers: \boxed{...} (its content is the phrase); "Verdict:", "The verdict is", "Judgement:", "Final
# answer:", a line's opening "Answer:" (markdown-bold or not), whose phrase is the next sentence.
_MARKER = re.compile(
    r"\\boxed\s*\{(?P<boxed>(?:[^{}]|\{[^{}]*\})*)\}"
    r"|(?<![a-z])(?:verdict|judge?ment)\b[\s*_:#=-]*(?:is\b)?"
    r"|(?:\bfinal\s+|(?:^|\n)[\s*#_>-]*)answer[\s*_]*:[\s*_]*", re.IGNORECASE)

# Markdown, punctuation and LaTeX wrappers before a reply's or a phrase's first word.
_LEADING_NOISE = re.compile(r"^(?:\\(?:boxed|text|textbf|mathrm)\b|[\W_])*")

# The subject before an opening verdict: "The step is", "This step is", "It's", "That is", "I think it is".
_SUBJECT = re.compile(
    r"(?:i\s+(?:think|believe)\s+)?"
    r"(?:(?:(?:the|this)(?:\s+[\w'-]+){0,2}?\s+)?step(?:\s+\d+|\s+to\s+check)?\s+(?:is|was)"
    r"|it\s+is|it's|that\s+is|that's|this\s+is)\s+", re.IGNORECASE)

# Quoted text: "...", “...”, `...` / ``...'', and '...' whose marks are no apostrophes (an opening one not after a
# letter, as in "isn't", a closing one not before one). A double quote or “ that never closes quotes the rest.
_QUOTED = re.compile(
    r'"[^"]*(?:"|$)|“[^”]*(?:”|$)|‘[^’]*?’(?!\w)|(`+)[^`]*?\1|``[^`]*?' + "''"
    + r"|(?<![\w'’])'(?=\S)(?:[^'\n]|'(?=\w))*?(?<=\S)'(?!\w)"
)

# Reported speech: what the student (the solution, its author) claims, says or thinks, to the next comma, sentence
# end or contrast word ("The student claims the step is correct. Actually 6 + 1 = 7.") is no verdict of the judge.
_REPORTED = re.compile(
    r"\b(?:(?:the\s+)?(?:student|solution|solver|author|writer|model|step)s?|he|she|they|it)\s+(?:\w+ly\s+)?"
    r"(?:claim|say|state|write|wrote|written|assert|believe|think|thought|argue|assume|suggest|conclude"
    r"|insist|report|declare|call|consider|mark|label)(?:s|ed|d|ing)?\b[^,;.!?\n]*?"
    r"(?=[,;.!?\n]|\b(?:but|however|though|although|yet|whereas|while|actually)\b|$)"
    r"|\baccording\s+to\s+the\s+(?:student|solution|solver|author)\b[^.!?\n]*", re.IGNORECASE)

# A verdict on the step as a whole ("the step is correct") anywhere in a sentence; "step 1 is correct" is not one.
_WHOLE_STEP = re.compile(
    r"\b(?:the|this)\s+(?:(?:current|last|given|final|student's)\s+)?step(?:\s+to\s+check)?\s+(?:is|was)\s+",
    re.IGNORECASE)

# A sentence opening with a conclusion word ("So the step is wrong.") states a verdict as a marker does.
_CONCLUSION = re.compile(
    r"^[\s*_#>-]*(?:so|thus|hence|therefore|overall|in\s+conclusion|in\s+summary|in\s+short|to\s+conclude"
    r"|to\s+summari[sz]e|all\s+in\s+all)\b[\s,:]*", re.IGNORECASE)


def judged_text(text: str) -> str:
    """The reply's own words: quoted text as _QUOTE_MARK, reported speech as "…", apostrophes made plain."""
    text = _QUOTED.sub(f" {_QUOTE_MARK} ", text)
    return _REPORTED.sub("…", text.replace("\u2019", "'"))


def _phrase_verdicts(phrase: str, answer_first: bool = False) -> list[bool]:
    """One phrase's verdicts in order (parse_verdict's rules 4, 5); with ``answer_first`` a one-word answer too."""
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


def _opening_phrase(text: str) -> str | None:
    """The reply's first sentence from its verdict on, if it opens with one; a question ("Correct? ...") does not."""
    first = (_sentences(_LEADING_NOISE.sub("", text)) or [""])[0]
    if first.rstrip().endswith("?"):
        return None
    subject = _SUBJECT.match(first)
    rest = first[subject.end():] if subject else first
    token = _TOKEN.match(rest)
    return rest if _ANSWER_WORD.match(rest) or (token and not token.group("void")) else None


def parse_verdict(text: str) -> bool | None:
    """The judge's verdict on a step: True (right), False (wrong) or None (no verdict, or a contradiction).

    1. Only the judge's own words count: quoted text and reported speech are removed first (``judged_text``).
    2. The explicit verdicts decide and must all agree: markers', the opening one's ("Incorrect. The correct value is
       12.") and each on the whole step ("so the step is correct").
    3. Else every sentence (not a question) with a verdict counts: all positive -> True; the last negative -> False
       (a judge that reasons first ends on its verdict); else None.
    4. A phrase's verdicts are its _TOKEN matches, and an opening or marked phrase's first-word _ANSWER_WORD.
    5. A positive before a qualification (_CONTRAST) is a hedge, a negative; after it only negatives count.
    6. A step is right only when all of it is: a part called right and the step wrong is negative; the step called
       right and anything in it wrong is None. A hedge is never True: a step nobody vouched for is not reinforced.
    """
    text = judged_text(text)
    decisions = [_agreed(values) for values in _explicit_verdicts(text)]
    sentences = [_agreed(v) for s in _sentences(text) if not s.rstrip().endswith("?") and (v := _phrase_verdicts(s))]
    if decisions:
        verdict = _agreed(decisions)
    else:  # rule 3
        verdict = True if sentences and all(sentences) else False if sentences[-1:] == [False] else None
    return None if verdict and not all(sentences) else verdict


def _explicit_verdicts(text: str) -> list[list[bool]]:
    """The verdicts of rule 2's phrases that hold one."""
    sentences = _sentences(text)
    rests = [m.group("boxed") if m.group("boxed") is not None else text[m.end():] for m in _MARKER.finditer(text)]
    marked = [(_sentences(rest) or [""])[0] for rest in rests]
    marked += [s[c.end():] for s in sentences if (c := _CONCLUSION.match(s))]
    marked += [opening] if (opening := _opening_phrase(text)) is not None else []
    values = [_phrase_verdicts(p, answer_first=True) for p in marked]
    values += [_phrase_verdicts(s) for s in sentences if _WHOLE_STEP.search(s)]
    return [v for v in values if v]


def _agreed(values: list[bool | None]) -> bool | None:
    """True when all values are True, False when all are False, None for a contradiction (or when all are None)."""
    return values[0] if len(set(values)) == 1 else None


def judge_step_verdicts(solutions: list[tuple[str, str | None, list[str]]], tokenizer, ask, read) -> list[list]:
    """Verdict (or score) of every step of ``solutions`` ((problem, reference or None, steps) each), all asked in one
    ask(prompts) -> [engines.Sample]; read(sample) -> its verdict (text_verdict) or score (verdict_score)."""
    prompts = [[judge_prompt(tokenizer, judge_step_question(problem, reference, steps[:k], steps[k]), "\n\nVerdict:")
                for k in range(len(steps))] for problem, reference, steps in solutions]
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
    """By verdict, the tokens (as _word) that begin it; for a chat API (no tokenizer), any start of 3+ letters."""
    if tokenizer is None:
        return {v: {v[:k] for k in range(3, len(v) + 1)} for v in VERDICTS}
    pieces = {v: set() for v in VERDICTS}
    for verdict in VERDICTS:
        for form in (verdict, verdict.capitalize(), verdict.upper()):
            for text in (form, " " + form):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                pieces[verdict].add(next(w for w in (_word(engines.decode_token(tokenizer, i)) for i in ids) if w))
    return pieces


def verdict_score(logprobs: list[engines.TokenLogprobs] | None, pieces: dict[str, set[str]]) -> float | None:
    """P(correct) / (P(correct) + P(incorrect)) at the reply's first word token; None when neither is in its top."""
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
    steps = numbered_steps(steps)
    return FIRST_ERROR_TEMPLATE.format(problem=problem, reference=reference or NO_REFERENCE, steps=steps)


def parse_first_error(text: str, num_steps: int) -> int | None:
    """0-based index of the first wrong step, -1 for "none", None when the reply names no valid step: every \\boxed{}
    of the judge's own words (``judged_text``) counts, and boxes that disagree or one never closed (a truncated reply)
    give none; without a box, the reply's first word ("3", "Step 3", "none") does."""
    text = judged_text(text)
    boxes = grading.all_boxed(text)
    if not boxes:
        first = re.sub(r"^step\s+", "", text.strip().lower().strip(".:*` "))
        word = re.match(r"-?\d+|none|no error|all correct", first)
        return _first_error_of(word.group(0) if word else "", num_steps)
    answers = {_first_error_of(b, num_steps) if b is not None else None for b in boxes}
    return answers.pop() if len(answers) == 1 else None


def _first_error_of(answer: str, num_steps: int) -> int | None:
    answer = answer.strip().lower().strip(".:*` ")
    if answer in _NO_ERROR_WORDS:
        return -1
    number = re.fullmatch(r"(?:step\s*)?(\d+)", answer)
    return int(number.group(1)) - 1 if number and 1 <= int(number.group(1)) <= num_steps else None


def judge_first_error_verdicts(solutions, tokenizer, ask) -> list[list]:
    """One judge call per solution with steps, naming its first wrong step (see judge_step_verdicts)."""
    with_steps = [i for i, (_, _, steps) in enumerate(solutions) if steps]
    questions = (first_error_question(*solutions[i]) for i in with_steps)
    prompts = [judge_prompt(tokenizer, question, "\n\nFirst wrong step:") for question in questions]
    replies = dict(zip(with_steps, ask(prompts) if prompts else []))
    return [first_error_verdicts(replies[i], len(steps)) if steps else [] for i, (_, _, steps) in enumerate(solutions)]


def first_error_verdicts(reply: engines.Sample, num_steps: int) -> list:
    """A solution's step verdicts from a first-error reply: right before the error, wrong from it on (a step built on
    a wrong one is not vouched for); all None when it names no valid step, all CUT_OFF when it was cut off."""
    if reply.finish_reason == "length":
        return [CUT_OFF] * num_steps
    first_error = parse_first_error(reply.text, num_steps)
    if first_error is None:
        return [None] * num_steps
    first_error = num_steps if first_error == -1 else first_error
    return [True] * first_error + [False] * (num_steps - first_error)
