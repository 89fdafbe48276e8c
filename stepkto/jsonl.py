"""The JSONL contract between the stages: the row schemas, reading them (a bad row raises DataError naming file,
line and field) and writing a file whole or not at all (``write_*_atomic``: a temporary file, then a rename).
How a stage writes, resumes and shards its output is sharding.py's. No torch here: grading.py's worker processes and
report.py import this module without waiting for it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


class StageError(Exception):
    """An error whose message says all there is to say: run_cli prints it as one line, without a traceback."""


class DataError(StageError, ValueError):
    """Bad input: the message names the file, the line and the field."""


# The rows of every file the stages pass to each other: {field: type or tuple of types} of the fields the readers
# rely on (a row may carry more), checked when written and when read. Ids are strings everywhere.
# stepkto/arith_task.py's train.jsonl / test.jsonl (+ "solution"); grading.load_benchmark gives other problems this form
PROBLEM_ROW = {"id": str, "problem": str, "answer": str}
# stepkto/arith_task.py's sft.jsonl -> train.py --objective sft (M0)
SFT_ROW = {"id": str, "problem": str, "completion": str}
# generate.py -> label.py: one sampled solution (+ "sample_index", "gen", and the token ids train.py prefers)
SAMPLE_ROW = {**PROBLEM_ROW, "problem_id": str, "prompt": str, "completion": str, "finish_reason": str}
# what train.py --objective kto reads: the outcome label (Section 2.1) of a completion
KTO_ROW = {"id": str, "prompt": str, "completion": str, "finish_reason": str, "outcome": bool}
# what train.py --objective step-kto reads: also one label per step (Section 2.1), TRL's stepwise-supervision fields
STEP_KTO_ROW = {**KTO_ROW, "completions": list, "labels": list}
# label.py -> train.py, evaluate.py: a sample row with its outcome and step labels (null: a step without a verdict)
LABELLED_ROW = {**SAMPLE_ROW, **STEP_KTO_ROW, "step_spans": list, "pred": (str, type(None)), "prm": str,
                "prm_failures": int, "prm_cutoffs": int}
# evaluate.py's result.json (Section 3 / Table 3: Pass@1 and the stepwise error rate; more keys with --sample_k)
RESULT = {"model": str, "benchmark": str, "prm": str, "n_problems": int, "pass@1": float, "pass@1_ci95": (list, tuple),
          "stepwise_error_rate": (float, type(None)), "stepwise_error_rate_ci95": (list, tuple), "n_correct": int,
          "n_correct_with_wrong_step": int, "truncated": int}
# stepkto/report.py's RUNS/seed<S>/<objective>/results.jsonl: one row per evaluated model M<iteration> of a run
RESULTS_TABLE_ROW = {"name": str, "iteration": int, "objective": str, "seed": int, **RESULT}


def _check_row(row, schema: dict, where: str):
    """``row``, once it is an object carrying ``schema``; DataError naming ``where`` and the field if not."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field_name, types in schema.items():
        if field_name not in row:
            raise DataError(f"{where}: missing field '{field_name}'")
        value, types = row[field_name], types if isinstance(types, tuple) else (types,)
        # bool is a subclass of int in Python: a label `true` must not pass as a count
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = "/".join(t.__name__ for t in types)
            raise DataError(f"{where}: field '{field_name}' must be {want}, got {type(value).__name__}")
    return row


def jsonl_lines(text: str, keepends: bool = False) -> list[str]:
    """The lines of JSONL text, split on "\\n" only: rows written with ensure_ascii=False hold U+2028, U+2029 and
    U+0085 raw, on which str.splitlines also splits."""
    lines = text.split("\n")
    tail = lines.pop()  # what follows the last "\n": a line without its end, or nothing
    if keepends:
        lines = [line + "\n" for line in lines]
    return lines + [tail] if tail else lines


def _decoded(data: bytes, path: Path, lineno: int = 1) -> str:
    """``data`` (from line ``lineno`` of ``path`` on) as UTF-8; DataError naming the line of a byte that is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno += data.count(b"\n", 0, e.start)
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise DataError(f"{path}:{lineno}: not UTF-8 (byte 0x{data[e.start]:02x} at column {column})") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line; DataError naming file and line on a bad one."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        for lineno, data in enumerate(f, start=1):
            line = _decoded(data, path, lineno)
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_jsonl(path: str | Path, schema: dict | None = None) -> list[dict]:
    """Read a JSONL file whose rows must carry ``schema`` = {field: type or tuple of types}."""
    return [row for _, row in read_numbered_jsonl(path, schema)]


def read_numbered_jsonl(path: str | Path, schema: dict | None = None) -> list[tuple[int, dict]]:
    """read_jsonl's rows with the file line of each, for errors found later that name file:line."""
    rows = [(lineno, _check_row(row, schema or {}, f"{path}:{lineno}")) for lineno, row in iter_jsonl(path)]
    if not rows:
        raise DataError(f"{path}: file is empty (no JSONL rows)")
    return rows


def read_json(path: str | Path, schema: dict | None = None):
    """Read a JSON file; with ``schema``, it must hold one object carrying it (result.json)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        value = json.loads(_decoded(path.read_bytes(), path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    return value if schema is None else _check_row(value, schema, str(path))


def read_complete_rows(path: str | Path) -> list[dict]:
    """The rows of a JSONL file that a kill -9 may have cut: those before the first line that does not parse (none
    when there is no file). Bytes that are not UTF-8 on a line that ends raise DataError."""
    rows, path = [], Path(path)
    if not path.exists():
        return rows
    with open(path, "rb") as f:
        for lineno, data in enumerate(f, start=1):
            try:
                rows.append(json.loads(_decoded(data, path, lineno)))
            except ValueError as e:  # invalid JSON, or a DataError for bytes that are not UTF-8
                if isinstance(e, DataError) and data.endswith(b"\n"):
                    raise
                break
    return rows


def _lines(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _write_lines(path: Path, rows: list[dict], mode: str) -> None:
    with open(path, mode, encoding="utf-8") as f:
        f.write(_lines(rows))
        f.flush()
        os.fsync(f.fileno())


def _check_rows(rows: list[dict], schema: dict | None, path: Path) -> None:
    for index, row in enumerate(rows, start=1):
        _check_row(row, schema or {}, f"{path}: row {index} to write")


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """The one way a whole file is written: ``write(f)`` fills this process's temporary file beside ``path``, which
    is flushed to disk and renamed to ``path``: a kill at any moment leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str | Path, obj, schema: dict | None = None) -> None:
    if schema is not None:
        _check_row(obj, schema, str(path))
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | Path, rows: list[dict], schema: dict | None = None) -> None:
    """A whole JSONL file at once (schema None: files no other stage reads, such as train.py's log)."""
    _check_rows(rows, schema, Path(path))
    write_text_atomic(path, _lines(rows))
