"""What a training run keeps on disk, nothing of Step-KTO: OUTPUT's provenance record and the decision to train it,
the work folder OUTPUT.resume (provenance.json, train_log.jsonl, the sharded resume state: a rerun after a crash, even
kill -9 of one rank, resumes from it), and the final model, written as OUTPUT.tmp and renamed when complete."""

from __future__ import annotations

import os
import random
import secrets
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, \
    set_state_dict

from stepkto import jsonl, models, provenance, sharding
from stepkto.cli import UsageError
from stepkto.distributed import Env, Lora, TrainingError, add_lora, barrier, full_tensor, gather_objects, \
    leave_process_group, rank

PATHS = ("data", "output_dir", "model", "ref_model")  # options that name files: in a record by what they hold


# ----------------------------------------------------------------------------- OUTPUT: whether to train it
def training_record(options: dict, world_size: int) -> dict:
    """The checkpoint's provenance record: the data's bytes, the models by what they are, and every other option of
    ``options`` (those that change what is computed), with the world size (its reductions round differently)."""
    settings = {k: v for k, v in options.items() if k not in PATHS}
    identities = {name: provenance.model_identity(options[name]) for name in ("model", "ref_model") if options[name]}
    return provenance.make_record("train.py", {"data": provenance.file_input(options["data"])}, identities,
                                  settings | {"world_size": world_size})


def claim_output(output_dir: str, record: dict, on_change: str, env: Env) -> bool:
    """Whether to train OUTPUT: not when it is complete and made by ``record``. Rank 0, OUTPUT's one writer
    (sharding.claim), decides for every rank. OUTPUT or leftovers made otherwise stop the run or are removed (redo)."""
    decision = None
    if env.rank == 0:
        try:
            sharding.claim(output_dir)
            decision = _decision(output_dir, record)
        except jsonl.StageError as refusal:
            decision = refusal
    decision = gather_objects(decision)[0]
    if isinstance(decision, jsonl.StageError):
        raise decision
    if decision == "done":
        print(f"{output_dir} is already a complete checkpoint of this run: nothing to do", flush=True)
        return False
    if decision != "todo" and on_change != "redo":
        raise UsageError(f"{output_dir} was {decision}: delete it (and {output_dir}.resume), choose another "
                         "--output_dir, or rerun with --on_change redo")
    if decision != "todo" and env.rank == 0:
        print(f"{output_dir} was {decision}: training it again (--on_change redo)", flush=True)
        for path in (output_dir, output_dir + ".resume", output_dir + ".tmp"):
            shutil.rmtree(path, ignore_errors=True)
    barrier()
    return True


def _decision(output_dir: str, record: dict) -> str:
    """"done" (OUTPUT complete, made by ``record``), "todo" (absent, or ``record``'s resume state), or how made."""
    out, work = Path(output_dir), Path(output_dir + ".resume")
    complete = models.is_complete_model_dir(out)
    if not complete and out.exists() and any(out.iterdir()):
        return "not empty and is not a complete checkpoint"
    made = (out if complete else work) / provenance.RECORD
    old = jsonl.read_json(made) if made.exists() else None
    if provenance.same(old, record):
        return "done" if complete else "todo"
    if not (complete or old or (work.exists() and any(work.iterdir()))):
        return "todo"
    return f"made {provenance.changes(old, record)}" if old else "made by an unknown run (no provenance record)"


def open_work(output_dir: str, record: dict, env: Env) -> Path:
    """OUTPUT.resume with the run's record in it, checked to be one folder all ranks see (each rank decides from its
    files whether a resume state exists: ranks that disagree would hang): every rank reads rank 0's random token."""
    work = Path(output_dir + ".resume")
    work.mkdir(parents=True, exist_ok=True)
    token_file = work / "shared_folder_check"
    if env.rank == 0:
        jsonl.write_json_atomic(work / provenance.RECORD, record)
        jsonl.write_json_atomic(token_file, secrets.token_hex(8))
    barrier()
    tokens = gather_objects(jsonl.read_json(token_file) if token_file.exists() else None)
    if tokens[0] is None or len(set(tokens)) != 1:
        missing = [r for r, t in enumerate(tokens) if t != tokens[0] or t is None]
        raise UsageError(f"{work} is not one folder shared by every rank: rank(s) {missing} do not see what rank 0 "
                         "wrote there. Put --output_dir on a filesystem all nodes share, with the same path on each")
    return work


