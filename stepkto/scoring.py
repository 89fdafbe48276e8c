"""The policy's log-probs of the completion tokens of (prompt, completion) rows, per completion and per step (r(x, y)
of (1) and r_k of (6) in stepkto_loss.py, paper Sec. 2.3), and a run's reference log-probs, computed once, cached."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from stepkto import distributed, jsonl, sharding
from stepkto_loss import step_logps


class Tokenized(NamedTuple):
    """One row of a forward pass as token ids (a training row, or a KL pair's prompt with another row's completion)."""

    prompt_ids: list[int]
    completion_ids: list[int]  # EOS included when the completion stopped
    step_ids: np.ndarray  # (len(completion_ids),) int64: step index of each completion token, -1 = none
    num_steps: int

    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def head_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of (N, H) hidden states: logit[target] - logsumexp(logits), in float32 at least."""
    logits = head(hidden)  # (N, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 log-probs are too coarse
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(dim=-1)  # (N,)


class CompletionLogProbs(torch.nn.Module):
    """A causal LM whose forward returns log p(token | prefix) of the completion tokens only, (N,). The head runs on
    those positions alone, in chunks whose float32 logits stay under ``chunk_mib`` MiB (a large vocabulary's would be
    the step's largest tensor), checkpointed under autograd. As the FSDP root it gathers the embedding / norm / head
    shards. ``autocast`` (e.g. torch.bfloat16): torch.autocast, weights in their own dtype, float32 log-probs."""

    def __init__(self, lm: torch.nn.Module, chunk_mib: float = 0.0, autocast: torch.dtype | None = None):
        super().__init__()
        self.lm = lm
        vocab = lm.get_output_embeddings().weight.shape[0]
        self.chunk_tokens = max(1, int(chunk_mib * 2**20 / (4 * vocab))) if chunk_mib else 0  # 0: one chunk
        self.autocast = autocast

    def forward(self, input_ids, attention_mask, positions, targets) -> torch.Tensor:
        with torch.autocast(input_ids.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            outputs = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            hidden = outputs.last_hidden_state.flatten(0, 1)[positions]  # (B, T, H) -> (N, H)
            head = self.lm.get_output_embeddings()
            if not 0 < self.chunk_tokens < len(targets):
                return head_logps(head, hidden, targets)
            chunks = zip(hidden.split(self.chunk_tokens), targets.split(self.chunk_tokens))
            if not torch.is_grad_enabled():
                return torch.cat([head_logps(head, h, t) for h, t in chunks])  # (N,)
            return torch.cat([checkpoint(head_logps, head, h, t, use_reentrant=False, preserve_rng_state=False)
                              for h, t in chunks])  # (N,)


class Batch(NamedTuple):
    input_ids: torch.Tensor  # (B, T) prompt + completion, right-padded
    attention_mask: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (N,) flat index b*T + t of the position whose logits predict each completion token
    targets: torch.Tensor  # (N,) the completion tokens
    token_rows: torch.Tensor  # (N,) row of each completion token
    token_cols: torch.Tensor  # (N,) index of the token within its completion
    step_ids: torch.Tensor  # (B, C) long: step of each completion token, -1 for none / padding
    step_mask: torch.Tensor  # (B, K) bool: real steps
    real_tokens: int
    computed_tokens: int


def collate(rows: list[Tokenized], pad_id: int, device: torch.device) -> Batch:
    """Right-padded token matrix plus flat indices of the completion tokens (numpy, no per-token loop)."""
    prompt_lens = np.array([len(r.prompt_ids) for r in rows])  # (B,)
    completion_lens = np.array([len(r.completion_ids) for r in rows])  # (B,)
    seq_lens = prompt_lens + completion_lens
    batch_size, max_len, max_completion = len(rows), int(seq_lens.max()), int(completion_lens.max())
    input_ids = np.full((batch_size, max_len), pad_id, dtype=np.int64)
    step_ids = np.full((batch_size, max_completion), -1, dtype=np.int64)
    for b, row in enumerate(rows):  # a loop over rows, not tokens
        input_ids[b, : seq_lens[b]] = row.prompt_ids + row.completion_ids
        step_ids[b, : completion_lens[b]] = row.step_ids
    token_rows = np.repeat(np.arange(batch_size), completion_lens)  # (N,)
    token_cols = np.arange(len(token_rows)) - np.repeat(np.cumsum(completion_lens) - completion_lens, completion_lens)
    # Causal LM: the logits at position t predict token t+1, so completion token j is scored at prompt_len + j - 1.
    positions = token_rows * max_len + np.repeat(prompt_lens, completion_lens) + token_cols - 1  # (N,)
    num_steps = np.array([r.num_steps for r in rows])
    arrays = dict(input_ids=input_ids, attention_mask=np.arange(max_len)[None, :] < seq_lens[:, None],
                  positions=positions, targets=input_ids.reshape(-1)[positions + 1], token_rows=token_rows,
                  token_cols=token_cols, step_ids=step_ids,
                  step_mask=np.arange(num_steps.max())[None, :] < num_steps[:, None])
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}
    return Batch(**tensors, real_tokens=int(seq_lens.sum()), computed_tokens=batch_size * max_len)


