"""Final-answer grading and benchmark loading for the real-model path.

The outcome label of Step-KTO (paper §3.2: binary feedback on the final answer) is "does the last
\\boxed{} of a solution equal the gold answer?". Equality is decided by math-verify, wrapped so that
it can never hang:

* math-verify's own timeout uses SIGALRM, which only works in the main thread, and without it an
  answer such as ``9^{9^{9^9}}`` makes sympy compute forever. So every comparison runs in a pool of
  worker PROCESSES (``python grading.py`` is the worker) with a hard per-item deadline enforced by
  the parent: a worker past its deadline is killed and replaced, and its item is graded wrong.
  Nothing here uses signals, so grading works from any thread.
* Both sides are wrapped as ``\\boxed{...}`` before math-verify parses them, so the whole answer is
  read as one LaTeX expression: "25" == "025", "27" == "27.0", "\\frac{1}{2}" == "0.5" == "1/2".
  notes/grading.md lists what math-verify accepts and where it disagrees with MATH-500's answers.
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

# ----------------------------------------------------------------------------- answer extraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> str | None:
    """Content of the LAST \\boxed{...} or \\fbox{...} in ``text`` (nested braces matched).

    None when there is no box, or when the last box is never closed (a truncated generation has
    not given an answer, even if an earlier box exists). ``\\{`` and ``\\}`` are literal braces.
    """
    found = [(text.rfind(command), command) for command in _BOX_COMMANDS if command in text]
    if not found:
        return None
    position, command = max(found)
    start = position + len(command)
    while start < len(text) and text[start].isspace():
        start += 1
    if start >= len(text) or text[start] != "{":
        return None
    depth, i = 0, start
    while i < len(text):
        if text[i] == "\\":
            i += 2  # skip the escaped character: \{ and \} do not open or close a group
            continue
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1 : i]
        i += 1
    return None


def _as_boxed_latex(answer: str) -> str:
    """``answer`` (a bare answer, ``$...$`` or a text with a \\boxed{}) as one ``\\boxed{...}``."""
    if not isinstance(answer, str):
        raise TypeError(f"answers must be strings, got {type(answer).__name__}: {answer!r}")
    boxed = extract_boxed(answer)
    inner = (boxed if boxed is not None else answer).strip()
    if len(inner) >= 2 and inner.startswith("$") and inner.endswith("$"):
        inner = inner.strip("$").strip()
    return "\\boxed{" + inner + "}"


# ----------------------------------------------------------------------------- worker processes

_WORKER_START_TIMEOUT_S = 60.0  # python + sympy + math-verify import takes ~0.3 s; this is a hang


class _Worker:
    """One grading process: reads JSON ``[gold, pred]`` lines, answers ``1``/``0`` per line."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
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


def _handle_reply(worker: _Worker, verdicts: list[bool]) -> _Worker:
    """Read one line from ``worker``; return the worker to use from now on (a new one if it died)."""
    line = worker.proc.stdout.readline()
    if not line.endswith(b"\n"):  # EOF: the process died
        if not worker.ready:
            raise RuntimeError(
                f"grading worker '{sys.executable} {__file__}' exited while starting; is math-verify "
                "installed in this environment? Its traceback is on stderr above."
            )
        worker.close()
        return _Worker()
    if line == b"ready\n":
        worker.ready = True
    else:
        verdicts[worker.item] = line == b"1\n"
        worker.item = None
    return worker


def _grade_pairs(pairs: list[tuple[str, str]], timeout_s: float, num_workers: int | None) -> list[bool]:
    """math_verify.verify(gold, pred) for each (gold, pred), in parallel, each within ``timeout_s``."""
    verdicts = [False] * len(pairs)
    todo = deque(range(len(pairs)))
    num_workers = num_workers or len(os.sched_getaffinity(0))
    workers = [_Worker() for _ in range(min(num_workers, len(pairs)))]
    timed_out = 0
    try:
        while todo or any(w.item is not None for w in workers):
            for w in workers:
                if w.ready and w.item is None and todo:
                    item = todo.popleft()
                    w.send(item, pairs[item], timeout_s)
            wait_s = max(0.0, min(w.deadline for w in workers if not w.ready or w.item is not None) - time.monotonic())
            readable, _, _ = select.select([w.proc.stdout for w in workers], [], [], wait_s)
            for k, w in enumerate(workers):
                if w.proc.stdout in readable:
                    workers[k] = _handle_reply(w, verdicts)
                elif time.monotonic() >= w.deadline and (w.item is not None or not w.ready):
                    if not w.ready:
                        raise RuntimeError(f"grading worker did not start within {_WORKER_START_TIMEOUT_S} s")
                    timed_out += 1  # a pathological answer: kill the worker, the item stays False
                    w.close()
                    workers[k] = _Worker()
    finally:
        for w in workers:
            w.close()
    if timed_out:
        print(f"[grading] {timed_out} answer(s) hit the {timeout_s} s limit and were graded wrong", file=sys.stderr)
    return verdicts