# ----------------------------------------------------------------------------- the sharded resume state
# WORK/state-<step>/: torch.distributed.checkpoint's files (each rank its own shards of the model and AdamW's state)
# and rank<r>.pt (its RNG and the scheduler). Rank 0 then rewrites WORK/state.json, naming the newest complete one.
def _state_dicts(policy, optimizer, adapters_only: bool):
    """(model, optimizer) state dicts of this rank's shards; with LoRA the adapters alone (the base is on disk)."""
    model_state, optimizer_state = get_state_dict(policy, optimizer,
                                                  options=StateDictOptions(ignore_frozen_params=adapters_only))
    if adapters_only:  # a tied LM head is listed beside its frozen embedding: keep the adapters alone
        trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
        model_state = {name: value for name, value in model_state.items() if name in trainable}
    return model_state, optimizer_state


def save_train_state(work: Path, policy, optimizer, scheduler, step: int, adapters_only: bool) -> None:
    """The resume state after ``step`` steps, every rank writing its own part. A collective."""
    folder = work / f"state-{step}"
    model_state, optimizer_state = _state_dicts(policy, optimizer, adapters_only)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    extras = {"rng": rng, "scheduler": scheduler.state_dict()}
    jsonl.write_atomic(folder / f"rank{rank()}.pt", lambda f: torch.save(extras, f))
    barrier()
    if rank() == 0:
        jsonl.write_json_atomic(work / "state.json", {"step": step, "folder": folder.name})
        for old in work.glob("state-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)


def load_train_state(work: Path, policy, optimizer, scheduler, adapters_only: bool) -> int:
    """Restore the newest resume state, if any, and drop the log lines after it; returns its step (0: none)."""
    if not (work / "state.json").exists():
        return 0
    state = jsonl.read_json(work / "state.json")
    folder = work / state["folder"]
    model_state, optimizer_state = _state_dicts(policy, optimizer, adapters_only)
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    set_state_dict(policy, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(strict=not adapters_only))
    extras = torch.load(folder / f"rank{rank()}.pt", weights_only=False)  # our own file; it holds numpy RNG states
    scheduler.load_state_dict(extras["scheduler"])
    random.setstate(extras["rng"]["python"])
    np.random.set_state(extras["rng"]["numpy"])
    torch.set_rng_state(extras["rng"]["torch"])
    if "cuda" in extras["rng"]:
        torch.cuda.set_rng_state_all(extras["rng"]["cuda"])
    if rank() == 0:
        if (log := work / "train_log.jsonl").exists():
            jsonl.write_jsonl_atomic(log, [e for e in jsonl.read_complete_rows(log) if e["step"] <= state["step"]])
        print(f"resuming from {work} after step {state['step']}", flush=True)
    return state["step"]


# ----------------------------------------------------------------------------- the final model
def save_final_model(policy, tokenizer, out: Path, work: Path, config: dict, lora: Lora | None = None,
                     base_model: str = "") -> None:
    """policy.lm's weights gathered to rank 0 (the last collective), which writes them, the tokenizer, work's logs and
    config to OUT.tmp, renamed to OUT, and drops the work folder. With lora: base_model with the adapters merged."""
    if lora:
        weights = {name.removeprefix("lm."): full_tensor(p) for name, p in policy.named_parameters() if p.requires_grad}
    else:
        weights = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    is_writer = rank() == 0
    leave_process_group()
    if not is_writer:
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora:
        save_merged_lora(weights, tmp, lora, base_model)
    else:
        # Tied weights come back as two copies: keep the names named_parameters() lists, one per tensor.
        names = {n for n, _ in policy.named_parameters()} | {n for n, _ in policy.named_buffers()}
        weights = {k.removeprefix("lm."): v for k, v in weights.items() if k in names}
        policy.lm.save_pretrained(tmp, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    for name in ("train_log.jsonl", "tracking", "provenance.json"):
        if (work / name).is_file():
            shutil.copy(work / name, tmp / name)
        elif (work / name).is_dir():
            shutil.copytree(work / name, tmp / name)
    jsonl.write_json_atomic(tmp / "train_args.json", config)
    os.replace(tmp, out)  # atomic: OUTPUT is either absent (or empty) or complete
    shutil.rmtree(work)
    print(f"saved {out}", flush=True)


def save_merged_lora(adapters: dict, out: Path, lora: Lora, base_model: str) -> None:
    """OUT = base_model with the adapters merged, OUT/adapter = the adapters, in their dtype: never the base's bf16,
    which would round away most of the update the merged M_i (next iteration's policy and reference) carries."""
    dtype = str(next(iter(adapters.values())).dtype).removeprefix("torch.")
    model = add_lora(models.load_model(base_model, dtype), lora)
    loaded = model.load_state_dict(adapters, strict=False)
    if loaded.unexpected_keys:
        raise TrainingError(f"the trained adapters do not fit --model {base_model}: {loaded.unexpected_keys[:3]}")
    model.save_pretrained(out / "adapter")
    model.merge_and_unload().save_pretrained(out)

