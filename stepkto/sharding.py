"""A stage's output in chunks: resumable after kill -9, split over data-parallel shards, one writer per output.

* A stage writes ``OUT.partial`` a chunk at a time (one write + fsync each) and renames it to ``OUT`` when done:
  ``OUT`` existing means complete; the next run resumes from a crash's ``OUT.partial`` (``resume_rows``).
* Each chunk is seeded from the run seed and the chunk (``derived_seed``): resumed = uninterrupted.
* With ``--num_shards N`` the chunks are split over N processes, whose parts the last one merges into ``OUT``, byte
  for byte what one process writes (``write_chunks``). ``claim`` makes one process the writer of a file."""

from __future__ import annotations

import fcntl
import json
import os
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from stepkto import cli, jsonl


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def resume_rows(out: str | Path, chunks: list[list[str]]) -> tuple[list[dict], int]:
    """(rows, count) of complete chunks (row ids each) a crashed run left in ``out.partial``, trimmed for appending."""
    partial = _partial_path(Path(out))
    if not partial.exists():
        return [], 0
    rows = jsonl.read_complete_rows(partial)
    kept, done = [], 0
    for chunk in chunks:
        rows_of_chunk = rows[len(kept) : len(kept) + len(chunk)]
        if [r.get("id") for r in rows_of_chunk] != list(chunk):
            break
        kept += rows_of_chunk
        done += 1
    jsonl._write_lines(partial, kept, mode="w")
    return kept, done


def append_chunk(out: str | Path, rows: list[dict], schema: dict) -> None:
    """Append one finished chunk of rows carrying ``schema`` to ``out.partial`` (one write, then fsync)."""
    jsonl._check_rows(rows, schema, Path(out))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    jsonl._write_lines(_partial_path(Path(out)), rows, mode="a")


def finish_output(out: str | Path) -> None:
    """Mark ``out`` complete: rename ``out.partial`` to ``out`` (atomic on POSIX)."""
    partial = _partial_path(Path(out))
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.touch()  # zero chunks: still a (valid, empty) complete file
    os.replace(partial, out)


def chunked(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def derived_seed(*parts) -> int:
    """A seed in [0, 2**31), the same in every process: ints' tuple hash (unsalted, unlike str), else JSON CRC-32."""
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


class Shard(NamedTuple):
    index: int = 0
    count: int = 1

    def chunk_indices(self, num_chunks: int) -> list[int]:
        return list(range(self.index, num_chunks, self.count))


@dataclass(frozen=True)
class ShardArgs:
    """The data-parallel options of generate.py, label.py and evaluate.py."""

    num_shards: int = cli.option(1, help="Processes that split this stage's chunks (chunk i goes to shard i %% N); "
                             "the last shard to finish merges their parts into the output, byte for byte what one "
                             "process writes. run.sh starts them: one per TP GPUs of each node.")
    shard_index: int = cli.option(0, help="This process's shard: 0 .. --num_shards - 1.")

    def shard(self) -> "Shard":
        index, count = self.shard_index, self.num_shards
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"need --num_shards >= 1 and 0 <= --shard_index < --num_shards, got {index} of {count}")
        return Shard(index, count)


def part_path(out: Path, shard: Shard) -> Path:
    """Where a shard writes its chunks: OUT itself for one process, else OUT.shard-K-of-N."""
    return out if shard.count == 1 else out.with_name(f"{out.name}.shard-{shard.index}-of-{shard.count}")


def write_chunks(out: str | Path, chunk_ids: list[list[str]], rows_of_chunk, schema: dict, shard: Shard,
                 desc: str) -> bool:
    """Write (resuming) this shard's chunks ``rows_of_chunk(i)`` of ``out``; True once ``out`` is complete."""
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
    """OUT from all ``count`` parts (chunk i: next lines of part i % N, ids checked), False while one is missing.
    Two shards merging at once write the same bytes."""
    parts = [part_path(out, Shard(k, count)) for k in range(count)]
    if count > 1 and all(p.exists() for p in parts):
        try:
            lines = [jsonl.jsonl_lines(p.read_text(encoding="utf-8"), keepends=True) for p in parts]
        except FileNotFoundError:  # another shard merged and removed the parts meanwhile
            return out.exists()
        merged, taken = [], [0] * count
        for i, ids in enumerate(chunk_ids):
            k = i % count
            chunk = lines[k][taken[k] : taken[k] + len(ids)]
            taken[k] += len(ids)
            if [json.loads(line)["id"] for line in chunk] != ids:
                raise jsonl.DataError(f"{parts[k]}: chunk {i} does not hold the rows expected there: delete the parts")
            merged += chunk
        jsonl.write_text_atomic(out, "".join(merged))
        for p in parts:
            p.unlink(missing_ok=True)
            lock_path(p).unlink(missing_ok=True)  # no shard writes a part of a complete output
    return out.exists()


_HELD: dict[str, int] = {}  # lock files this process holds (released when it exits, a kill -9 included)


def claim(path: str | Path, wait_s: float = 0.0) -> None:
    """Be the one writer of ``path`` (lock .NAME.lock); a second process refuses in one line after ``wait_s`` s."""
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
                raise jsonl.StageError(f"{path} is being written by another process (it holds {lock.name}): wait "
                                       "for it to finish, or stop it first") from None
            time.sleep(0.05)
    _HELD[str(lock)] = fd


def lock_path(path: str | Path) -> Path:
    return Path(path).with_name(f".{Path(path).name}.lock")


def release(path: str | Path) -> None:
    if (fd := _HELD.pop(str(lock_path(path)), None)) is not None:
        os.close(fd)


def shard_rows(out: Path, chunk_ids: list[list[str]], shard: Shard) -> dict[int, list[dict]]:
    """{chunk index: rows} of this shard's chunks of a complete output: from OUT once merged, else its own part."""
    for _ in range(2):  # the part may be merged into OUT and removed between the check and the read
        source = out if out.exists() else part_path(out, shard)
        try:
            text = source.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        by_id = {row["id"]: row for row in map(json.loads, jsonl.jsonl_lines(text))}
        return {i: [by_id[x] for x in chunk_ids[i]] for i in shard.chunk_indices(len(chunk_ids))}
    raise jsonl.DataError(f"{out}: neither it nor {part_path(out, shard).name} can be read")
