"""Train a policy with SFT, KTO or Step-KTO (Lin et al., 2025, arXiv:2501.10799) in one file.

    python train.py --objective step-kto --model runs/M0 --data runs/iter1/labels.jsonl --output_dir runs/M1

is one Step-KTO iteration M_t -> M_{t+1} (paper Sec. 2.4; run.sh chains M0 -> M3) on label.py's output,
with pi_ref = M_t (--model, or --ref_model); ``--objective kto`` is the paper's KTO baseline, ``sft`` trains
the seed (``--model scratch``: the embedded default's tiny Llama and its tokenizer, --scratch_tokenizer). Under
torchrun (one node or several) the model is FSDP2-sharded, loaded from rank 0 shard by shard, and the result equals
one process with the same global batch:

    torchrun --nproc_per_node 8 train.py --objective step-kto --model M0 --data labels.jsonl --output_dir M1 \
        --mixed_precision bfloat16 --gradient_checkpointing true --per_device_batch_size 4

* ``sft``: rows {"id", "problem", "completion"}; the prompt is common.build_prompt(tokenizer, problem,
  --prompt_style); the loss is the mean NLL of the completion tokens + EOS over the global batch.
* ``kto`` / ``step-kto``: label.py rows {"id", "prompt", "completion", "finish_reason", "outcome"}, plus
  {"completions", "labels"} for step-kto (the outcome and step feedback of paper Sec. 2.1), scored on
  generate.py's sampled token ids where the row has them. The loss is stepkto_loss.py's (8) (Sec. 2.3;
  equation numbers (n) are stepkto_loss.py's): step-kto = outcome + step level; kto = step-kto with
  w_step = 0, on rows that may lack the step fields.

Reading order: Args; the data; the Step-KTO step; the training loop. Below the "plumbing" line: arguments,
reading rows, metrics, the reference cache, the policy's settings. What is not Step-KTO at all (processes, FSDP2,
mixed precision, LoRA, batch plan, optimizer, resume state, saving) is plumbing.py's; the log-probs are policy.py's.

Files: OUTPUT.resume/ while training: train_log.jsonl, reference_logps.pt (log pi_ref of every row and KL
pair, computed once) and the resume state every --save_every steps (state-<step>/, each rank its own shards, and
state.json; a rerun after a crash, even kill -9 of one rank, resumes from it and ends with the parameters of an
uninterrupted run). OUTPUT/ is written as OUTPUT.tmp and renamed when complete (model, tokenizer, train_log.jsonl,
train_args.json); a complete OUTPUT makes the script exit at once. A NaN / inf loss or gradient norm stops the run
before anything of that step is written.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import common
import models
import plumbing
import stepkto_loss as sk
import tracking
from common import DataError, UsageError, option
from plumbing import Env, PlanBatch, TrainingError, all_reduce_sums, build_plan, micro_batches
from policy import Pair, Reference, cached_reference, collate, completion_logps, pair_length, score_pairs, token_sums


@dataclass
class Args:
    objective: Literal["sft", "kto", "step-kto"] = option(help="What to train: sft, kto or step-kto.")
    model: str = option(help="Policy to start from: a save_pretrained folder, or 'scratch' (sft only: "
        "--scratch_tokenizer + tiny Llama).")
    data: str = option(help="Training JSONL: sft rows {id, problem, completion}; kto/step-kto rows from label.py.")
    output_dir: str = option(help="Where the trained model goes (never the --model folder).")
    ref_model: Optional[str] = option(None, help="Reference model pi_ref for kto/step-kto (default: --model).")
    prompt_style: common.PromptStyle = option("instruct", help="sft: "
        "common.PROMPT_TEMPLATES key used to build the prompt.")
    scratch_tokenizer: Literal["phrase", "char"] = option("phrase", help="--model scratch: 'char', one token per "
        "character, or 'phrase', where the built-in task's fixed strings (models.SCRATCH_PHRASES) are one token each "
        "too: 2.5x fewer positions per row, so every stage of the embedded loop runs faster.")
    hidden_size: int = option(256, help="--model scratch: hidden size (64 per attention head).")
    num_layers: int = option(4, help="--model scratch: decoder layers.")
    intermediate_size: int = option(768, help="--model scratch: MLP width.")
    max_len: int = option(512, help="--model scratch: max_position_embeddings.")
    beta: float = option(0.1, help="KTO beta: scale of the implied reward log pi/pi_ref.")
    lambda_d: float = option(1.0, help="KTO weight of desirable items (lambda_D).")
    lambda_u: float = option(1.0, help="KTO weight of undesirable items (lambda_U).")
    balance_lambdas: bool = option(True, help="Per level, weight the larger side down so that lambda_D * n_D = "
        "lambda_U * n_U over the data (the KTO paper's advice for unbalanced data); overrides --lambda_d/--lambda_u. "
        "Without it a weak policy (few right answers) collapses: pushing every log-prob down is the cheapest way to "
        "lower the loss.")
    w_outcome: float = option(1.0, help="step-kto: weight of the outcome-level loss (kto uses 1).")
    w_step: float = option(1.0, help="step-kto: weight of the step-level loss (kto uses 0).")
    nll_weight: float = option(1.0, help="kto/step-kto: add this times the mean NLL of the completions that are "
        "desirable at every level trained on (kto: right answer; step-kto: right answer and every step right), as in "
        "Iterative RPO (Pang et al. 2024). NOT part of Step-KTO: an anchor against likelihood displacement (README).")
    step_span: Literal["step", "prefix"] = option("step", help="Step reward over the step's own tokens (step) or the "
        "whole prefix through it (prefix).")
    step_aggregation: Literal["mean", "sum"] = option("mean", help="Step losses of one completion: mean or sum.")
    step_scope: Literal["all", "first_error"] = option("all", help="Steps the step level scores: all (as the paper's "
        "judge labels every step) or only through the first wrong one (first_error: stepkto_loss.through_first_error, "
        "for labels that mean nothing after an error).")
    step_z0: Literal["outcome", "step"] = option("outcome", help="Reference point of the step level: the outcome z0, "
        "or estimate_z0 over the KL pairs' step log-ratios.")
    per_device_batch_size: int = option(8, help="Rows per process per step; global batch = this * world size.")
    epochs: int = option(1, help="Passes over the data.")
    max_steps: int = option(0, help="Stop after this many optimizer steps (0: all epochs). The LR schedule spans the "
        "steps actually run.")
    lr: float = option(1e-5, help="Peak learning rate of AdamW (the recipe: README 'The recipe').")
    weight_decay: float = option(0.0, help="AdamW weight decay (matrices and embeddings only).")
    warmup_ratio: float = option(0.1, help="Fraction of the steps with a linear LR warmup.")
    lr_schedule: Literal["linear", "cosine"] = option("linear", help="LR decay after the warmup, to 0 at the end.")
    max_grad_norm: float = option(1.0, help="Clip the global gradient norm to this (inf: no clipping). The log's "
        "grad_norm is the norm before clipping.")
    seed: int = option(0, help="Seed of the batch plan, of --model scratch's init and of torch/numpy/random.")
    num_threads: int = option(0, help="torch.set_num_threads (0: torch's default).")
    dtype: Literal["float32", "bfloat16", "float64"] = option("float32", help="Parameter dtype of the loaded "
        "model(s) and of the saved one (float64: exact comparisons in tests). Weights trained in place must not be "
        "bfloat16 (refused): use --mixed_precision for bf16 compute. A LoRA base may be bfloat16 (peft's adapters are "
        "float32).")
    mixed_precision: Literal["none", "bfloat16"] = option("none", help="Compute dtype of every forward and backward, "
        "the weights, gradients and AdamW states staying in --dtype: under torchrun FSDP2's MixedPrecisionPolicy "
        "(bf16 parameters for compute, float32 gradient reduction), in one process torch.autocast. With --dtype "
        "float32: the way to train in bf16.")
    dist_timeout_minutes: float = option(30.0, help="Under torchrun: how long a collective waits for the other ranks "
        "before the job fails (NCCL's own default is 10 min; a slow filesystem can take longer to write a resume state).")
    log_every: int = option(10, help="Append metrics to train_log.jsonl every N steps.")
    save_every: int = option(100, help="Write the resume state every N steps (0: never).")
    gradient_checkpointing: bool = option(False, help="Recompute each layer's activations in backward: less memory, "
        "slower.")
    logits_chunk_mib: float = option(256.0, help="Compute the LM head and log-softmax over as many completion tokens "
        "at a time as keep their float32 logits under this many MiB (tokens x vocabulary x 4 bytes), recomputing them "
        "in backward (0: all at once). Matters for large vocabularies: 256 MiB is 1,365 tokens of SmolLM2's 49,152 "
        "entries.")
    optim: Literal["adamw", "adamw_fused"] = option("adamw", help="adamw: torch.optim.AdamW's default implementation; "
        "adamw_fused: one fused kernel over all tensors (TRL's default; about 10x faster updates on CPU for a 135M "
        "model, other rounding).")
    gradient_accumulation_steps: int = option(1, help="Micro-batches of --per_device_batch_size per optimizer step: "
        "the global batch is per_device_batch_size * world size * this, and the update equals one such batch computed "
        "at once (KTO's z0 is estimated over all of it, not per micro-batch).")
    lora_r: int = option(0, help="LoRA rank (peft): train rank-r adapters on the frozen policy (0: full fine-tuning). "
        "OUTPUT holds the model with the adapters merged, in float32 (float64 when trained in it; a bf16 merge "
        "drops most of a small update), and OUTPUT/adapter the adapters alone.")
    lora_alpha: float = option(16.0, help="--lora_r: LoRA scaling numerator (the update is alpha / r * B A).")
    lora_dropout: float = option(0.0, help="--lora_r: dropout on the adapters' input (peft's default 0: a rate > 0 "
        "keeps a dropped copy of every adapted layer's input for backward, +26%% peak memory and -25%% speed on "
        "SmolLM2-135M at batch 16, BENCHMARKS.md).")
    lora_target_modules: str = option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", help="--lora_r: "
        "comma-separated module names that get adapters (default: every linear layer of a Llama / Qwen / Mistral "
        "decoder, the LM head excepted).")
    report_to: tracking.ReportTo = option("none", help="Also send train_log.jsonl's metrics to "
        "TensorBoard or Weights & Biases (offline unless WANDB_MODE=online); the files end up in OUTPUT/tracking.")


class Levels(NamedTuple):
    """The levels of (8) that a kto / step-kto run trains. kto IS step-kto with w_step = 0; the one other
    difference is the row schema: kto rows may lack label.py's step fields, so their completions have no step."""

    w_outcome: float
    w_step: float
    row_steps: bool  # the rows carry steps and step labels (step-kto's schema)
    step_z0: bool  # the step level has its own reference point (2), over the KL pairs' steps (--step_z0 step)


