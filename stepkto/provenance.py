"""What made each output, and the check that no stage reuses an output something else made. The record, taken when
its stage starts (as DVC's dvc.lock), is kept in OUT.provenance.json (a folder's in FOLDER/provenance.json):

    {"format": FORMAT, "stage": "label.py",
     "inputs": {"samples": {"sha256": ..., "path": ...}},     # the bytes (or the rows) each input held
     "models": {"model": {"made_by": ...} | {"sha256": ...} | {"name": id}},
     "settings": {option: value}}                             # every option that changes the output's content

``settle``: the same record as the one kept means "complete" (or "resume"); another stops the stage with one line
naming what changed, or with ``--on_change redo`` makes the output again. Paths are for the messages, never compared.
No torch here: every stage imports this module before it loads anything."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Literal

from stepkto import jsonl, sharding

FORMAT = 1  # the version of the rows' and records' format: outputs of another format are never reused
OnChange = Literal["stop", "redo"]
ON_CHANGE_HELP = ("When the output exists but was made from other inputs, settings or models: stop (one line says "
                  "what changed) | redo (remove it and make it again).")
_CHUNK = 1 << 20  # bytes read at a time when hashing
_CACHED_FROM = 64 << 20  # files this large have their digest remembered (model weights); smaller ones are re-read
RECORD = "provenance.json"  # a folder's record; a file OUT's is OUT.provenance.json


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes; a large file's (model weights) is cached per (path, size, mtime): read once."""
    path = Path(path).resolve()
    stat = path.stat()
    if stat.st_size < _CACHED_FROM:
        return sha256_of(path)
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stepkto" / "file_sha256.json"
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = sha256_of(path)
        with contextlib.suppress(OSError):
            jsonl.write_text_atomic(cache_file, json.dumps(cache, indent=0) + "\n")
    return cache[key]


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(value) -> str:
    """SHA-256 of a JSON value (rows read and parsed, not a file's bytes)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def file_input(path: str | Path) -> dict:
    """A file input of a record: its bytes' digest, and its path for the messages."""
    if not Path(path).is_file():
        raise jsonl.DataError(f"{path}: file not found")
    return {"sha256": file_sha256(path), "path": str(path)}


def rows_input(rows, path: str = "") -> dict:
    """An input read as rows (a benchmark by name, a shard's rows): the digest of their content."""
    return {"sha256": json_sha256(rows), "path": str(path)}


def model_identity(model: str) -> dict:
    """A model before loading it: a checkpoint folder by its provenance record, another folder by its files' digests
    (hidden ones such as .git left out), a hub id or served model by name (pin a hub revision: pass its snapshot)."""
    folder = Path(model)
    if model in ("", "scratch") or not folder.is_dir():
        return {"name": model}
    if (folder / RECORD).is_file():
        return {"made_by": file_sha256(folder / RECORD)}
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return {"sha256": json_sha256([[str(p.relative_to(folder)), file_sha256(p)] for p in files])}


def make_record(stage: str, inputs: dict, models: dict, settings: dict) -> dict:
    """The record of an output (see the module docstring), as JSON holds it."""
    record = {"format": FORMAT, "stage": stage, "inputs": inputs, "models": models, "settings": settings}
    return json.loads(json.dumps(record))


def record_path(out: str | Path, is_folder: bool = False) -> Path:
    return Path(out) / RECORD if is_folder else Path(f"{out}.provenance.json")


def _compared(record: dict) -> dict:
    inputs = {name: {k: v for k, v in value.items() if k != "path"} for name, value in record.get("inputs", {}).items()}
    return {**record, "inputs": inputs}


def same(a: dict | None, b: dict | None) -> bool:
    return a is not None and b is not None and _compared(a) == _compared(b)


def changes(old: dict, new: dict) -> str:
    """What differs between two records, in words: 'from other samples (samples.jsonl changed), with ...'."""
    parts = []
    if old.get("format") != new.get("format") or old.get("stage") != new.get("stage"):
        parts.append(f"by {old.get('stage', 'another stage')} of stepkto format {old.get('format')}")
    for name, value in new.get("inputs", {}).items():
        before = old.get("inputs", {}).get(name, {})
        if before.get("sha256") != value.get("sha256"):
            where = Path(value.get("path") or before.get("path") or name).name
            parts.append(f"from other {name} ({where} changed)" if before else f"without {name}")
    for name, value in new.get("models", {}).items():
        if old.get("models", {}).get(name) != value:
            parts.append(f"with another --{name}")
    settings, before = _flat(new.get("settings", {})), _flat(old.get("settings", {}))
    differ = [k for k in sorted(settings.keys() | before.keys()) if settings.get(k) != before.get(k)]
    if differ:
        shown = ", ".join(f"--{k} {_shown(before.get(k))} -> {_shown(settings.get(k))}" for k in differ)
        parts.append(f"with other settings ({shown})")
    return ", ".join(parts) or "by another run"


def _flat(settings: dict) -> dict:
    """Nested settings (evaluate.py's labeller) as one level, named by their options."""
    flat = {}
    for key, value in settings.items():
        flat.update({f"{key}.{k}" if k in settings else k: v for k, v in _flat(value).items()}
                    if isinstance(value, dict) else {key: value})
    return flat


def _shown(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def settle(out: str | Path, record: dict, on_change: str, complete: bool, leftovers: list[Path],
           is_folder: bool = False) -> bool:
    """Whether ``out`` is complete and made as ``record`` says (True). False: it is to be made, or resumed from
    ``leftovers`` of the same record; others stop the stage or are removed (redo). ``out``'s lock: one writer."""
    out, path = Path(out), record_path(out, is_folder)
    sharding.claim(out, wait_s=10.0)
    try:
        old = jsonl.read_json(path) if path.exists() else None
        if same(old, record):
            if complete:
                print(f"{out} is complete; nothing to do.", flush=True)
            return complete
        present = [p for p in leftovers if p.exists() and not p.name.endswith(".lock")]
        if old is None and not present:
            jsonl.write_json_atomic(path, record)
            return False
        why = f"made {changes(old, record)}" if old is not None else "made by an unknown run (no provenance record)"
        if on_change != "redo":
            option = "--output_dir" if is_folder else "--output"
            raise jsonl.StageError(f"{out} was {why}: delete it, choose another {option}, or rerun with "
                                   "--on_change redo")
        for part in (p for p in present if p.name.startswith(out.name + ".shard-")):
            target = part.with_name(part.name.removesuffix(".partial"))
            sharding.claim(target)  # raises while another process writes this part (its .partial with it)
            sharding.release(target)
        print(f"{out} was {why}: making it again (--on_change redo)", flush=True)
        for p in present:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        jsonl.write_json_atomic(path, record)
        return False
    finally:
        sharding.release(out)


def settle_jsonl(out: str | Path, record: dict, on_change: str) -> bool:
    """settle for a JSONL output of sharding.write_chunks: its leftovers are OUT, OUT.partial and the shards' parts."""
    out = Path(out)
    parts = sorted(out.parent.glob(glob.escape(out.name) + ".shard-*")) if out.parent.is_dir() else []
    return settle(out, record, on_change, out.exists(), [out, out.with_name(out.name + ".partial"), *parts])


def settle_folder(out: str | Path, record: dict, on_change: str, outputs: list[Path], leftovers: list[Path]) -> bool:
    """settle for a folder (--output_dir) that is complete once every one of ``outputs`` exists."""
    return settle(out, record, on_change, all(p.exists() for p in outputs), leftovers, is_folder=True)
