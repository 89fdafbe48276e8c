"""What every stepkto stage uses: the JSONL contract between the stages and its row schemas, crash-safe resumable
outputs and their data-parallel shards, seeds, the command-line options and entry, steps, prompts.

The JSONL contract between stages
---------------------------------
* A stage writes its output to ``OUT.partial`` a chunk at a time (one ``write`` + ``fsync`` per
  chunk) and renames it to ``OUT`` when every chunk is done. ``OUT`` existing means complete; a crash
  leaves only ``OUT.partial``, which the next run resumes from (``resume_rows``).
* Every row has a unique string ``id``. Chunks are fixed by the input order and the chunk size, and
  each chunk is seeded from the run seed and the chunk (``derived_seed``), so a resumed run writes
  exactly what an uninterrupted run with the same seed would have written.
* With ``--num_shards N`` a stage's chunks are split over N processes, whose parts the last one merges into
  ``OUT``, byte for byte what one process writes (``write_chunks``).
* Each file's rows follow one schema below (``PROBLEM_ROW`` ... ``RESULTS_TABLE_ROW``), checked on
  write and on read; a bad row raises ``DataError`` naming file, line and field.

No torch here: grading.py's worker processes and report.py import this module without waiting for it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import sys
import typing
import zlib
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, NamedTuple


# ----------------------------------------------------------------------------- JSONL contract


class StageError(Exception):
    """An error whose message says all there is to say: run_cli prints it as one line, without a traceback."""


class DataError(StageError, ValueError):
    """Bad input: the message names the file, the line and the field."""


class UsageError(StageError, ValueError):
    """Arguments that cannot work together; the message says which."""


# The rows of every file the stages pass to each other: {field: type or tuple of types} of the fields the
# readers rely on (a row may carry more). Checked when written (append_chunk, write_jsonl_atomic,
# write_json_atomic) and when read (read_jsonl, read_json). Ids are strings everywhere.
NONE = type(None)
# arith_task.py's train.jsonl / test.jsonl (+ "solution"); grading.load_benchmark gives other problem files this form
PROBLEM_ROW = {"id": str, "problem": str, "answer": str}
# arith_task.py's sft.jsonl -> train.py --objective sft (M0)
SFT_ROW = {"id": str, "problem": str, "completion": str}
# generate.py -> label.py: one sampled solution (+ "sample_index", "gen", and the token ids train.py prefers)
SAMPLE_ROW = {**PROBLEM_ROW, "problem_id": str, "prompt": str, "completion": str, "finish_reason": str}
# what train.py --objective kto reads: the outcome label (Section 2.1) of a completion
KTO_ROW = {"id": str, "prompt": str, "completion": str, "finish_reason": str, "outcome": bool}
# what train.py --objective step-kto reads: also one label per step (Section 2.1), TRL's stepwise-supervision fields
STEP_KTO_ROW = {**KTO_ROW, "completions": list, "labels": list}
# label.py -> train.py, evaluate.py: a sample row with its outcome and step labels (null: a step without a verdict)
LABELLED_ROW = {**SAMPLE_ROW, **STEP_KTO_ROW, "step_spans": list, "pred": (str, NONE), "prm": str, "prm_failures": int,
                "prm_cutoffs": int}
# evaluate.py's result.json (Section 3 / Table 3: Pass@1 and the stepwise error rate; more keys with --sample_k)
RESULT = {"model": str, "benchmark": str, "prm": str, "n_problems": int, "pass@1": float, "pass@1_ci95": (list, tuple),
          "stepwise_error_rate": (float, NONE), "stepwise_error_rate_ci95": (list, tuple), "n_correct": int,
          "n_correct_with_wrong_step": int, "truncated": int}
# report.py's RUNS/seed<S>/<objective>/results.jsonl: one row per evaluated model M<iteration> of a run
RESULTS_TABLE_ROW = {"name": str, "iteration": int, "objective": str, "seed": int, **RESULT}


def _check_row(row, schema: dict, where: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field_name, types in schema.items():
        if field_name not in row:
            raise DataError(f"{where}: missing field '{field_name}'")
        value, types = row[field_name], _as_tuple(types)
        # bool is a subclass of int in Python: a label `true` must not pass as a count
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = "/".join(t.__name__ for t in types)
            raise DataError(f"{where}: field '{field_name}' must be {want}, got {type(value).__name__}")


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def jsonl_lines(text: str, keepends: bool = False) -> list[str]:
    """The lines of JSONL text, split on "\\n" only: rows are written with ensure_ascii=False, so their strings
    hold U+2028, U+2029 and U+0085 raw, on which str.splitlines also splits."""
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
    """(line number, parsed value) of every non-blank line; DataError naming file and line on invalid JSON or
    bytes that are not UTF-8. Lines end at "\\n" only (jsonl_lines)."""
    path = Path(path)
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
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    rows = []
    for lineno, row in iter_jsonl(path):
        _check_row(row, schema or {}, f"{path}:{lineno}")
        rows.append((lineno, row))
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
    if schema is not None:
        _check_row(value, schema, str(path))
    return value


def read_complete_rows(path: str | Path) -> list[dict]:
    """The rows of a JSONL file that a kill -9 may have cut: every row before the first line that does not
    parse (that line and everything after it are lost anyway); none when the file does not exist. A last line
    cut inside a character is such a line; bytes that are not UTF-8 on a line that ends raise DataError."""
    rows, path = [], Path(path)
    if path.exists():
        with open(path, "rb") as f:
            for lineno, data in enumerate(f, start=1):
                try:
                    rows.append(json.loads(_decoded(data, path, lineno)))
                except json.JSONDecodeError:
                    break
                except DataError:
                    if data.endswith(b"\n"):
                        raise
                    break
    return rows


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def resume_rows(out: str | Path, chunks: list[list[str]]) -> tuple[list[dict], int]:
    """Rows already written to ``out.partial`` by a crashed run, and how many chunks they complete.

    ``chunks`` lists the expected row ids of each chunk, in order. Rows of a chunk that was cut off
    (and a truncated last line) are dropped, and the partial file is rewritten without them, so that
    appending the remaining chunks gives exactly the uninterrupted output.
    """
    partial = _partial_path(Path(out))
    if not partial.exists():
        return [], 0
    rows = read_complete_rows(partial)
    kept, done = [], 0
    for chunk in chunks:
        ids = [r.get("id") for r in rows[len(kept) : len(kept) + len(chunk)]]
        if ids != list(chunk):
            break
        kept.extend(rows[len(kept) : len(kept) + len(chunk)])
        done += 1
    _write_lines(partial, kept, mode="w")
    return kept, done


def _write_lines(path: Path, rows: list[dict], mode: str) -> None:
    with open(path, mode, encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def _check_rows(rows: list[dict], schema: dict | None, path: Path) -> None:
    """Refuse to write a row that breaks the file's contract (before anything is written)."""
    for index, row in enumerate(rows, start=1):
        _check_row(row, schema or {}, f"{path}: row {index} to write")