def levels(args: Args) -> Levels:
    """Decided here, once: the KTO code reads Levels, never whether --objective is kto or step-kto."""
    if args.objective != "step-kto":
        return Levels(1.0, 0.0, row_steps=False, step_z0=False)
    return Levels(args.w_outcome, args.w_step, row_steps=True, step_z0=args.step_z0 == "step")


# ----------------------------------------------------------------------------- data (paper Sec. 2.1)
# Examples with their binary outcome and step labels, steps onto tokens, the KL pairs of each batch.


class Example(NamedTuple):
    pair: Pair
    desirable: bool  # outcome label (KTO); unused by sft
    step_labels: list[bool]  # (num_steps,); [] for sft and kto rows


def load_examples(args: Args, tokenizer) -> list[Example]:
    """The rows of --data as Examples (reading rows, below the plumbing line); bad rows raise DataError."""
    if args.objective == "sft":
        return [sft_example(tokenizer, row, args.prompt_style) for row in common.read_jsonl(args.data, common.SFT_ROW)]
    with_steps = levels(args).row_steps
    rows = common.read_numbered_jsonl(args.data, common.STEP_KTO_ROW if with_steps else common.KTO_ROW)
    return [kto_example(tokenizer, row, f"{args.data}:{line}", with_steps) for line, row in rows]


