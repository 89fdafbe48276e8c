"""The embedded default task: multi-step integer arithmetic whose every step can be checked exactly.

Sized so that a tiny model trained from scratch (digits one token each) learns it on a few CPU cores; its step labels
come from an exact checker (`check_steps`) where Step-KTO (arXiv 2501.10799, Section 2.1) uses a PRM.

Problems: `Compute (12 + 7) * 3 - 45.`, built from the answer, so every intermediate value is a non-negative integer.
Solutions: one `a op b = c` per step, steps separated by a blank line, in canonical order (deepest brackets first,
then * before +/-, then left to right), last step `The answer is \\boxed{12}.` Splits by a hash of the text, so no
split of any seed overlaps the other split of any seed.

Flawed SFT data (`write_solution`): steps slip independently, hard ones (carry, borrow, product >= HARD_PRODUCT)
more often; a slip is silent (right answer) where later steps use the TRUE value. Hard steps slip more often than
not by default: greedy decoding (what the paper evaluates) keeps only a model's likeliest habit, so only a seed that
PREFERS the careless result, yet samples the right one often enough, shows the flaws Step-KTO is meant to remove.

Command line (run.sh): train.jsonl and test.jsonl (jsonl.PROBLEM_ROW), sft.jsonl (jsonl.SFT_ROW: flawed solutions of
train problems) in one folder:
    python -m stepkto.arith_task --output_dir runs/seed0/data --num_train 2000 --num_test 500 --num_sft 20000
"""
import ast
import hashlib
import math
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from stepkto import cli, jsonl, options, prompting, provenance
from stepkto.cli import option

HARD_PRODUCT = 40  # products from here on are beyond the small times tables
TEST_PERCENT = 20  # share of the problem space (by text hash) reserved for test splits
# run.sh's MAX_NEW_TOKENS here, by scratch tokenizer and task (2-5 or 4-8 operations): above the longest solutions
TOKEN_LIMITS = {("phrase", "default"): 96, ("phrase", "hard"): 128, ("char", "default"): 160, ("char", "hard"): 200}
OPERATORS = set("+-*/^")
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "^"}
_PRECEDENCE = {"+": 0, "-": 0, "*": 1}
NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")
# Beyond these the checkers evaluate nothing (sampled text may be of any size); far above real solutions' equations
MAX_TOKENS = 256  # numbers, operators and brackets of one expression
MAX_DEPTH = 100  # levels of its tree, which is built and walked recursively (Python's recursion limit is 1000)
MAX_VALUE_BITS = 10_000  # of the numerator or the denominator of any value in it
MAX_DIGITS = MAX_VALUE_BITS * 3 // 10  # of a number in the text (a decimal digit is log2(10) > 3 bits)


class TooLarge(ValueError):
    """An expression beyond MAX_TOKENS, MAX_DEPTH, MAX_VALUE_BITS or MAX_DIGITS: a step stating it is unverifiable."""


@dataclass
class Node:
    """An expression node: a leaf (op None) holding `value`, or `left op right`."""

    value: Fraction | None = None
    op: str | None = None
    left: "Node | None" = None
    right: "Node | None" = None
    depth: int = 0  # brackets around the operator: deeper brackets are reduced first
    pos: int = 0  # where the operator is: left to right among equals
    true_value: Fraction | None = None  # the value when every step is done right


@dataclass(frozen=True)
class FlawRates:
    """Slip rates of `write_solution`; the shares of flaws they give run.sh: docs/experiments.md."""

    p_slip_easy: float = 0.03  # per step without carry/borrow and with a product < HARD_PRODUCT
    p_slip_hard: float = 0.6  # per step with a carry, a borrow, or a product >= HARD_PRODUCT
    p_silent_add: float = 0.1  # share of slipped + steps whose consumer uses the true value
    p_silent_sub: float = 0.9  # share of slipped - steps whose consumer uses the true value
    p_silent_mul: float = 0.1  # share of slipped * steps whose consumer uses the true value

    def __post_init__(self):
        for name, p in vars(self).items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"FlawRates.{name} must be in [0, 1], got {p}")


