"""Final-answer grading and benchmark loading for the real-model path.

Step-KTO's outcome label, "does the last \\boxed{} equal the gold answer?", is decided by math-verify on both sides
boxed ("25" == "025", "\\frac{1}{2}" == "0.5"). Its timeout needs SIGALRM (main thread only) and ``9^{9^{9^9}}`` makes
sympy compute forever, so each comparison runs in a worker PROCESS (``python -m stepkto.grading``) under a deadline
the parent enforces without signals: a late worker is killed, its item graded wrong. See bench/notes/grading.md.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import NamedTuple

from stepkto import jsonl

_BOX = re.compile(r"(?:\\boxed|\\fbox)(\s*\{)?")  # a box command, and its opening brace when it has one


def extract_boxed(text: str) -> str | None:
    """Content of the LAST \\boxed{...}/\\fbox{...} (nested braces matched, ``\\{`` literal); None without one or if it
    never closes (a truncated generation gave no answer)."""
    boxes = list(_BOX.finditer(text))
    return _box_content(text, boxes[-1]) if boxes else None


def all_boxed(text: str) -> list[str | None]:
    """The content of every box in ``text``, in order (None for one never closed); see extract_boxed."""
    return [_box_content(text, box) for box in _BOX.finditer(text)]


def _box_content(text: str, box: re.Match) -> str | None:
    if box.group(1) is None:
        return None
    depth, i = 1, box.end()
    while i < len(text):
        if text[i] == "\\":
            i += 2  # skip the escaped character: \{ and \} do not open or close a group
            continue
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[box.end() : i]
        i += 1
    return None


def _as_boxed_latex(answer: str | None) -> str | None:
    """``answer`` (bare, ``$...$`` or a text ending in a \\boxed{}) as one ``\\boxed{...}``; None for none or empty."""
    if answer is None:
        return None
    if not isinstance(answer, str):
        raise TypeError(f"answers must be strings or None, got {type(answer).__name__}: {answer!r}")
    boxed = extract_boxed(answer)
    inner = (boxed if boxed is not None else answer).strip()
    if len(inner) >= 2 and inner.startswith("$") and inner.endswith("$"):
        inner = inner.strip("$").strip()
    return "\\boxed{" + inner + "}" if inner else None


_WORKER_START_TIMEOUT_S = 60.0  # far above python + sympy + math-verify's import time (bench/notes/grading.md): a hang


class _Worker:
    """One grading process: reads JSON ``[gold, pred]`` lines, answers ``1``/``0`` per line."""

    def __init__(self):
        path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "stepkto.grading"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": path})
        self.ready = False  # becomes True when the worker has imported math-verify
        self.item: int | None = None  # index of the pair being graded
        self.deadline = time.monotonic() + _WORKER_START_TIMEOUT_S

    def send(self, item: int, pair: tuple[str, str], timeout_s: float) -> None:
        self.item, self.deadline = item, time.monotonic() + timeout_s
        try:
            self.proc.stdin.write(json.dumps(pair).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the worker died: its stdout reads EOF, which grades the item wrong and restarts it

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


def _collect(worker: _Worker, verdicts: list[bool]) -> _Worker:
    """Read ``worker``'s reply into ``verdicts``; return the worker to use next (new if it died)."""
    line = worker.proc.stdout.readline()
    if not line.endswith(b"\n"):  # EOF: the process died (a crash grades its item wrong)
        if not worker.ready:
            raise RuntimeError(f"grading worker '{sys.executable} -m stepkto.grading' exited while starting; is "
                               "math-verify installed in this environment? Its traceback is on stderr above.")
        worker.close()
        return _Worker()
    if line == b"ready\n":
        worker.ready = True
    else:
        verdicts[worker.item] = line == b"1\n"
        worker.item = None
    return worker


def _grade_pairs(pairs: list[tuple[str, str]], timeout_s: float, num_workers: int | None) -> list[bool]:
    """math_verify.verify(gold, pred) for each pair, in parallel processes, each within ``timeout_s``."""
    verdicts = [False] * len(pairs)
    todo = deque(range(len(pairs)))
    num_workers = min(num_workers or len(os.sched_getaffinity(0)), len(pairs))
    workers = [_Worker() for _ in range(num_workers)]
    timed_out = 0
    try:
        while todo or any(w.item is not None for w in workers):
            for w in workers:
                if w.ready and w.item is None and todo:
                    item = todo.popleft()
                    w.send(item, pairs[item], timeout_s)
            waiting = [w for w in workers if not w.ready or w.item is not None]
            wait_s = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            readable, _, _ = select.select([w.proc.stdout for w in waiting], [], [], wait_s)
            for k, w in enumerate(workers):
                if w.proc.stdout in readable:
                    workers[k] = _collect(w, verdicts)
                elif w in waiting and time.monotonic() >= w.deadline:
                    if not w.ready:
                        raise RuntimeError(f"grading worker did not start within {_WORKER_START_TIMEOUT_S} s")
                    timed_out += 1  # a pathological answer: kill the worker, its item stays False
                    w.close()
                    workers[k] = _Worker()
    finally:
        for w in workers:
            w.close()
    if timed_out:
        print(f"[grading] {timed_out} answer(s) took over {timeout_s} s and were graded wrong", file=sys.stderr)
    return verdicts


def _serve_grading_requests() -> None:
    """Worker loop, run as ``python -m stepkto.grading``: one JSON [gold, pred] per stdin line -> 1 or 0."""
    import ctypes
    import logging
    import signal

    from math_verify import parse, verify

    # never outlive a parent killed by SIGKILL (spinning on a hung answer), nor print a traceback on Ctrl-C
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # math-verify warns that its own timeout is off; the parent process enforces the deadline
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # a stray print (from sympy, say) goes to stderr instead of corrupting the replies

    def equivalent(gold: str, pred: str) -> bool:
        try:
            return verify(parse(gold, parsing_timeout=None), parse(pred, parsing_timeout=None), timeout_seconds=None)
        except Exception:
            return False

    equivalent("\\boxed{1}", "\\boxed{1}")  # load the LaTeX parser before the first deadline starts
    replies.write("ready\n")
    replies.flush()
    for line in sys.stdin:
        gold, pred = json.loads(line)
        replies.write("1\n" if equivalent(gold, pred) else "0\n")
        replies.flush()


def grade_answers(golds: list[str], preds: list[str | None], timeout_s: float = 5.0,
                  num_workers: int | None = None) -> list[bool]:
    """math_verify.verify(golds[i], preds[i]); a pred may be bare, ``$...$`` or boxed last; None or empty is wrong.
    Each distinct pair is graded once in ``num_workers`` processes (default: per CPU), wrong past ``timeout_s``."""
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold answers but {len(preds)} predictions")
    pairs = [(_as_boxed_latex(gold), _as_boxed_latex(pred)) for gold, pred in zip(golds, preds)]
    distinct = list(dict.fromkeys(pair for pair in pairs if None not in pair))
    verdict = dict(zip(distinct, _grade_pairs(distinct, timeout_s, num_workers))) if distinct else {}
    return [None not in pair and verdict[pair] for pair in pairs]


def group_equivalent_many(answer_lists: list[list[str | None]], timeout_s: float = 5.0,
                          num_workers: int | None = None) -> list[list[int]]:
    """Class ids of each list's answers (Maj@K by grading equivalence), all graded in one pool: an answer joins the
    first earlier class whose first member grades equal to it (as gold), else opens the next class; None gets -1."""
    distinct_lists = [list(dict.fromkeys(a for a in answers if a is not None)) for answers in answer_lists]
    pairs = [(d[i], d[j]) for d in distinct_lists for i in range(len(d)) for j in range(i + 1, len(d))]
    verdicts = grade_answers([g for g, _ in pairs], [p for _, p in pairs], timeout_s, num_workers)
    equal = dict(zip(pairs, verdicts))
    classes = []
    for answers, distinct in zip(answer_lists, distinct_lists):
        class_of: dict[str, int] = {}
        representatives: list[str] = []  # first member of each class: a class id is its index here
        for answer in distinct:
            new = len(representatives)
            class_of[answer] = next((c for c, r in enumerate(representatives) if equal[(r, answer)]), new)
            if class_of[answer] == new:
                representatives.append(answer)
        classes.append([class_of[a] if a is not None else -1 for a in answers])
    return classes


def majority_answers(answer_lists: list[list[str | None]], timeout_s: float = 5.0,
                     num_workers: int | None = None) -> list[str | None]:
    """The Maj@K vote of each list, all graded in one pool: the first-seen member of its largest equivalence class
    (a tie: the class that appeared first); None for a list without answers."""
    majorities = []
    for answers, classes in zip(answer_lists, group_equivalent_many(answer_lists, timeout_s, num_workers)):
        votes = Counter(c for c in classes if c >= 0)  # a tie goes to the class seen first: the smallest id
        majorities.append(answers[classes.index(max(votes, key=lambda c: (votes[c], -c)))] if votes else None)
    return majorities


ANSWER_FIELD = "answer"  # its 'answer' field; a row without one may give it as its solution's last \boxed{}
SOLUTION_BOX = "solution_box"  # only its solution's last \boxed{}: sets published without an answer field


class Benchmark(NamedTuple):
    """A named problem set: where its rows are (a local file, else the hub) and where its gold answer is."""

    local_file: str  # file name in the data dir (read offline)
    hub_id: str  # used when the local file is absent
    hub_config: str | None
    split: str
    gold: str = ANSWER_FIELD  # ANSWER_FIELD | SOLUTION_BOX


BENCHMARKS = {
    "math500": Benchmark("math500.jsonl", "HuggingFaceH4/MATH-500", None, "test"),
    "amc23": Benchmark("amc23.jsonl", "math-ai/amc23", None, "test"),
    "aime24": Benchmark("aime24.jsonl", "HuggingFaceH4/aime_2024", None, "train"),
    # GSM8K as published: the answer field is the worked solution ending in "#### N" (see normalise_problem)
    "gsm8k": Benchmark("gsm8k_test.jsonl", "openai/gsm8k", "main", "test"),
    "gsm8k_train": Benchmark("gsm8k_train.jsonl", "openai/gsm8k", "main", "train"),
    # training sets with a reference solution (what the judge sees) and no answer field: rows whose solution has no
    # \boxed{} answer cannot be graded and are dropped; the local files are the hub rows as JSONL
    "math_train": Benchmark("math_train.jsonl", "DigitalLearningGmbH/MATH-lighteval", "default", "train", SOLUTION_BOX),
    "numina_cot": Benchmark("numina_cot.jsonl", "AI-MO/NuminaMath-CoT", None, "train", SOLUTION_BOX),
}


def default_data_dir() -> Path:
    return Path(os.environ.get("STEPKTO_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")


def normalise_answer(value, where: str) -> str:
    """Gold answer as a string: AMC23's 27.0 -> "27", AIME's "025" -> "25", LaTeX left as is."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: field 'answer' must be a string or a number, got {type(value).__name__}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if re.fullmatch(r"-?\d+", text):
        text = str(int(text))  # strip zero padding
    if not text:
        raise ValueError(f"{where}: field 'answer' is empty")
    return text


def normalise_problem(raw, where: str, default_id: str, gold: str = ANSWER_FIELD) -> dict | None:
    """One benchmark row -> {"id", "problem", "answer"(, "solution")}; gold is 'answer' (not for SOLUTION_BOX), else
    the solution's last \\boxed{}; None for an ungradable SOLUTION_BOX row without one. ``where``: file and line."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    key = "problem" if "problem" in raw else "question"
    if not isinstance(raw.get(key), str) or not raw[key].strip():
        got = repr(raw.get(key))[:40]
        raise ValueError(f"{where}: field 'problem' (or 'question') must be a non-empty string, got {got}")
    solution = raw.get("solution")
    if solution is not None and not isinstance(solution, str):
        raise ValueError(f"{where}: field 'solution' must be a string, got {type(solution).__name__}")
    row = {"id": str(raw.get("id", raw.get("unique_id", default_id))), "problem": raw[key]}
    if gold == ANSWER_FIELD and "answer" in raw:
        answer = raw["answer"]
        if solution is None and isinstance(answer, str) and "####" in answer:
            worked, answer = answer.rsplit("####", 1)  # GSM8K: "<one step per line>\n#### 1,234"
            row["answer"] = normalise_answer(answer.replace(",", ""), where)
            row["solution"] = gsm8k_reference_solution(worked, row["answer"])
            return row
    else:
        answer = extract_boxed(solution or "") or ""
        if not answer.strip():  # an empty box gives no answer to grade against
            if gold == ANSWER_FIELD:
                raise ValueError(f"{where}: missing field 'answer' (and no \\boxed{{}} answer in field 'solution')")
            return None
    row["answer"] = normalise_answer(answer, where)
    if solution is not None:
        row["solution"] = solution.strip()
    return row


_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


def gsm8k_reference_solution(worked: str, answer: str) -> str:
    """A GSM8K worked solution (text before ``####``) in step format: each non-empty line a step, minus ``<<48/2=24>>``
    calculator annotations, joined by prompting.STEP_SEPARATOR, last step "The answer is \\boxed{answer}."."""
    lines = (_CALCULATOR_ANNOTATION.sub("", line).strip() for line in worked.split("\n"))
    return "\n\n".join([line for line in lines if line] + [f"The answer is \\boxed{{{answer}}}."])


def _normalise_rows(located_rows, source: str, gold: str = ANSWER_FIELD, name: str | None = None) -> list[dict]:
    """The rows of ``located_rows`` ((where, default_id, raw row) each; ids unique), less the ungradable ones (one
    printed line counts them); ValueError when no row is left."""
    rows, seen, dropped = [], set(), 0
    for where, default_id, raw in located_rows:
        row = normalise_problem(raw, where, default_id, gold)
        if row is None:
            dropped += 1
            continue
        if row["id"] in seen:
            raise ValueError(f"{where}: field 'id': duplicate id {row['id']!r}")
        seen.add(row["id"])
        rows.append(row)
    label, total = name or source, len(rows) + dropped
    if dropped and not rows:
        raise ValueError(f"{label}: none of the {total:,} rows of {source} has a final \\boxed{{}} answer in its "
                         "solution, so none can be graded")
    if dropped:
        print(f"{label}: dropped {dropped:,} of {total:,} rows without a final \\boxed{{}} answer in their solution",
              file=sys.stderr, flush=True)
    if not rows:
        raise ValueError(f"{source}: no rows (empty file?)")
    return rows


def _jsonl_rows(path: Path):
    for lineno, raw in jsonl.iter_jsonl(path):
        yield f"{path}:{lineno}", f"{path.stem}-{lineno}", raw


_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _load_from_hub(name: str, benchmark: Benchmark, split: str, local: Path):
    """``datasets.load_dataset`` of the benchmark, or ONE ValueError line saying where it looked."""
    offline = [v for v in _OFFLINE_VARIABLES if os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"}]
    try:
        import datasets  # lazily: only users without the local files need it

        # set after datasets' import (where it reads them), they would not stop its retries: the hub is not tried
        if offline and not datasets.config.HF_HUB_OFFLINE:
            raise ConnectionError(f"{offline[0]} is set (after datasets was imported), so the hub was not tried")
        return datasets.load_dataset(benchmark.hub_id, benchmark.hub_config, split=split)
    except Exception as e:  # offline, no such dataset, no datasets package: all end the same way
        config = f"config {benchmark.hub_config}, " if benchmark.hub_config else ""
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"benchmark {name!r} not found: no file {local}, and the hub dataset {benchmark.hub_id} "
                         f"({config}split {split}) did not load: {type(e).__name__}: {first_line}") from None


def _hub_rows(benchmark: Benchmark, split: str, dataset):
    # the local file's ids (line numbers) when the rows are the local file's: an id does not depend on the source
    for index, raw in enumerate(dataset):
        same_rows = split == benchmark.split
        default_id = f"{Path(benchmark.local_file).stem}-{index + 1}" if same_rows else f"{benchmark.hub_id}-{index}"
        yield f"{benchmark.hub_id}[{split}] row {index}", default_id, dict(raw)


def load_benchmark(name_or_path: str, split: str | None = None, data_dir: str | Path | None = None) -> list[dict]:
    """Rows {"id", "problem", "answer"(, "solution")} of a BENCHMARKS name, from ``data_dir`` if its file is there, else
    the hub (``split`` overrides its split); or of a JSONL file with problem (or question), answer (else the solution's
    last \\boxed{}), optional solution, id. ValueError (one line) when rows are missing or malformed."""
    if name_or_path in BENCHMARKS:
        benchmark = BENCHMARKS[name_or_path]
        local = Path(data_dir or default_data_dir()) / benchmark.local_file
        if not local.is_file():
            split = split or benchmark.split
            located = _hub_rows(benchmark, split, _load_from_hub(name_or_path, benchmark, split, local))
            return _normalise_rows(located, benchmark.hub_id, benchmark.gold, name_or_path)
        if split not in (None, benchmark.split):
            other = [n for n, b in BENCHMARKS.items() if b.hub_id == benchmark.hub_id and b.split == split]
            hint = f" (use {other[0]})" if other else ""
            raise ValueError(f"{local}: holds only the '{benchmark.split}' split of {name_or_path}, not '{split}'"
                             + hint)
        return _normalise_rows(_jsonl_rows(local), str(local), benchmark.gold, name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file, and not a benchmark name ({' | '.join(BENCHMARKS)})")
    if split is not None:
        raise ValueError(f"{path}: a JSONL file has no splits (got split={split!r})")
    return _normalise_rows(_jsonl_rows(path), str(path))


if __name__ == "__main__":
    _serve_grading_requests()