def steps_of_tokens(token_starts: list[int], spans: list[tuple[int, int]]) -> np.ndarray:
    """Step index of each completion token (the step_ids of (6)) from the character where each token starts.

    The rule for a token that straddles a step boundary: it belongs to the step in which its FIRST
    character lies, where a step runs from its own first character to the next step's (so the blank-line
    separator after a step stays with that step, and a token such as ".\n\n" ends the step it starts in);
    leading whitespace goes to step 0, and the stop token (which starts at the end of the text) to the last.
    -1 everywhere when the completion has no steps.
    """
    token_starts = np.asarray(token_starts, dtype=np.int64)  # (C,)
    if not spans:
        return np.full_like(token_starts, -1)
    span_starts = np.array([start for start, _ in spans], dtype=np.int64)  # (K,)
    return np.maximum(np.searchsorted(span_starts, token_starts, side="right") - 1, 0)  # (C,)


def kl_pair(prompt_example: Example, completion_example: Example, keep_steps: bool) -> Pair:
    """KTO's mismatched pair (x_j, y_{j-1}) of (2), which estimates the reference point z0 (KTO paper Sec. 4.1);
    keep_steps keeps the completion's steps, for the step level's own z0."""
    completion = completion_example.pair
    if keep_steps:
        return completion._replace(prompt_ids=prompt_example.pair.prompt_ids)
    no_steps = np.full(len(completion.completion_ids), -1)
    return Pair(prompt_example.pair.prompt_ids, completion.completion_ids, no_steps, 0)


def kl_pairs_of_batch(rows: list[int], positions, examples: list[Example], keep_steps: bool) -> list[Pair]:
    """Item j is paired with item j-1's completion, cyclically within the global batch (as TRL)."""
    return [kl_pair(examples[rows[j]], examples[rows[j - 1]], keep_steps) for j in positions]


@dataclass
class TrainData:
    examples: list[Example]
    plan: list[PlanBatch]
    kl_offsets: list[int]  # plan item index of the first KL pair of each step
    reference: Optional[Reference]
    pad_id: int
    levels: Levels  # levels(args), decided once
    lambdas: dict  # lambda_d, lambda_u, step_lambda_d, step_lambda_u for stepkto_loss


def prepare_data(args: Args, env: Env, tokenizer) -> TrainData:
    """Examples, batch plan and KTO weights; the reference log-probs come later (run: reference_logps)."""
    examples = load_examples(args, tokenizer)
    kto = args.objective != "sft"
    global_batch = args.per_device_batch_size * env.world_size * args.gradient_accumulation_steps
    lengths = [pair_length(e.pair) for e in examples]
    shards = env.world_size * args.gradient_accumulation_steps
    plan = build_plan(lengths, global_batch, shards, args.epochs, args.seed, min_batch_size=2 if kto else 1)
    plan = plan[: args.max_steps] if args.max_steps else plan
    if not plan:
        raise UsageError(f"{args.data}: {len(examples)} rows make no batch of {global_batch}: lower the batch size")
    offsets = np.cumsum([0] + [len(b.rows) for b in plan]).tolist()
    if env.rank == 0:
        fraction = plan_token_fraction(plan, examples, shards, with_kl=kto)
        print(f"{len(examples)} rows, {len(plan)} steps of {global_batch} rows", flush=True)
        print(f"length-grouped batches: {fraction:.1%} of the computed tokens are real (not padding)", flush=True)
    lambdas = level_lambdas(examples, args) if kto else {}
    if env.rank == 0 and kto:
        print("KTO weights: " + ", ".join(f"{k} {v:.3f}" for k, v in lambdas.items()), flush=True)
    return TrainData(examples, plan, offsets, None, tokenizer.pad_token_id, levels(args), lambdas)


# ----------------------------------------------------------------------------- the Step-KTO step (paper Sec. 2.3)
# The reference point z0 (2), each micro-batch's share of the loss (8) through stepkto_loss, the NLL anchor.


def kto_step(policy, step: int, batch: PlanBatch, data: TrainData, args: Args, env: Env) -> tuple[dict, dict]:
    """One global batch of Step-KTO (kto: w_step = 0): z0 (2) over all of it, then each of this rank's
    micro-batches' share of (8) (+ the NLL anchor) and its backward. Returns (metric sums to add over the ranks,
    the reference points, the same on every rank)."""
    micros = micro_batches(len(batch.rows), env, args.gradient_accumulation_steps)
    z0s, sums = reference_point(policy, step, batch, micros, data, args, env)  # (2)
    counts = global_counts(batch, data)
    for positions in micros:
        loss, micro_sums = kto_micro_batch(policy, positions, batch, data, args, env, z0s, counts)
        loss.backward()
        sums = add_sums(sums, micro_sums)
    z0, z0_step = z0s
    return sums, {"kl/z0": z0, **({} if z0_step is None else {"kl/z0_step": z0_step})}