# ----------------------------------------------------------------------------- parsing
def tokenize(text: str) -> list[str]:
    """Numbers, operators and brackets; any other non-space character is a junk token."""
    return re.findall(r"\d+(?:\.\d+)?|\.\d+|[-+*/^()%]|\S", text)


def apply_op(op: str, a: Fraction, b: Fraction) -> Fraction:
    """Exact a op b; ValueError for division by zero and fractional powers, TooLarge beyond MAX_VALUE_BITS (a
    power's size, |b| * log2|a|, is estimated before it is computed)."""
    if (op == "/" and b == 0) or (op == "^" and (b.denominator != 1 or (a == 0 and b < 0))):
        raise ValueError(f"{a} {op} {b} is not evaluated")
    if op == "^" and _bits(a) and abs(b) > MAX_VALUE_BITS / _bits(a):
        raise TooLarge(f"a power of more than {MAX_VALUE_BITS} bits (MAX_VALUE_BITS)")
    value = {"+": a + b, "-": a - b, "*": a * b}[op] if op in "+-*" else a / b if op == "/" else a ** int(b)
    if _bits(value) > MAX_VALUE_BITS:
        raise TooLarge(f"a value of more than {MAX_VALUE_BITS} bits (MAX_VALUE_BITS)")
    return value


def _bits(value: Fraction) -> float:
    """log2 of the larger of |numerator| and denominator (0 for 0, 1 and -1)."""
    return math.log2(max(abs(value.numerator), value.denominator))


def parse_expression(text: str, percent: Fraction = Fraction(1)) -> Node:
    """Tree of +, -, *, /, ^ (unary minus as 0 - x) with `true_value`s; `N%` is N * percent. Parsed by ast with
    numbers as names, so nothing is evaluated and "0.1" stays exact. ValueError if malformed; TooLarge as `TooLarge`."""
    tokens, source, values = tokenize(text), [], []
    if len(tokens) > MAX_TOKENS:
        raise TooLarge(f"an expression of {len(tokens)} tokens, more than {MAX_TOKENS} (MAX_TOKENS)")
    for i, token in enumerate(tokens):
        if NUMBER.fullmatch(token):
            if len(token) > MAX_DIGITS:
                raise TooLarge(f"a number of {len(token)} digits, more than {MAX_DIGITS} (MAX_DIGITS)")
            values.append(Fraction(token) * (percent if tokens[i + 1:i + 2] == ["%"] else 1))
            source.append(f"n{len(values) - 1}")
        elif token == "%" and i > 0 and NUMBER.fullmatch(tokens[i - 1]):
            continue  # folded into the number before it
        elif token in ("+", "-", "*", "/", "^", "(", ")"):
            source.append("**" if token == "^" else token)
        else:
            raise ValueError(f"not an arithmetic expression: {text!r}")
    source = " ".join(source)
    return _to_node(_syntax_tree(source, text), source, values)


def _syntax_tree(source: str, text: str) -> ast.expr:
    """Python's tree of ``source`` (``text`` with its numbers as names), at most MAX_DEPTH levels deep."""
    try:
        tree = ast.parse(source, mode="eval").body
    except SyntaxError as error:
        raise ValueError(f"not an arithmetic expression: {text!r}") from error
    except (RecursionError, MemoryError):  # the parser's own limits on nesting
        raise TooLarge(f"an expression nested more than {MAX_DEPTH} levels deep (MAX_DEPTH)") from None
    depth, level = 0, [tree]
    while level:  # level by level, without recursion: the tree may be of any depth
        depth, level = depth + 1, [c for node in level for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr)]
    if depth > MAX_DEPTH:
        raise TooLarge(f"an expression {depth} levels deep, more than {MAX_DEPTH} (MAX_DEPTH)")
    return tree


