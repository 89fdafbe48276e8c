"""Exact step labels for text of any kind (label.py --prm check off the built-in task): a step is wrong when an
arithmetic equation it states is false, evaluated by stepkto/arith_task.py (tokenize, value_of) once LaTeX, markdown,
currency, units and remarks are rewritten to plain arithmetic; whatever cannot be parsed is left alone."""

from __future__ import annotations

import re
from fractions import Fraction

from stepkto.arith_task import NUMBER, OPERATORS, TooLarge, tokenize, value_of

# A pattern starting with a repeated class first looks behind for a character outside it: a match is tried at the
# start of a run only (not in time quadratic in its length), and the leftmost match is the same.
_REWRITES = [  # in order: LaTeX, markdown, currency, remarks and units -> plain arithmetic
    (r"(?<!\d)(\d+)[ \t]*\\[dt]?frac\{(\d+)\}\{(\d+)\}", r"(\1+\2/\3)"),  # mixed number 4\frac{5}{8}
    (r"\\text\{([^{}]*)\}", r" \1 "), (r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))"),
    (r"\^\{([^{}]*)\}", r"^(\1)"), (r"\{,\}|\\!|\\left|\\right", ""), (r"\\%", "%"), (r"\*\*", " "),
    (r"\\times|\\cdot|[×·⋅∗]", "*"), (r"\\div|÷", "/"), (r"[−–]", "-"),
    (r"\\[()\[\]]", "\n"), (r"\\[,; ]", " "), (r"\\?\$|[€£]", ""),  # math delimiters end a run
    (r"(?<=\d),(?=\d{3}(?!\d))", ""),  # 1,000 -> 1000
    (r"(\d%?)[ \t]+of[ \t]+(?=[\d(])", r"\1 * "),  # 1/3 of 18, 20% of 50
    (r"(?<![ \t])[ \t]*\([A-Za-z][A-Za-z' ]+\)", ""),  # remarks: 9 (red) + 14 (blue)
    # units between a number and an operator: 33 classes * 15 students/class = 495 students
    (r"([\d)]%?)(?:(?:[ \t]+[A-Za-z]{2,}){1,2}"  # one or two words ...
     r"(?:[ \t]*/[ \t]*[A-Za-z]{2,}|[ \t]+(?:per|of)[ \t]+[A-Za-z]{2,})?"  # ... then /unit, per unit
     r"|[ \t]*/[ \t]*[A-Za-z]{2,})\b(?=[ \t]*(?:[+*/=)](?![ \t]*[A-Za-z])|[-x][ \t]))", r"\1"),
    (r"(?<=[\d)%])[ \t]*[xX][ \t]*(?=[\d(.])", " * "),  # 2 x 3
    (r"(?<![\d.])\d+(?:\.\d+)?[a-zA-Z]\b", " var "),  # 1.5x, 2f: a variable, not a number
    (r"(?<=[\d)])\(", "*("), (r"\)(?=\d)", ")*"),  # implicit products: 2(5), (3)(4)
]
_MATH_RUN = re.compile(r"(?<![\d.+\-*/^()%= \t])[\d.+\-*/^()%= \t]*=[\d.+\-*/^()%= \t]*")
_WORDY = re.compile(r"[\w\\{}\[\]@|]")  # a run touching one is inside a formula: p(1), a_1^3, 3\pi
GLUED = "~"  # token marking such a side: nothing next to it is a whole expression


def _equation_sides(text: str):
    """(left tokens, right tokens) around every `=` in every run of arithmetic characters."""
    for pattern, replacement in _REWRITES:
        text = re.sub(pattern, replacement, text)
    for match in _MATH_RUN.finditer(text):
        run, start, end = match.group(), match.start(), match.end()
        if _WORDY.fullmatch(text[start - 1:start]) and not run[0].isspace():
            run = run[1:] if run[0] == ")" else GLUED + run  # `(see above) 5 + 3`, else glued
        if _WORDY.fullmatch(text[end:end + 1]) and not run[-1].isspace():
            run = run[:-1] if run[-1] == "(" else run + GLUED  # `= 12 (for ...`, else glued
        parts = [tokenize(part) for part in run.split("=")]
        yield from zip(parts, parts[1:])


def _left_expression(tokens: list[str]) -> list[str]:
    """Longest parseable tail not cut out of a longer expression (`2x + 3`: none)."""
    for start in range(len(tokens)):
        if start > 0 and tokens[start - 1] in OPERATORS | {")", GLUED}:
            continue  # `2x + 3`, `(1)(2 + 3)`: the expression goes on to the left
        if tokens[start] != "-" and value_of(tokens[start:]) is not None:  # `x - 3 = 7`
            return tokens[start:]
    return []


def _right_expression(tokens: list[str]) -> list[str]:
    """Longest parseable head not cut out of a longer expression (`= 495 students.` -> 495)."""
    for end in range(len(tokens), 0, -1):
        if end < len(tokens) and tokens[end] in OPERATORS | {"(", GLUED}:
            continue  # `(1)/(x)`, `12 - x`, `3\pi`: the expression goes on to the right
        if value_of(tokens[:end]) is not None:
            return tokens[:end]
    return []


def _matches(value: Fraction, stated: list[str], percent: Fraction) -> bool:
    """`stated` equals `value`; a single number may be rounded or truncated at its last digit (10/3 = 3.33 or 3.34;
    370/110 = 3.363...) but only where `value` needs it (2 + 3 = 6 is false)."""
    numbers, stated_value = NUMBER.findall(" ".join(stated)), value_of(stated, percent)
    if stated_value is None or len(numbers) != 1:
        return value == stated_value
    unit = Fraction(1, 10 ** len(numbers[0].partition(".")[2])) * (percent if "%" in stated else 1)
    return value == stated_value if (value / unit).denominator == 1 else abs(value - stated_value) < unit


def check_equations(step: str) -> bool:
    """False iff an equation with an operator on its left is false under both `%` readings (unit, /100) or TooLarge;
    in a chain `2 + 3 = 5 + 1 = 6` each side may also equal the next side's first number."""
    try:
        for left_tokens, right_tokens in _equation_sides(step):
            left, right = _left_expression(left_tokens), _right_expression(right_tokens)
            if not right or not OPERATORS & set(left):
                continue  # not a computation: `1 hour = 60 minutes`, `x = 5`, `Time to 400 degrees = 28`
            head = right[:2] if right[1:2] == ["%"] else right[:1]
            readings = (Fraction(1), Fraction(1, 100)) if "%" in left + right else (Fraction(1),)
            if not any(_matches(value_of(left, p), side, p) for p in readings for side in (right, head)):
                return False
    except TooLarge:
        return False
    return True


def label_steps_by_equations(steps: list[str]) -> list[bool]:
    """One label per step: True unless the step states a false equation."""
    return [check_equations(step) for step in steps]