@torch.no_grad()
def reference_point(policy, step: int, batch: PlanBatch, micros: list[range], data: TrainData, args: Args,
                    env: Env):
    """((z0, z0_step), token sums of the KL forwards): (2) from the policy's log-ratios on the mismatched KL
    pairs, under no_grad (as TRL); z0_step (None unless --step_z0 step) from the pairs' step log-ratios.

    Estimated over the whole global batch: every micro-batch of every rank (estimate_z0 all-reduces over
    the ranks), so that gradient accumulation computes the update of one large batch exactly. TRL
    estimates it per micro-batch instead; with small micro-batches that estimate is noisier, and the
    update then depends on how the batch was cut, which accumulation is meant not to change.
    """
    own_step_z0 = data.levels.step_z0
    outcome, steps, sums = [], [], {}
    for positions in micros:
        kl = collate(kl_pairs_of_batch(batch.rows, positions, data.examples, own_step_z0), data.pad_id, env.device)
        sums = add_sums(sums, token_sums([kl]))
        items = torch.tensor([data.kl_offsets[step] + j for j in positions])
        totals, step_logps = completion_logps(policy, kl, args.step_span)  # (B,), (B, K)
        outcome.append(totals - data.reference.kl_total[items].to(totals.device))  # (1) r(x, y')
        ref_steps = data.reference.kl_steps[items, : kl.step_mask.size(1)].to(totals.device)
        steps.append((step_logps - ref_steps)[kl.step_mask])  # (6) r_k of the pairs' real steps
    z0 = sk.estimate_z0(torch.cat(outcome))  # (2) over the whole accumulated batch
    z0_step = sk.estimate_z0(torch.cat(steps)) if own_step_z0 else None  # (2) over the steps
    return (z0, z0_step), sums


def global_counts(batch: PlanBatch, data: TrainData) -> sk.LevelSums:
    """The counts of the global batch's means, which StepKTOTerms.loss needs before the first backward and which
    need no forward: n_outcome, its completions, the denominator of (5); n_step, those with a step (every
    --step_scope scores a completion's first step), that of (7)."""
    n_step = sum(data.examples[i].pair.num_steps > 0 for i in batch.rows)
    return sk.LevelSums(*torch.tensor([0.0, len(batch.rows), 0.0, n_step]))


def kto_micro_batch(policy, positions: range, batch: PlanBatch, data: TrainData, args: Args, env: Env, z0s,
                    counts: torch.Tensor):
    """(loss, metric sums) of one micro-batch: its share of the global batch's (8), plus the NLL anchor."""
    rows = torch.tensor([batch.rows[j] for j in positions])
    examples = [data.examples[i] for i in rows.tolist()]
    main = collate([e.pair for e in examples], data.pad_id, env.device)
    ref, device, num_steps = data.reference, env.device, main.step_mask.size(1)
    totals, steps = completion_logps(policy, main, args.step_span)  # (B,), (B, K) log pi
    step_labels = step_label_tensor(examples, num_steps, device)  # (B, K)
    (z0, z0_step), weights = z0s, data.levels
    terms, metrics = sk.stepkto_loss(
        outcome_logratios=totals - ref.row_total[rows].to(device),  # (1) (B,) r(x, y)
        outcome_labels=torch.tensor([e.desirable for e in examples], device=device),
        step_logratios=steps - ref.row_steps[rows, :num_steps].to(device),  # (6) (B, K) r_k
        step_labels=step_labels, step_mask=scored_steps(step_labels, main.step_mask, args),  # K_i of (7)
        z0=z0, z0_step=z0_step, beta=args.beta, **data.lambdas, w_outcome=weights.w_outcome, w_step=weights.w_step,
        step_aggregation=args.step_aggregation, reduction="none",
    )
    # (5) and (7) over the GLOBAL counts: the shares of all micro-batches of all ranks add up to the global
    # batch's (8). Times world_size because FSDP averages the gradients over the ranks.
    loss = terms.loss(counts) * env.world_size
    sums = level_sums(terms.sums()) | {k: v for k, v in metrics.items() if not k.startswith("kl/")} | token_sums([main])
    if args.nll_weight:
        nll, sums["loss/nll"], sums["items/nll_tokens"] = anchor_nll(totals, examples, batch, data, env)
        loss = loss + args.nll_weight * nll
    sums["loss/total"] = loss.detach() / env.world_size  # summed over micro-batches and ranks: (8) + anchor
    return loss, sums


def scored_steps(step_labels: torch.Tensor, step_mask: torch.Tensor, args: Args) -> torch.Tensor:
    """(B, K) bool: K_i of (7), the real steps that the step level scores (--step_scope)."""
    return sk.through_first_error(step_labels, step_mask) if args.step_scope == "first_error" else step_mask


def step_label_tensor(examples: list[Example], num_steps: int, device) -> torch.Tensor:
    labels = np.zeros((len(examples), num_steps), dtype=bool)  # (B, K), padding steps False (masked anyway)
    for b, example in enumerate(examples):
        labels[b, : len(example.step_labels)] = example.step_labels
    return torch.from_numpy(labels).to(device)