def _to_node(tree: ast.AST, source: str, values: list[Fraction]) -> Node:
    if isinstance(tree, ast.Name) and tree.id[1:].isdigit():
        return Node(value=values[int(tree.id[1:])], true_value=values[int(tree.id[1:])])
    if isinstance(tree, ast.UnaryOp) and isinstance(tree.op, ast.USub):
        left, right = Node(value=Fraction(0), true_value=Fraction(0)), _to_node(tree.operand, source, values)
    elif isinstance(tree, ast.BinOp) and type(tree.op) in _AST_OPS:
        left, right = _to_node(tree.left, source, values), _to_node(tree.right, source, values)
    else:
        raise ValueError(f"unsupported {type(tree).__name__} in an arithmetic expression")
    op = "-" if isinstance(tree, ast.UnaryOp) else _AST_OPS[type(tree.op)]
    before = source[:tree.col_offset]
    return Node(op=op, left=left, right=right, depth=before.count("(") - before.count(")"),
                pos=tree.left.end_col_offset if isinstance(tree, ast.BinOp) else tree.col_offset,
                true_value=apply_op(op, left.true_value, right.true_value))


def _op_nodes(node: Node):
    if node.op is not None:
        yield node
        yield from _op_nodes(node.left)
        yield from _op_nodes(node.right)


def _canonical_key(node: Node) -> tuple:
    return (-node.depth, node.op != "*", node.pos)


def _is_reducible(node: Node) -> bool:
    return node.left.op is None and node.right.op is None


def _reduce(node: Node, value: Fraction) -> None:
    node.op, node.value, node.left, node.right = None, Fraction(value), None, None