def append_chunk(out: str | Path, rows: list[dict], schema: dict) -> None:
    """Append one finished chunk of rows carrying ``schema`` to ``out.partial`` (one write, then fsync)."""
    _check_rows(rows, schema, Path(out))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    _write_lines(_partial_path(Path(out)), rows, mode="a")


def finish_output(out: str | Path) -> None:
    """Mark ``out`` complete: rename ``out.partial`` to ``out`` (atomic on POSIX)."""
    partial = _partial_path(Path(out))
    if not partial.exists():  # zero chunks: still produce a (valid, empty) complete file
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.touch()
    os.replace(partial, out)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object], exclusive: bool = False) -> None:
    """The one way a whole file is written: ``write(f)`` fills a temporary file beside ``path`` (a name of this
    process's own), which is flushed to disk and renamed to ``path``, so a kill at any moment leaves the old file or
    the new one, never a part of one. exclusive: only create ``path``, atomically, when no process has yet (the
    first writer's file stays)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    if not exclusive:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # create-if-absent, atomic
    except FileExistsError:
        pass
    tmp.unlink()


def write_text_atomic(path: str | Path, text: str, exclusive: bool = False) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")), exclusive)


def write_json_atomic(path: str | Path, obj, schema: dict | None = None) -> None:
    """Write JSON (an object carrying ``schema`` when given), atomically (write_atomic)."""
    if schema is not None:
        _check_row(obj, schema, str(path))
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | Path, rows: list[dict], schema: dict | None = None) -> None:
    """Write a whole JSONL file at once (rows carrying ``schema``; None: files no other stage reads, such
    as train.py's log), atomically (write_atomic)."""
    _check_rows(rows, schema, Path(path))
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def chunked(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def derived_seed(*parts) -> int:
    """One seed in [0, 2**31) from several, the same in every process: how every chunk of a stage's output is
    seeded (generate.py: run seed and chunk index; label.py mc: run seed and the chunk's row ids), so that a
    resumed run writes what an uninterrupted one would have. Ints only: Python's hash of a tuple of ints
    (not salted per process, unlike str); else the CRC-32 of the parts as JSON."""
    if all(isinstance(part, int) for part in parts):
        return hash(parts) % 2**31
    return zlib.crc32(json.dumps(list(parts)).encode()) % 2**31


def seed_everything(*seeds: int) -> None:
    """Seed python, numpy and torch from a tuple such as (run seed, chunk index)."""
    import numpy as np
    import torch

    seed = derived_seed(*seeds)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- command lines


def option(default=MISSING, help: str = ""):
    """A dataclass field with its --help text (HfArgumentParser reads metadata["help"]): how every stage
    declares its command-line options."""
    return field(default=default, metadata={"help": help})


def run_cli(args_class, main) -> None:
    """Every stage's entry: ``main(args)`` with the command line parsed into ``args_class`` (argparse refuses a
    value outside a Literal field's choices). A StageError or ValueError (DataError and grading's loader errors
    name file, line and field) ends the process with its message in one line, not a traceback."""
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(args_class).parse_args_into_dataclasses()
    try:
        main(args)
    except (StageError, ValueError) as error:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {redact_urls(str(error))}")  # a URL's password is never shown


def check_choices(args) -> None:
    """Every Literal field of the dataclass ``args`` holds one of its choices: argparse checks the command line,
    this an Args built in code (one stage calling another's functions)."""
    hints = typing.get_type_hints(type(args))
    for f in dataclasses.fields(args):
        choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else ()
        value = getattr(args, f.name)
        if choices and value not in choices:
            raise UsageError(f"--{f.name} {value!r}: must be one of {' | '.join(map(str, choices))}")


# A URL's credentials, never printed or written: its userinfo (scheme://user:password@host, scheme://user@host) and
# the value of a query or fragment parameter whose name says it is a secret (?api_key=, &token=, ;password=, #key=).
# run.sh's redact_urls does the same with sed.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>.,:;!?)\]]")  # not the text's punctuation after it
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")
_SECRET_PARAMETER = re.compile(r"([?&;#](?:[\w.-]*[_-])?(?:(?:api)?key|token|passw(?:or)?d|pwd|secret|sig(?:nature)?"
                               r"|auth(?:orization)?|credential)s?=)(?:[^&#;\s'\"<>]*[^&#;\s'\"<>.,:!?)\]])?",
                               re.IGNORECASE)
REDACTED = "***"


def redact_url(url: str) -> str:
    """``url`` with its user and password and its secret-named parameters' values replaced by ***: the host, port
    and path stay, so that a message still says which server it means."""
    url = _USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", url, count=1)
    start = min((i for i in (url.find("?"), url.find("#")) if i >= 0), default=len(url))
    return url[:start] + _SECRET_PARAMETER.sub(lambda m: m.group(1) + REDACTED, url[start:])


def redact_urls(text: str) -> str:
    """``text`` (a message, a command line, an exception's text quoting a URL) with every URL in it redacted."""
    return _URL.sub(lambda m: redact_url(m.group()), text)


# ----------------------------------------------------------------------------- shards: data-parallel stages
# A stage's chunks are split over processes (a node of 8 GPUs samples with 8 / TP engines at once): chunk i is
# shard i % N's. Shard K writes OUT.shard-K-of-N (OUT.shard-K-of-N.partial until its chunks are done, resumable as
# any output), and the last shard to finish merges the parts into OUT in chunk order. Chunks are seeded from their
# index, so OUT is byte for byte what one process writes. Before any shard writes, its stage checks OUT's provenance
# record (provenance.settle: written by the first shard to start), so parts made from other inputs or settings are
# refused, never merged; each part has one writer (claim).


class Shard(NamedTuple):
    index: int = 0
    count: int = 1

    def chunk_indices(self, num_chunks: int) -> list[int]:
        return list(range(self.index, num_chunks, self.count))


@dataclass(frozen=True)
class ShardArgs:
    """The data-parallel options of generate.py, label.py and evaluate.py."""

    num_shards: int = option(1, help="Processes that split this stage's chunks (chunk i goes to shard i %% N); "
                             "the last shard to finish merges their parts into the output, byte for byte what one "
                             "process writes. run.sh starts them: one per TP GPUs of each node.")
    shard_index: int = option(0, help="This process's shard: 0 .. --num_shards - 1.")

    def shard(self) -> "Shard":
        return shard_of(self.shard_index, self.num_shards)


def shard_of(index: int, count: int) -> Shard:
    """The Shard of --shard_index / --num_shards, checked."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"need --num_shards >= 1 and 0 <= --shard_index < --num_shards, got {index} of {count}")
    return Shard(index, count)


def part_path(out: Path, shard: Shard) -> Path:
    """Where a shard writes its chunks: OUT itself for one process, else OUT.shard-K-of-N."""
    return out if shard.count == 1 else out.with_name(f"{out.name}.shard-{shard.index}-of-{shard.count}")


def write_chunks(out: str | Path, chunk_ids: list[list[str]], rows_of_chunk, schema: dict, shard: Shard,
                 desc: str) -> bool:
    """Write this shard's chunks of ``out``, which the caller found incomplete and made by what it is about to do
    (provenance.settle): ``rows_of_chunk(i)`` gives chunk i's rows, whose ids must be ``chunk_ids[i]``. Resumes after
    the chunks a killed run finished. True when ``out`` is complete (this shard merged it); False while other
    shards' parts are missing."""
    from tqdm import tqdm

    out = Path(out)
    part, mine = part_path(out, shard), shard.chunk_indices(len(chunk_ids))
    claim(part)
    if not part.exists():
        _, done = resume_rows(part, [chunk_ids[i] for i in mine])
        for i in tqdm(mine[done:], desc=desc, initial=done, total=len(mine)):
            append_chunk(part, rows_of_chunk(i), schema)
        finish_output(part)
    release(part)
    return merge_parts(out, chunk_ids, shard.count)


def merge_parts(out: Path, chunk_ids: list[list[str]], count: int) -> bool:
    """OUT from the complete parts of all ``count`` shards, chunk by chunk (lines copied as written); False while
    a part is missing. Two shards finishing at once may both merge: each writes the same bytes."""
    parts = [part_path(out, Shard(k, count)) for k in range(count)]
    if count > 1 and all(p.exists() for p in parts):
        try:
            lines = [jsonl_lines(p.read_text(encoding="utf-8"), keepends=True) for p in parts]
        except FileNotFoundError:  # another shard merged and removed the parts meanwhile
            return out.exists()
        write_text_atomic(out, "".join(_lines_in_chunk_order(lines, chunk_ids, parts)))
        for p in parts:
            p.unlink(missing_ok=True)
            lock_path(p).unlink(missing_ok=True)  # no shard writes a part of a complete output
    return out.exists()


def _lines_in_chunk_order(lines: list[list[str]], chunk_ids: list[list[str]], parts: list[Path]) -> list[str]:
    """Chunk i's lines are the next len(chunk_ids[i]) lines of part i % N; their ids are checked."""
    merged, taken = [], [0] * len(parts)
    for i, ids in enumerate(chunk_ids):
        k = i % len(parts)
        chunk = lines[k][taken[k] : taken[k] + len(ids)]
        taken[k] += len(ids)
        if [json.loads(line)["id"] for line in chunk] != ids:
            raise DataError(f"{parts[k]}: chunk {i} does not hold the rows expected there: delete the parts to redo")
        merged += chunk
    return merged


_HELD: dict[str, int] = {}  # lock files this process holds (released when it exits, a kill -9 included)


def claim(path: str | Path, wait_s: float = 0.0) -> None:
    """Make this process the one writer of ``path`` (an output being written or checked), through the lock file
    .NAME.lock beside it: a second process started on it refuses with one line (after ``wait_s`` seconds of
    retries, for a check that holds it for a moment), and never interleaves its chunks with the first one's."""
    import fcntl
    import time

    lock = lock_path(path)
    if str(lock) in _HELD:
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd, deadline = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644), time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise StageError(f"{path} is being written by another process (it holds {lock.name}): wait for it "
                                 "to finish, or stop it first") from None
            time.sleep(0.05)
    _HELD[str(lock)] = fd


def lock_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def release(path: str | Path) -> None:
    """Give up the claim on ``path``, once it is written."""
    fd = _HELD.pop(str(lock_path(path)), None)
    if fd is not None:
        os.close(fd)


def shard_rows(out: Path, chunk_ids: list[list[str]], shard: Shard) -> dict[int, list[dict]]:
    """{chunk index: rows} of this shard's chunks of a complete output: from OUT once merged, else from the
    shard's own complete part."""
    for _ in range(2):  # the part may be merged into OUT and removed between the check and the read
        source = out if out.exists() else part_path(out, shard)
        try:
            text = source.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        by_id = {row["id"]: row for row in map(json.loads, jsonl_lines(text))}
        return {i: [by_id[x] for x in chunk_ids[i]] for i in shard.chunk_indices(len(chunk_ids))}
    raise DataError(f"{out}: neither it nor {part_path(out, shard).name} can be read")


# ----------------------------------------------------------------------------- steps and prompts

# Steps are separated by a blank line (the format the prompts ask for, and the paper's Fig. 1 style).
# STEP_SEPARATOR is how steps are written (arith_task.py's solutions, GSM8K references, the prefix an mc
# rollout continues); step_spans splits on any blank line, whitespace-only lines included.
STEP_SEPARATOR = "\n\n"
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def step_spans(text: str) -> list[tuple[int, int]]:
    """Character spans (start, end) of the non-empty steps of ``text``, separators excluded."""
    spans, start = [], 0
    for m in list(_BLANK_LINE.finditer(text)) + [None]:
        end = m.start() if m else len(text)
        chunk = text[start:end]
        if chunk.strip():
            lead = len(chunk) - len(chunk.lstrip())
            spans.append((start + lead, start + len(chunk.rstrip())))
        start = m.end() if m else len(text)
    return spans


def step_texts(text: str, spans: list[tuple[int, int]]) -> list[str]:
    """The steps of ``text`` at its step_spans (split once, carried in the rows as step_spans)."""
    return [text[a:b] for a, b in spans]


# The one place where prompts are written. "instruct" is used inside the tokenizer's chat template
# when it has one (instruct models) and as plain text otherwise; "minimal" is for the embedded
# default's tiny model trained from scratch, where every prompt token costs training compute;
# "qwen25-math-cot" is the prompt of the Qwen2.5-Math evaluation harness (QwenLM/Qwen2.5-Math,
# evaluation/utils.py), with which published MATH-500 numbers are measured: the instruction is a system
# message, the user message is the problem alone. It does not ask for blank-line-separated steps, which
# the step labeller splits on: generation for training keeps "instruct" (or "minimal", whose tiny model
# was trained on that format).
PromptStyle = typing.Literal["instruct", "minimal", "qwen25-math-cot"]  # the keys of PROMPT_TEMPLATES
PROMPT_TEMPLATES = {
    "instruct": (
        "Solve the following math problem step by step. Separate the steps with a blank line and "
        "put the final answer in \\boxed{{}}.\n\nProblem: {problem}"
    ),
    "minimal": "Problem: {problem}\nSolution:\n",
    "qwen25-math-cot": "{problem}",
}
# System messages of the styles that have one (not format strings: the braces are literal).
SYSTEM_PROMPTS = {
    "qwen25-math-cot": "Please reason step by step, and put your final answer within \\boxed{}.",
}


def build_prompt(tokenizer, problem: str, style: str = "instruct") -> str:
    """The text the model continues. Chat template when the tokenizer has one, else plain text."""
    if style not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt style {style!r}: {' | '.join(PROMPT_TEMPLATES)}")
    text = PROMPT_TEMPLATES[style].format(problem=problem)
    if style == "minimal":
        return text
    system = SYSTEM_PROMPTS.get(style)
    if system and not getattr(tokenizer, "chat_template", None):
        # the ChatML text the Qwen2.5-Math harness hard-codes, whatever the model's own format
        return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return chat_prompt(tokenizer, text, "\n\nSolution:\n", system)


def chat_prompt(tokenizer, text: str, plain_suffix: str, system: str | None = None) -> str:
    """``text`` as the user message of the tokenizer's chat template (after ``system`` when given), ready for
    the reply; ``text + plain_suffix`` for a tokenizer without a template. The one place prompts (the
    policy's here, the judge's in label.py) go through a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return text + plain_suffix
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """The token ids a model is prompted with: ``text`` encoded as it is, with BOS in front when the tokenizer's
    own encoding starts with one (Llama, Mistral, Gemma base models were trained so) and the text does not
    already begin with it. A chat template writes BOS into the text itself, so it is never doubled; a base model
    prompted with plain text gets it; a tokenizer that adds none (Qwen, SmolLM2, the scratch model's) is left as
    it is. The one rule for every prompt: the policy's (both engines), the judge's, mc rollouts', train.py's."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos) and adds_bos(tokenizer):
        ids = [bos] + ids
    return ids


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encoding (add_special_tokens=True) puts BOS first."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


