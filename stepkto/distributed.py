"""Training plumbing, nothing of Step-KTO: processes and collectives, FSDP2 and its mixed precision, LoRA, the batch
plan, the optimizer, LR schedule and update, the training log. What a run writes to disk is stepkto/checkpoints.py's."""

from __future__ import annotations

import datetime
import faulthandler
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from stepkto import jsonl, models, sharding
from stepkto.cli import UsageError


class TrainingError(jsonl.StageError, RuntimeError):
    """Training cannot go on (non-finite loss, mismatched resume state); the message says why."""


# How long a collective waits: ranks can wait minutes while the others hash a large model or write a resume state.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


class Env(NamedTuple):
    rank: int
    world_size: int
    device: torch.device


def init_distributed() -> Env:
    """One process unless launched by torchrun (then FSDP2, even on one GPU: gloo on CPU, nccl on GPU)."""
    if "LOCAL_RANK" not in os.environ:
        return Env(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    faulthandler.enable(all_threads=True)  # a rank's native crash prints where it happened
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return Env(dist.get_rank(), dist.get_world_size(), device)


def run_in_process_group(fn: Callable[[Env], None]) -> None:
    env = init_distributed()
    try:
        fn(env)
    finally:
        leave_process_group(wait=False)


def leave_process_group(wait: bool = True) -> None:
    """Every rank waits for all (``wait``), then leaves the process group, before any rank works on alone: a rank
    exiting while its peer still runs races gloo's teardown (pytorch/pytorch issues 190489, 75529, 65231)."""
    if dist.is_initialized():
        gc.collect()  # finished async work freed during teardown could abort the process: drop it first
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def exit_under_torchrun() -> None:
    """Under torchrun: skip interpreter teardown, where gloo's threads can abort a finished run (pytorch PR 179291)."""
    if "LOCAL_RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def rank() -> int:
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


def all_reduce(values: torch.Tensor) -> torch.Tensor:
    """The sum of ``values`` over the ranks, on every rank (``values`` itself on one process)."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def all_reduce_sums(sums: dict, device: torch.device) -> dict[str, float]:
    """Each value summed over the ranks in one collective; every rank passes the same keys."""
    keys = sorted(sums)
    values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys])  # (S,)
    return dict(zip(keys, all_reduce(values).tolist()))


# ----------------------------------------------------------------------------- the policy: FSDP2, mixed precision, LoRA
class Lora(NamedTuple):
    """LoRA (peft): the update is alpha / r * B A, dropout on the adapters' input, target_modules comma-separated."""

    r: int
    alpha: float
    dropout: float
    target_modules: str


def add_lora(lm: torch.nn.Module, lora: Lora | None) -> torch.nn.Module:
    """LoRA adapters on the model (peft; None: none). B starts at 0: the untrained model is the base model, pi_ref."""
    if lora is None:
        return lm
    from peft import LoraConfig, get_peft_model

    targets = [name.strip() for name in lora.target_modules.split(",") if name.strip()]
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    try:
        return get_peft_model(lm, config)
    except ValueError as error:  # e.g. no module matches the target modules
        raise UsageError(f"--lora_target_modules {lora.target_modules}: {error}") from None


def build_policy(model: str, settings, tokenizer, lora: Lora | None, env: Env, trainable: bool,
                 wrap: Callable[..., torch.nn.Module]) -> torch.nn.Module:
    """``model`` (folder, hub id or "scratch") per train.py's ``settings``, with LoRA, in ``wrap``. Under torchrun only
    rank 0 builds it whole (CPU); every rank shards a meta skeleton and gets weights and buffers from rank 0's copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    def wrapped(meta: bool, autocast: bool) -> torch.nn.Module:
        if model == "scratch":
            sizes = settings.hidden_size, settings.num_layers, settings.intermediate_size
            lm = models.make_tiny_llama(tokenizer, *sizes, seed=settings.seed, meta=meta)
            lm = lm.to(getattr(torch, settings.dtype))
        else:
            lm = models.load_model(model, settings.dtype, meta=meta)
        return _prepare(add_lora(lm, lora), settings, trainable, autocast, wrap)

    if not dist.is_initialized():
        return wrapped(meta=False, autocast=True).to(env.device)
    full = wrapped(meta=False, autocast=False) if env.rank == 0 else None
    policy = wrapped(meta=True, autocast=False)
    shard(policy, env, settings.mixed_precision)
    policy.to_empty(device=env.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(policy, full.state_dict() if full is not None else {}, options=options)
    buffers = dict(full.named_buffers()) if full is not None else {}
    for name, buffer in policy.named_buffers():
        if full is not None:
            buffer.copy_(buffers[name])
        dist.broadcast(buffer, src=0)
    del full
    gc.collect()
    return policy


def _prepare(lm: torch.nn.Module, settings, trainable: bool, autocast: bool, wrap) -> torch.nn.Module:
    lm.config.use_cache = False
    if trainable and settings.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.20 renamed it
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not (trainable and hasattr(lm, "peft_config")):  # peft has frozen a LoRA model's base
        lm.requires_grad_(trainable)
    compute = getattr(torch, settings.mixed_precision) if autocast and settings.mixed_precision != "none" else None
    return wrap(lm, chunk_mib=settings.logits_chunk_mib, autocast=compute)


def shard(policy: torch.nn.Module, env: Env, mixed_precision: str) -> None:
    """FSDP2, each decoder layer a unit, then the root; gradients reduced in float32, master weights in their dtype."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    precision = MixedPrecisionPolicy() if mixed_precision == "none" else \
        MixedPrecisionPolicy(param_dtype=getattr(torch, mixed_precision), reduce_dtype=torch.float32)
    for layer in policy.lm.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=precision)
    fully_shard(policy, mesh=mesh, mp_policy=precision)


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU; a DTensor shard is all-gathered (a collective: every rank, same order)."""
    return (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().cpu()


# ----------------------------------------------------------------------------- the batch plan
MEGA_BATCHES = 50  # batches per length-sorted mega-batch


class PlanBatch(NamedTuple):
    epoch: int
    rows: list[int]  # global batch, longest row first; rank r takes the r-th equal slice


def build_plan(lengths: list[int], global_batch_size: int, shards: int, epochs: int, seed: int,
               min_batch_size: int) -> list[PlanBatch]:
    """Every global batch of the run, fixed up front (the KL pairs depend on it): each epoch a permutation cut into
    length-sorted mega-batches (little padding), the batches then shuffled; each trimmed to a multiple of `shards`
    (world size x gradient accumulation steps), dropped below min_batch_size (KTO's KL pairs need two rows)."""
    rng = np.random.default_rng(seed)
    mega = global_batch_size * MEGA_BATCHES
    plan = []
    for epoch in range(epochs):
        order = rng.permutation(len(lengths)).tolist()
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
            batches += sharding.chunked(chunk, global_batch_size)
        batches = [b[: len(b) - len(b) % shards] for b in batches]
        batches = [b for b in batches if len(b) >= min_batch_size]
        plan += [PlanBatch(epoch, batches[i]) for i in rng.permutation(len(batches)).tolist()]
    return plan


def micro_slots(global_batch_size: int, env: Env, accumulation: int) -> list[range]:
    """This rank's slots of the global batch (indices into PlanBatch.rows), its equal slice cut into micro-batches."""
    per_micro = global_batch_size // (env.world_size * accumulation)
    first = env.rank * accumulation
    return [range((first + m) * per_micro, (first + m + 1) * per_micro) for m in range(accumulation)]


# ----------------------------------------------------------------------------- optimizer, LR schedule, clipping
def make_optimizer(policy: torch.nn.Module, total_steps: int, lr: float, weight_decay: float, warmup_ratio: float,
                   schedule: str, fused: bool):
    """(AdamW over the trainable parameters, its LR schedule) for a run of total_steps steps."""
    params = [p for p in policy.parameters() if p.requires_grad]
    # As HF Trainer: no decay on norm gains and biases (1-D), which decay would only pull towards 0.
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=fused or None)
    warmup = round(warmup_ratio * total_steps)

    def factor(step: int) -> float:  # linear warmup to the peak, then linear or cosine decay towards 0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 1.0 - progress) if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def update(policy: torch.nn.Module, optimizer, scheduler, loss: float, max_grad_norm: float, step: int,
           work: Path) -> float:
    """After a step's backward passes: clip, AdamW step, LR schedule step; returns the norm before clipping."""
    check_finite("loss", loss, step, work)
    grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)))
    check_finite("gradient norm", grad_norm, step, work)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # now: held through the next forward they would raise its memory peak
    scheduler.step()
    return grad_norm