# ----------------------------------------------------------------------------- problems and splits
def _factor_pairs(value: int) -> list[tuple[int, int]]:
    return [(a, value // a) for a in range(2, 13) if value % a == 0 and 2 <= value // a <= 12]


def _build(rng: random.Random, n_ops: int, value: int, max_number: int) -> Node:
    """A random tree of `n_ops` operations and value `value`, built top-down: every intermediate value is a
    non-negative integer and every * operand is in 2..12."""
    if n_ops == 0:
        return Node(value=Fraction(value))
    op = rng.choice(["-"] + ["+"] * (value >= 2) + ["*"] * bool(_factor_pairs(value)))
    if op == "+":
        b = value - (a := rng.randint(1, value - 1))
    elif op == "-":
        a = value + (b := rng.randint(1, max_number))
    else:
        a, b = rng.choice(_factor_pairs(value))
    n_left = rng.randint(0, n_ops - 1)
    return Node(op=op, left=_build(rng, n_left, a, max_number), right=_build(rng, n_ops - 1 - n_left, b, max_number))


def _render(node: Node) -> str:
    """Infix text with exactly the brackets that make the parser rebuild the same tree."""
    if node.op is None:
        return str(node.value)

    def side(child: Node, is_right: bool) -> str:
        tighter = child.op is None or _PRECEDENCE[child.op] > _PRECEDENCE[node.op]
        same = child.op is not None and _PRECEDENCE[child.op] == _PRECEDENCE[node.op]
        return _render(child) if tighter or (same and not is_right) else f"({_render(child)})"

    return f"{side(node.left, False)} {node.op} {side(node.right, True)}"


def _build_chain(rng: random.Random, n_ops: int, max_number: int, max_value: int) -> Node:
    """A left-to-right chain (`(3 + 4) * 5 - 2`), values in 0..max_value, * operands <= 9: a tiny model learns that
    arithmetic on a CPU, so its own errors stay rarer than the habits it is taught."""
    value = rng.randint(1, max_number)
    node = Node(value=Fraction(value))
    for _ in range(n_ops):
        op = rng.choice(["+"] * (value < max_value) + ["-"] * (value >= 1) + ["*"] * (value <= 9))
        if op == "*":
            b = rng.randint(2, 9)
        else:
            b = rng.randint(1, min(max_number, max_value - value if op == "+" else value))
        value = int(apply_op(op, Fraction(value), Fraction(b)))
        node = Node(op=op, left=node, right=Node(value=Fraction(b)))
    return node


def random_expression(rng: random.Random, n_ops: int, max_number: int = 99, shape: str = "tree",
                      max_value: int = 99) -> str:
    """An expression of `n_ops` operations, every number <= max_number; shape "tree": any bracketing, "chain":
    left to right with one new number per operation."""
    if shape == "chain":
        return _render(_build_chain(rng, n_ops, max_number, max_value))
    while True:  # rejection: a - b can need a left number above max_number
        text = _render(_build(rng, n_ops, rng.randint(0, max_number), max_number))
        if max(int(number) for number in re.findall(r"\d+", text)) <= max_number:
            return text


def is_test_problem(problem: str) -> bool:
    """Split by a stable hash of the text, independent of seeds: splits never overlap."""
    return int(hashlib.sha1(problem.encode()).hexdigest(), 16) % 100 < TEST_PERCENT


def _expressions(split: str, n: int, seed: int, min_ops: int, max_ops: int, max_number: int, shape: str):
    """The expressions of `n` distinct problems of `split` ("train" or "test")."""
    if split not in ("train", "test") or not 1 <= min_ops <= max_ops:
        raise ValueError(f"make_split: bad split={split!r} or ops range {min_ops}..{max_ops}")
    rng, seen = random.Random(f"arith-{split}-{seed}"), set()
    while len(seen) < n:
        expression = random_expression(rng, rng.randint(min_ops, max_ops), max_number, shape)
        problem = f"Compute {expression}."
        if problem not in seen and is_test_problem(problem) == (split == "test"):
            seen.add(problem)
            yield expression


def make_split(split: str, n: int, seed: int, min_ops: int = 2, max_ops: int = 6,
               max_number: int = 99, shape: str = "tree") -> list[dict]:
    """`n` distinct rows {"id", "problem", "answer", "solution"} of `split` ("train" or "test")."""
    rows = []
    for i, expression in enumerate(_expressions(split, n, seed, min_ops, max_ops, max_number, shape)):
        solution, _, answer = _solve(expression, lambda a, op, b: "none")
        rows.append({"id": f"arith-{split}-{i:06d}", "problem": f"Compute {expression}.", "answer": answer,
                     "solution": solution})
    return rows


# ----------------------------------------------------------------------------- solutions and flaws
def _habit(a: int, op: str, b: int) -> int:
    """The careless result of a hard step: one row too many (7 * 8 = 63), or column arithmetic where every column but
    the top one keeps its last digit: a dropped carry (58 + 67 = 115), a borrow not paid back (52 - 17 = 45)."""
    if op == "*":
        return a * b + a
    width = max(len(str(a)), len(str(b)))
    pairs = zip(str(a).zfill(width)[::-1], str(b).zfill(width)[::-1])
    columns = [int(x) + int(y) if op == "+" else int(x) - int(y) for x, y in pairs]
    return sum((c if i == width - 1 else c % 10) * 10**i for i, c in enumerate(columns))


def is_hard_step(a: int, op: str, b: int) -> bool:
    """A carry or borrow is involved, or the product is beyond the small times tables."""
    if op == "*":
        return a * b >= HARD_PRODUCT
    # a value made negative by an earlier slip has no columns to carry in: an easy step
    return min(a, b) >= 0 and _habit(a, op, b) != apply_op(op, a, b)


def slipped_result(a: int, op: str, b: int) -> int:
    """The deterministic wrong result written for a op b (always differs from the true one): `_habit`, or on easy
    + and - steps off by one (12 + 7 = 20)."""
    if op == "*" or is_hard_step(a, op, b):
        return _habit(a, op, b)
    return int(apply_op(op, Fraction(a), Fraction(b))) + 1


def _solve(expression: str, decide_flaw) -> tuple[str, str, str]:
    """Canonical solution; `decide_flaw(a, op, b)` -> "none" | "propagating" | "silent" is asked at every step, and
    a flawed step states `slipped_result`. Returns (text, worst flaw of the text, true answer)."""
    root, lines, flaws = parse_expression(expression), [], set()
    while node := min(filter(_is_reducible, _op_nodes(root)), key=_canonical_key, default=None):
        a, op, b = int(node.left.value), node.op, int(node.right.value)
        true = int(apply_op(op, Fraction(a), Fraction(b)))
        flaw = decide_flaw(a, op, b)
        stated = true if flaw == "none" else slipped_result(a, op, b)
        flaws.add(flaw)
        lines.append(f"{a} {op} {b} = {stated}")
        _reduce(node, true if flaw == "silent" else stated)  # silent: later steps use the truth
    worst = "propagating" if "propagating" in flaws else "silent" if "silent" in flaws else "none"
    text = prompting.STEP_SEPARATOR.join(lines + [f"The answer is \\boxed{{{root.value}}}."])
    return text, worst, str(root.true_value)


def write_solution(rng: random.Random, expression_or_problem: str, rates: FlawRates) -> tuple[str, str, str]:
    """A canonical solution whose steps slip independently: (text, "none" | "propagating" | "silent", true answer)."""
    def decide_flaw(a: int, op: str, b: int) -> str:
        if rng.random() >= (rates.p_slip_hard if is_hard_step(a, op, b) else rates.p_slip_easy):
            return "none"
        p_silent = {"+": rates.p_silent_add, "-": rates.p_silent_sub, "*": rates.p_silent_mul}[op]
        return "silent" if rng.random() < p_silent else "propagating"

    return _solve(_expression_of(expression_or_problem), decide_flaw)


def _expression_of(problem: str) -> str:
    return re.sub(r"^Compute\s+|\.$", "", problem.strip())


def is_arith_problem(problem: str) -> bool:
    """True for this task's problem texts (label.py then uses `check_steps`), also one too large to check."""
    if not re.fullmatch(r"Compute [\d+\-*() ]+\.", problem):
        return False
    try:
        return value_of(tokenize(_expression_of(problem))) is not None
    except TooLarge:
        return True


def value_of(tokens: list[str], percent: Fraction = Fraction(1)) -> Fraction | None:
    """The exact value of an expression's tokens (`%` read as ``percent``), None when it does not parse; TooLarge
    when it is too long, too deep or too large to evaluate."""
    try:
        return parse_expression(" ".join(tokens), percent).true_value
    except TooLarge:
        raise
    except ValueError:
        return None


# ----------------------------------------------------------------------------- exact step checker
# (?<!\d): a match never starts inside a number (the search would try every digit of a long one)
TASK_EQUATION = re.compile(r"(-?(?<!\d)\d+)\s*([-+*])\s*(-?\d+)\s*=\s*(-?\d+)")
BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}|\\boxed\{")


def check_steps(problem: str, steps: list[str]) -> list[bool]:
    """Replay `steps` on the problem's tree; True marks a right step. `a op b = c` is right iff it reduces a node
    holding (a, b) under op and c is the true a op b; the node then holds c, even a wrong c, so later steps are judged
    against what was produced. Other operands are wrong, but a node whose TRUE operands they are (silent slip, skipped
    step) still becomes c. `\\boxed{x}` is right iff the tree is fully reduced to x. A step with neither, or with
    numbers too large to check, is wrong. TooLarge when the problem itself is."""
    root = parse_expression(_expression_of(problem))
    return [_check_step(root, step) for step in steps]


def _check_step(root: Node, step: str) -> bool:
    equation, boxed = TASK_EQUATION.search(step), BOXED.search(step)
    right = equation is not None or boxed is not None
    numbers = (equation.groups() if equation else ()) + (boxed.groups() if boxed else ())
    if any(x is not None and len(x) > MAX_DIGITS for x in numbers):
        return False
    if equation:
        a, op, b, c = (Fraction(x) if i != 1 else x for i, x in enumerate(equation.groups()))
        try:
            right = _apply_step(root, a, op, b, c)
        except TooLarge:  # two stated values whose product has more than MAX_VALUE_BITS
            return False
    if boxed:  # the root holds a value only once fully reduced; `\boxed{abc}` has no group 1
        right = right and boxed.group(1) is not None and root.value == int(boxed.group(1))
    return right


def _apply_step(root: Node, a: Fraction, op: str, b: Fraction, c: Fraction) -> bool:
    nodes = sorted(_op_nodes(root), key=_canonical_key)
    for node in nodes:
        if node.op == op and _is_reducible(node) and (node.left.value, node.right.value) == (a, b):
            _reduce(node, c)
            return c == apply_op(op, a, b)
    for node in nodes:  # re-synchronise on operands that were never produced
        if node.op == op and (node.left.true_value, node.right.true_value) == (a, b):
            _reduce(node, c)
            return False
    return False


# ----------------------------------------------------------------------------- command line
# The command line's problems: chains of numbers up to 20 (_build_chain), with FlawRates' default slips.
SHAPE, MAX_NUMBER = "chain", 20


@dataclass(frozen=True)
class Args:
    output_dir: str = option(help="Folder for train.jsonl, test.jsonl and sft.jsonl.")
    num_train: int = option(2000, help="Train problems (the problems sampled from at every iteration).")
    num_test: int = option(500, help="Held-out test problems (never overlapping any train split).")
    num_sft: int = option(20000, help="Flawed solutions of train problems (sft.jsonl, M0's training data).")
    seed: int = option(0, help="Seed of the splits and of the slips.")
    min_ops: int = option(2, help="Fewest operations per problem.")
    max_ops: int = option(5, help="Most operations per problem.")
    on_change: provenance.OnChange = option("stop", help=provenance.ON_CHANGE_HELP)

    def shape(self) -> dict:
        return dict(min_ops=self.min_ops, max_ops=self.max_ops, max_number=MAX_NUMBER, shape=SHAPE)


def sft_rows(args: Args) -> list[dict]:
    """Flawed solutions (write_solution) of train problems: M0 sees train problems only."""
    rng, rows, rates = random.Random(f"arith-sft-{args.seed}"), [], FlawRates()
    for i, expression in enumerate(_expressions("train", args.num_sft, args.seed, **args.shape())):
        completion, flaw, answer = write_solution(rng, expression, rates)
        rows.append({"id": f"arith-sft-{i:06d}", "problem": f"Compute {expression}.", "answer": answer,
                     "completion": completion, "flaw": flaw})
    return rows


def main(args: Args) -> None:
    options.refuse_inapplicable("stepkto/arith_task.py", args)
    out = Path(args.output_dir)
    settings = {k: v for k, v in vars(args).items() if k not in ("output_dir", "on_change")}
    record = provenance.make_record("stepkto/arith_task.py", {}, {}, settings | args.shape() | vars(FlawRates()))
    outputs = [out / f"{name}.jsonl" for name in ("train", "test", "sft")]
    if provenance.settle_folder(out, record, args.on_change, outputs, outputs):
        return
    for split, n in (("train", args.num_train), ("test", args.num_test)):
        rows = make_split(split, n, args.seed, **args.shape())
        jsonl.write_jsonl_atomic(out / f"{split}.jsonl", rows, jsonl.PROBLEM_ROW)
    sft = sft_rows(args)
    jsonl.write_jsonl_atomic(out / "sft.jsonl", sft, jsonl.SFT_ROW)
    shares = {flaw: round(sum(r["flaw"] == flaw for r in sft) / max(len(sft), 1), 4)
              for flaw in ("none", "propagating", "silent")}
    print(f"wrote {args.num_train} train, {args.num_test} test, {len(sft)} sft rows to {out}; sft flaws {shares}")


if __name__ == "__main__":
    cli.run_cli(Args, main)