def level_lambdas(examples: list[Example], args: Args) -> dict:
    """lambda_D / lambda_U of (3) at the outcome and the step level, from --lambda_d/--lambda_u or balanced
    per level over the whole data."""
    if not args.balance_lambdas:
        return dict(lambda_d=args.lambda_d, lambda_u=args.lambda_u)
    n_d = sum(e.desirable for e in examples)
    lengths = torch.tensor([len(e.step_labels) for e in examples])  # (N,)
    labels = step_label_tensor(examples, max(lengths.tolist(), default=0), "cpu")  # (N, K)
    scored = scored_steps(labels, torch.arange(labels.size(1)) < lengths[:, None], args)  # (N, K)
    steps_d, steps_all = int((labels & scored).sum()), int(scored.sum())
    outcome, step = balanced_lambdas(n_d, len(examples) - n_d), balanced_lambdas(steps_d, steps_all - steps_d)
    return dict(lambda_d=outcome[0], lambda_u=outcome[1], step_lambda_d=step[0], step_lambda_u=step[1])


def balanced_lambdas(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(lambda_D, lambda_U) of (3) with lambda_D * n_D = lambda_U * n_U, the larger side weighted down (KTO paper)."""
    if min(n_desirable, n_undesirable) == 0:
        return 1.0, 1.0
    if n_undesirable > n_desirable:
        return 1.0, n_desirable / n_undesirable
    return n_undesirable / n_desirable, 1.0


def anchor_nll(totals: torch.Tensor, examples: list[Example], batch: PlanBatch, data: TrainData, env: Env):
    """--nll_weight, NOT part of Step-KTO (README): (this micro-batch's share of the global batch's mean NLL
    over the tokens of the fully desirable completions, its sum, its tokens). totals: (B,) log pi(y|x)."""
    flags = [fully_desirable(e) for e in examples]
    keep = torch.tensor(flags, device=totals.device)  # (B,)
    tokens = sum(len(e.pair.completion_ids) for e, kept in zip(examples, flags) if kept)
    global_tokens = sum(len(data.examples[i].pair.completion_ids) for i in batch.rows
                        if fully_desirable(data.examples[i]))
    nll_sum = -(totals * keep).sum()
    return share_of_global_mean(nll_sum, global_tokens, env), nll_sum.detach(), tokens


def fully_desirable(example: Example) -> bool:
    """Desirable at every level: the right answer and every step right (kto rows have no step labels)."""
    return example.desirable and all(example.step_labels)


def share_of_global_mean(local_sum: torch.Tensor, global_count: int, env: Env) -> torch.Tensor:
    """This micro-batch's share of a mean over the global batch: the shares' gradients add up to the mean's.
    Times world_size because FSDP averages the gradients over the ranks."""
    return local_sum * env.world_size / max(global_count, 1)


def sft_step(policy, step: int, batch: PlanBatch, data: TrainData, args: Args, env: Env) -> tuple[dict, dict]:
    """Mean NLL of the completion tokens (+ EOS) over the GLOBAL batch; backward of each micro-batch."""
    global_tokens = sum(len(data.examples[i].pair.completion_ids) for i in batch.rows)
    sums = {}
    for positions in micro_batches(len(batch.rows), env, args.gradient_accumulation_steps):
        main = collate([data.examples[batch.rows[j]].pair for j in positions], data.pad_id, env.device)
        token_logps = policy(main.input_ids, main.attention_mask, main.positions, main.targets)  # (N,)
        share_of_global_mean(-token_logps.sum(), global_tokens, env).backward()
        sums = add_sums(sums, {"loss/nll": -token_logps.detach().sum(), "items/tokens": len(token_logps)})
        sums = add_sums(sums, token_sums([main]))
    return sums, {}


# ----------------------------------------------------------------------------- the training loop (paper Sec. 2.4)
# kto / step-kto: one run is one iteration M_t -> M_{t+1}, with pi_ref = M_t (--model, or --ref_model) throughout.


def run(args: Args, env: Env) -> None:
    """One iteration M_t -> M_{t+1} (kto / step-kto; pi_ref = M_t = --model unless --ref_model), or SFT."""
    common.seed_everything(args.seed)
    tokenizer = tokenizer_of(args)
    data = prepare_data(args, env, tokenizer)  # bad data fails here, before anything is written
    work = Path(args.output_dir + ".resume")
    work.mkdir(parents=True, exist_ok=True)
    plumbing.check_shared_folder(work, env)  # every rank decides from this folder's files: it must be one folder
    policy = plumbing.build_policy(policy_spec(args, tokenizer, args.model, lora_settings(args)), env, trainable=True)
    policy.train()
    if args.objective != "sft":  # before any update and before loading a resume state: pi_ref = initial policy
        data.reference = reference_logps(args, env, policy, data, work, tokenizer)
    optimizer, scheduler = plumbing.make_optimizer(policy, len(data.plan), args.lr, args.weight_decay,
                                                   args.warmup_ratio, args.lr_schedule, args.optim == "adamw_fused")
    start_step = load_resume_state(policy, optimizer, scheduler, args, env, work)
    train(policy, optimizer, scheduler, data, args, env, work, start_step)
    config = asdict(args) | {"world_size": env.world_size}  # OUTPUT/train_args.json
    plumbing.save_final_model(policy, tokenizer, Path(args.output_dir), work, config, lora_settings(args), args.model)


def train(policy, optimizer, scheduler, data: TrainData, args: Args, env: Env, work: Path, start_step: int) -> None:
    step_fn, summarize = (sft_step, sft_metrics) if args.objective == "sft" else (kto_step, kto_metrics)
    window = plumbing.Throughput()
    bar = tqdm(total=len(data.plan), initial=start_step, desc=args.objective, disable=env.rank != 0)
    # rank 0 logs; into the work folder, which save_final_model moves to OUTPUT/tracking. A resumed run drops what
    # was logged after its resume state (steps > start_step).
    tracker = tracking.open_tracker(args.report_to if env.rank == 0 else "none", work / "tracking",
                                    Path(args.output_dir).name, asdict(args), start_step + 1)
    for step in range(start_step, len(data.plan)):
        batch, lr = data.plan[step], scheduler.get_last_lr()[0]
        local_sums, shared = step_fn(policy, step, batch, data, args, env)  # forwards + backwards
        sums = all_reduce_sums(local_sums, env.device)
        metrics = summarize(sums, args, data.levels) | {key: float(value) for key, value in shared.items()}
        check_finite("loss", metrics["loss/total"], step, work)
        grad_norm = plumbing.clip_gradients(policy, args.max_grad_norm)
        check_finite("gradient norm", grad_norm, step, work)
        optimizer.step()
        # Free the gradients now, not before the next backward: held through the next forward they would
        # add a model's worth of memory to its activation peak (and fragment the CPU heap between steps).
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        window.add(sums["tokens/real"], sums["tokens/computed"], len(batch.rows))
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss/total']:.4f}")
        if (step + 1) % args.log_every == 0 or step + 1 == len(data.plan):
            entry = {"step": step + 1, "epoch": batch.epoch, "lr": lr, "grad_norm": grad_norm, **metrics}
            entry |= window.stats()
            if env.rank == 0:
                plumbing.append_log(work / "train_log.jsonl", entry)
                tracker.log({f"train/{k}": v for k, v in entry.items() if k != "step"}, step + 1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < len(data.plan):
            plumbing.save_train_state(work, policy, optimizer, scheduler, step + 1, run_signature(args, env),
                                      adapters_only=bool(args.lora_r))
    bar.close()
    tracker.close()


# ============ plumbing: arguments, reading rows, metrics, log-probs, the reference cache, the policy ============
# (what is not Step-KTO at all is plumbing.py's)


# Resuming with other values of these is safe: they do not change what is computed.
RESUME_FREE_ARGS = ("num_threads", "log_every", "save_every", "gradient_checkpointing", "logits_chunk_mib", "report_to",
                    "dist_timeout_minutes")
LORA_DEFAULTS = {name: Args.__dataclass_fields__[name].default
                 for name in ("lora_alpha", "lora_dropout", "lora_target_modules")}
STEP_LEVEL_DEFAULTS = {name: Args.__dataclass_fields__[name].default
                       for name in ("w_step", "step_span", "step_aggregation", "step_scope", "step_z0")}


def check_args(args: Args) -> None:
    """Fail before loading anything on arguments that cannot work."""
    common.check_choices(args)
    if args.model == "scratch" and args.objective != "sft":
        raise UsageError("--model scratch only makes sense with --objective sft (KTO needs a trained policy)")
    out = Path(args.output_dir).resolve()
    for name in ("model", "ref_model"):
        path = getattr(args, name)
        if path and path != "scratch" and Path(path).resolve() == out:
            raise UsageError(f"--output_dir {args.output_dir} is --{name}: training would overwrite its own input")
    positive = ("per_device_batch_size", "epochs", "log_every", "lr", "max_grad_norm", "gradient_accumulation_steps")
    for name in positive:
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name} must be > 0, got {getattr(args, name)}")
    if not (0 < args.beta < math.inf) or args.lambda_d < 0 or args.lambda_u < 0:
        got = f"{args.beta}, {args.lambda_d}, {args.lambda_u}"
        raise UsageError(f"need 0 < --beta < inf and --lambda_d, --lambda_u >= 0; got {got}")
    weights = levels(args)
    if min(weights.w_outcome, weights.w_step) < 0 or weights.w_outcome == weights.w_step == 0:
        raise UsageError(f"need --w_outcome, --w_step >= 0 and not both 0; got {args.w_outcome}, {args.w_step}")
    if args.max_steps < 0 or args.save_every < 0 or args.logits_chunk_mib < 0 or not 0 <= args.warmup_ratio < 1:
        raise UsageError("need --max_steps, --save_every, --logits_chunk_mib >= 0 and 0 <= --warmup_ratio < 1")
    if args.dtype == "bfloat16" and not args.lora_r:
        # bf16 keeps 8 bits of mantissa: an update under ~1/256 of a weight rounds away. Measured (README
        # "Mixed precision"): at lr 5e-7, one AdamW step left 99.7% of SmolLM2-135M's bf16 weights unchanged.
        raise UsageError("--dtype bfloat16 would train bfloat16 weights, which lose every AdamW update smaller than "
                         "1/256 of the weight: use --dtype float32 --mixed_precision bfloat16")
    if args.dtype == "float64" and args.mixed_precision != "none":
        raise UsageError("--mixed_precision bfloat16 needs --dtype float32 weights (autocast casts float32 only): "
                         "use --dtype float32")
    check_ignored_options(args)


def check_ignored_options(args: Args) -> None:
    """No option may silently do nothing: refuse the ones the other arguments switch off."""
    if args.balance_lambdas and (args.lambda_d, args.lambda_u) != (1.0, 1.0):
        raise UsageError("--lambda_d / --lambda_u are ignored while --balance_lambdas is on: "
                         "add --balance_lambdas false to set them")
    changed = [name for name, default in LORA_DEFAULTS.items() if getattr(args, name) != default]
    if args.lora_r < 0 or (args.lora_r == 0 and changed):
        raise UsageError(f"--{', --'.join(changed) or 'lora_r'} need --lora_r > 0 (LoRA is off at 0)")
    if args.lora_r and args.model == "scratch":
        raise UsageError("--lora_r needs a trained --model: adapters on a random model train nothing useful")
    step_level = [name for name, default in STEP_LEVEL_DEFAULTS.items() if getattr(args, name) != default]
    if args.objective != "step-kto" and step_level:
        raise UsageError(f"--{', --'.join(step_level)}: only --objective step-kto has a step level")


def main(args: Args) -> None:
    check_args(args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    plumbing.run_in_process_group(functools.partial(run_unless_done, args), args.dist_timeout_minutes)


def run_unless_done(args: Args, env: Env) -> None:
    """run(), unless OUTPUT is already complete. Every rank looks and all decide together: a rank that exits
    alone would leave the others waiting in a collective."""
    out = Path(args.output_dir)
    state = "complete" if models.is_complete_model_dir(out) else "occupied" if out.exists() and any(out.iterdir()) \
        else "absent"
    states = plumbing.gather_objects(state)
    if len(set(states)) > 1:
        raise UsageError(f"{out} is {states[0]} for rank 0 but not for every rank ({states}): --output_dir must be "
                         "one folder that all nodes share")
    if state == "complete":
        print(f"{out} is already a complete checkpoint: nothing to do", flush=True)
    elif state == "occupied":
        raise UsageError(f"{out} exists, is not empty and is not a complete checkpoint: move it away first")
    else:
        run(args, env)


def check_finite(name: str, value: float, step: int, work: Path) -> None:
    if not math.isfinite(value):
        raise TrainingError(
            f"step {step + 1}: the {name} is {value}; stopping before the update. Nothing of this step was "
            f"written: --model and the last resume state in {work} (if any) are untouched. "
            "Lower --lr (or check the data) and rerun."
        )


# ----------------------------------------------------------------------------- reading rows


def sft_example(tokenizer, row: dict, prompt_style: str) -> Example:
    prompt = common.build_prompt(tokenizer, row["problem"], prompt_style)
    prompt_ids = common.encode_prompt(tokenizer, prompt)
    completion_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Example(Pair(prompt_ids, completion_ids, np.full(len(completion_ids), -1), 0), True, [])


def kto_example(tokenizer, row: dict, where: str, with_steps: bool) -> Example:
    """One label.py row -> Example, scoring the sampled ids when the row has them; raises DataError naming
    file:line and field."""
    if row["finish_reason"] not in ("stop", "length"):
        raise DataError(f"{where}: field 'finish_reason' must be 'stop' or 'length', got {row['finish_reason']!r}")
    spans = []
    if with_steps:  # label.py writes the spans; only rows from elsewhere are split here
        spans = [tuple(s) for s in row["step_spans"]] if "step_spans" in row else common.step_spans(row["completion"])
        check_step_fields(row, len(spans), where)
    has_ids = "completion_ids" in row
    prompt_ids, completion_ids, offsets = sampled_tokens(row, where) if has_ids else tokenized_text(tokenizer, row)
    if not prompt_ids:
        raise DataError(f"{where}: field 'prompt' is empty: the first completion token would have no context")
    step_ids = steps_of_tokens(offsets, spans)
    labels = row["labels"] if with_steps else []
    return Example(Pair(prompt_ids, completion_ids, step_ids, len(spans)), row["outcome"], labels)


def tokenized_text(tokenizer, row: dict) -> tuple[list[int], list[int], list[int]]:
    """For rows that were not sampled by generate.py (no ids): tokenize prompt and completion, EOS appended
    when the completion stopped. With a BPE tokenizer these ids may differ from what a policy sampled."""
    prompt_ids = common.encode_prompt(tokenizer, row["prompt"])
    encoding = tokenizer(row["completion"], add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], [start for start, _ in encoding["offset_mapping"]]
    if row["finish_reason"] == "stop":  # the model chose to stop: EOS is part of what is rewarded
        ids, offsets = ids + [tokenizer.eos_token_id], offsets + [len(row["completion"])]
    return prompt_ids, ids, offsets


def sampled_tokens(row: dict, where: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, completion ids, completion offsets) exactly as generate.py sampled them."""
    for name in ("prompt_ids", "completion_ids", "completion_offsets"):
        values = row.get(name)
        if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise DataError(f"{where}: field '{name}' must be a list of integers (generate.py writes it)")
    if len(row["completion_offsets"]) != len(row["completion_ids"]):
        raise DataError(f"{where}: field 'completion_offsets' has {len(row['completion_offsets'])} items, "
                        f"'completion_ids' {len(row['completion_ids'])}: one offset per token")
    return row["prompt_ids"], row["completion_ids"], row["completion_offsets"]


def check_step_fields(row: dict, num_spans: int, where: str) -> None:
    labels = row["labels"]
    if not all(isinstance(label, bool) for label in labels):
        raise DataError(f"{where}: field 'labels' must be a list of booleans")
    for name in ("labels", "completions"):
        if len(row[name]) != num_spans:
            raise DataError(
                f"{where}: field '{name}' has {len(row[name])} items but the completion has {num_spans} steps "
                "(common.step_spans: steps are separated by blank lines)"
            )


# ----------------------------------------------------------------------------- logged metrics


def add_sums(total: dict, part: dict) -> dict:
    return {key: total.get(key, 0) + part.get(key, 0) for key in total.keys() | part.keys()}


def level_sums(sums: sk.LevelSums) -> dict:
    return {f"level/{name}": value for name, value in sums._asdict().items()}


def kto_metrics(sums: dict, args: Args, weights: Levels) -> dict[str, float]:
    """The global batch's (5), (7), (8) (+ anchor), rewards and counts, from the sums added over the ranks."""
    totals = sk.LevelSums(*(torch.tensor(sums[f"level/{name}"]) for name in sk.LevelSums._fields))
    metrics = totals.loss_metrics(weights.w_outcome, weights.w_step) | sk.reward_means(sums)
    metrics = {key: float(value) for key, value in metrics.items()}
    metrics["loss/total"] = sums["loss/total"]  # the backpropagated shares of (8) + anchor, added up
    if args.nll_weight:
        metrics["loss/nll"] = sums["loss/nll"] / max(sums["items/nll_tokens"], 1)
    return metrics


def sft_metrics(sums: dict, args: Args, weights: Levels) -> dict[str, float]:
    return {"loss/total": sums["loss/nll"] / sums["items/tokens"]}


def plan_token_fraction(plan: list[PlanBatch], examples: list[Example], shards: int, with_kl: bool) -> float:
    """Fraction of the computed (padded) token positions that are real tokens, over every forward of the plan."""
    real = computed = 0
    for batch in plan:
        for shard in range(shards):  # a shard is one micro-batch of one rank
            positions = micro_batches(len(batch.rows), Env(shard, shards, torch.device("cpu")), 1)[0]
            forwards = [[examples[batch.rows[j]].pair for j in positions]]
            if with_kl:
                forwards.append(kl_pairs_of_batch(batch.rows, positions, examples, False))
            for pairs in forwards:
                lengths = [pair_length(p) for p in pairs]
                real, computed = real + sum(lengths), computed + len(lengths) * max(lengths)
    return real / max(computed, 1)


# ----------------------------------------------------------------------------- reference log-probs


def reference_logps(args: Args, env: Env, policy, data: TrainData, work: Path, tokenizer) -> Reference:
    """log pi_ref of all rows and KL pairs, ONCE per run, before any update; cached in the work folder.

    Without --ref_model the (still untrained) policy is the reference, so no second model is loaded;
    otherwise the reference is loaded (sharded as the policy), used and freed before training starts.
    """
    def compute() -> Reference:
        separate = args.ref_model and Path(args.ref_model).resolve() != Path(args.model).resolve()
        spec = policy_spec(args, tokenizer, args.ref_model, None)
        scorer = plumbing.build_policy(spec, env, trainable=False) if separate else policy
        kl_pairs = [p for batch in data.plan
                    for p in kl_pairs_of_batch(batch.rows, range(len(batch.rows)), data.examples, data.levels.step_z0)]
        scorer.eval()
        pairs = [e.pair for e in data.examples] + kl_pairs
        totals, steps = score_pairs(scorer, pairs, args.step_span, args.per_device_batch_size, env, data.pad_id)
        if hasattr(policy, "reshard"):
            # FSDP2 keeps the root's parameters gathered after a forward; the optimizer must be built on the
            # sharded parameters, or it would update a temporary all-gather buffer.
            policy.reshard()
        policy.train()
        del scorer
        gc.collect()
        rows = len(data.examples)
        kl_steps = steps[rows:, : max((p.num_steps for p in kl_pairs), default=0)]
        return Reference(totals[:rows], steps[:rows], totals[rows:], kl_steps)

    return cached_reference(work / "reference_logps.pt", reference_fingerprint(args, data.plan), compute, env.rank)


def reference_fingerprint(args: Args, plan: list[PlanBatch]) -> str:
    """What the cached reference log-probs depend on: data bytes, reference model, span and the plan."""
    digest = hashlib.sha256(Path(args.data).read_bytes())
    ref = str(Path(args.ref_model or args.model).resolve())
    settings = [ref, args.objective, args.step_span, args.step_z0, args.dtype, args.mixed_precision,
                [b.rows for b in plan]]
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the policy, resume


def tokenizer_of(args: Args):
    """--model's tokenizer, or for --model scratch the --scratch_tokenizer built here."""
    if args.model != "scratch":
        return models.load_tokenizer(args.model)
    return models.make_char_tokenizer(models.SCRATCH_PHRASES if args.scratch_tokenizer == "phrase" else ())


def policy_spec(args: Args, tokenizer, model: str, lora: Optional[plumbing.Lora]) -> plumbing.PolicySpec:
    """How plumbing.build_policy builds ``model`` (--model, or --ref_model) with this run's settings."""
    def load_lm(meta: bool) -> nn.Module:
        if model != "scratch":
            return models.load_model(model, args.dtype, meta=meta)
        sizes = dict(hidden_size=args.hidden_size, num_layers=args.num_layers, intermediate_size=args.intermediate_size)
        lm = models.make_tiny_llama(tokenizer, **sizes, max_len=args.max_len, seed=args.seed, meta=meta)
        return lm.to(getattr(torch, args.dtype))

    return plumbing.PolicySpec(load_lm, lora, args.gradient_checkpointing, args.logits_chunk_mib, args.mixed_precision)


def lora_settings(args: Args) -> Optional[plumbing.Lora]:
    """--lora_r and its settings (None: full fine-tuning)."""
    return plumbing.Lora(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules) if args.lora_r else None


def run_signature(args: Args, env: Env) -> dict:
    """What a resume state must have been written with: every argument that changes what is computed."""
    signature = {k: v for k, v in asdict(args).items() if k not in RESUME_FREE_ARGS}
    return signature | {"world_size": env.world_size}


def load_resume_state(policy, optimizer, scheduler, args: Args, env: Env, work: Path) -> int:
    """Restore the sharded resume state a killed run left, if any; returns the number of steps already done."""
    step = plumbing.load_train_state(work, policy, optimizer, scheduler, run_signature(args, env), bool(args.lora_r))
    if step and env.rank == 0:
        plumbing.trim_log(work / "train_log.jsonl", step)
        print(f"resuming from {work} after step {step}", flush=True)
    return step


if __name__ == "__main__":
    common.run_cli(Args, main)
    plumbing.exit_under_torchrun()