def completion_logps(policy: nn.Module, batch: Batch, span: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y|x) of each completion (B,), per-step log-probs (B, K) in the `span` convention of (6))."""
    token_logps = policy(batch.input_ids, batch.attention_mask, batch.positions, batch.targets)  # (N,)
    grid = token_logps.new_zeros(batch.step_ids.shape)  # (B, C), 0 at padding
    grid = grid.index_put((batch.token_rows, batch.token_cols), token_logps)  # differentiable scatter
    steps = step_logps(grid, batch.step_ids, batch.step_mask.size(1), span)  # (B, K)
    return grid.sum(dim=1), steps


class Reference(NamedTuple):
    """log pi_ref of every row and every KL pair of the plan, per step and in total (never per token)."""

    row_total: torch.Tensor  # (R,)
    row_steps: torch.Tensor  # (R, K_max) in the --step_span convention, 0 past a row's last step
    kl_total: torch.Tensor  # (P,) one per plan item, in plan order
    kl_steps: torch.Tensor  # (P, K_max) with --step_z0 step, else (P, 0)


def cached_reference(cache: Path, compute: Callable[[], Reference], rank: int) -> Reference:
    """The reference log-probs in ``cache`` (the run's own work folder: a resume reuses them), else ``compute()``'s."""
    if cache.exists():
        print(f"reference log-probs: loaded from {cache}", flush=True)
        return Reference(**torch.load(cache))
    reference = compute()
    if rank == 0:
        jsonl.write_atomic(cache, lambda f: torch.save(reference._asdict(), f))
    distributed.barrier()
    return reference


@torch.no_grad()
def score_rows(policy: nn.Module, rows: list[Tokenized], span: str, batch_size: int, env: distributed.Env, pad_id: int):
    """(totals (R,), steps (R, K_max)) of many rows: length-sorted batches, spread over the ranks."""
    order = sorted(range(len(rows)), key=lambda i: -rows[i].length())  # longest first: out of memory at once
    batches = sharding.chunked(order, batch_size)
    rounds = -(-len(batches) // env.world_size)
    local, dtype = {}, None
    for b in tqdm(range(env.rank, rounds * env.world_size, env.world_size), desc="reference", disable=env.rank != 0):
        # every FSDP forward all-gathers weights, so a rank with no batch left recomputes batch 0 and drops it
        indices = batches[b] if b < len(batches) else batches[0]
        totals, steps = completion_logps(policy, collate([rows[i] for i in indices], pad_id, env.device), span)
        dtype = totals.dtype
        if b < len(batches):
            local.update((i, (t, s[: rows[i].num_steps])) for i, t, s in zip(indices, totals.tolist(), steps.tolist()))
    totals = torch.zeros(len(rows), dtype=dtype)
    steps = torch.zeros(len(rows), max(r.num_steps for r in rows), dtype=dtype)
    for part in distributed.gather_objects(local):
        for i, (total, row) in part.items():
            totals[i] = total
            steps[i, : len(row)] = torch.tensor(row)
    return totals, steps