def check_finite(name: str, value: float, step: int, work: Path) -> None:
    if not math.isfinite(value):
        raise TrainingError(f"step {step + 1}: the {name} is {value}; stopping before the update. Nothing of this step "
                            f"was written: --model and the last resume state in {work} (if any) are untouched. "
                            "Lower --lr (or check the data) and rerun.")


# ----------------------------------------------------------------------------- the training log
class TrainLog:
    """The tqdm bar; every ``every`` steps and the last, rank 0 logs metrics, throughput to train_log.jsonl, tracker."""

    def __init__(self, work: Path, every: int, total: int, start_step: int, desc: str, tracker, rank: int):
        self.path, self.every, self.total = work / "train_log.jsonl", every, total
        self.tracker, self.rank = tracker, rank
        self.bar = tqdm(total=total, initial=start_step, desc=desc, disable=rank != 0)
        self.start, self.real, self.computed, self.rows = time.perf_counter(), 0.0, 0.0, 0

    def step(self, step: int, epoch: int, lr: float, grad_norm: float, metrics: dict, sums: dict, rows: int) -> None:
        self.real += sums["tokens/real"]
        self.computed += sums["tokens/computed"]
        self.rows += rows
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss/total']:.4f}")
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            now = time.perf_counter()
            seconds = max(now - self.start, 1e-9)
            entry = {"step": step + 1, "epoch": epoch, "lr": lr, "grad_norm": grad_norm, **metrics,
                     "tokens_per_s": self.real / seconds, "samples_per_s": self.rows / seconds,
                     "real_token_fraction": self.real / max(self.computed, 1.0)}
            self.start, self.real, self.computed, self.rows = now, 0.0, 0.0, 0
            if self.rank == 0:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")
                self.tracker.log({f"train/{k}": v for k, v in entry.items() if k != "step"}, step + 1)

    def close(self) -> None:
        self.bar.close()
        self.tracker.close()
