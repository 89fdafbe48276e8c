"""Train a policy with SFT, KTO or Step-KTO (Lin et al., 2025, arXiv:2501.10799) in one file.

    python train.py --objective sft --model scratch --data runs/data/sft.jsonl --output_dir runs/M0
    python train.py --objective step-kto --model runs/M0 --data runs/iter1/labels.jsonl --output_dir runs/M1
    torchrun --nproc_per_node 8 train.py --objective step-kto --model M0 --data labels.jsonl --output_dir M1 \\
        --mixed_precision bfloat16 --gradient_checkpointing true --per_device_batch_size 4

sft trains the seed (--model scratch: a tiny Llama) on the mean NLL of the completion tokens + EOS. step-kto is one
iteration M_t -> M_{t+1} (paper Sec. 2.4; run.sh chains M0 -> M3), pi_ref = M_t, on label.py's rows (Sec. 2.1),
with stepkto_loss.py's loss (8) (Sec. 2.3; the equation numbers (n) are its); kto is step-kto with w_step = 0.
Under torchrun (FSDP2, stepkto/distributed.py) the result equals one process with the same global batch.
"""

from __future__ import annotations

import functools
import gc
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from stepkto import checkpoints, cli, distributed, jsonl, models, options, prompting, provenance, sharding, tracking
from stepkto.cli import UsageError, option
from stepkto.distributed import Env, PlanBatch, build_plan
from stepkto.jsonl import DataError
from stepkto.scoring import Batch, CompletionLogProbs, Reference, Tokenized, cached_reference, collate, \
    completion_logps, score_rows
from stepkto_loss import LevelSums, estimate_z0, reward_means, stepkto_loss, through_first_error


@dataclass
class Args:
    objective: Literal["sft", "kto", "step-kto"] = option(help="What to train: sft, kto or step-kto.")
    model: str = option(help="Policy to start from: a save_pretrained folder, or 'scratch' (sft only: a tiny Llama).")
    data: str = option(help="Training JSONL: sft rows {id, problem, completion}; kto/step-kto rows from label.py.")
    output_dir: str = option(help="Where the trained model goes (never the --model folder).")
    ref_model: Optional[str] = option(None, help="Reference model pi_ref for kto/step-kto (default: --model).")
    prompt_style: prompting.PromptStyle = option("instruct", help="sft: the prompt (prompting.PROMPT_TEMPLATES key).")
    scratch_tokenizer: Literal["phrase", "char"] = option("phrase", help="--model scratch: chars, or task phrases too.")
    hidden_size: int = option(256, help="--model scratch: hidden size (64 per attention head).")
    num_layers: int = option(4, help="--model scratch: decoder layers.")
    intermediate_size: int = option(768, help="--model scratch: MLP width.")
    beta: float = option(0.1, help="KTO beta: scale of the implied reward log pi/pi_ref.")
    lambda_d: float = option(1.0, help="KTO weight of desirable items (lambda_D).")
    lambda_u: float = option(1.0, help="KTO weight of undesirable items (lambda_U).")
    balance_lambdas: bool = option(True, help="Per level, lambda_D * n_D = lambda_U * n_U over the data (KTO paper).")
    w_outcome: float = option(1.0, help="step-kto: weight of the outcome-level loss (kto: 1).")
    w_step: float = option(1.0, help="step-kto: weight of the step-level loss (kto: 0).")
    nll_weight: float = option(1.0, help="NLL weight on fully desirable rows (Iterative RPO's anchor; not Step-KTO's).")
    step_span: Literal["step", "prefix"] = option("step", help="Step reward over the step's tokens or the prefix.")
    step_aggregation: Literal["mean", "sum"] = option("mean", help="Step losses of one completion: mean or sum.")
    step_scope: Literal["all", "first_error"] = option("all", help="Steps scored: all, or through the first wrong.")
    unjudged_steps: Literal["ignore", "wrong"] = option("ignore", help="A step without a verdict: unscored or wrong.")
    step_z0: Literal["outcome", "step"] = option("outcome", help="Step z0: the outcome's, or from KL pairs' steps.")
    per_device_batch_size: int = option(8, help="Rows per process per step; global batch = this * world size.")
    epochs: int = option(1, help="Passes over the data.")
    max_steps: int = option(0, help="Stop after this many optimizer steps (0: all epochs; the LR schedule spans them).")
    lr: float = option(1e-5, help="Peak learning rate of AdamW (the recipe: README 'The recipe').")
    weight_decay: float = option(0.0, help="AdamW weight decay (matrices and embeddings only).")
    warmup_ratio: float = option(0.1, help="Fraction of the steps with a linear LR warmup.")
    lr_schedule: Literal["linear", "cosine"] = option("linear", help="LR decay after the warmup, to 0 at the end.")
    max_grad_norm: float = option(1.0, help="Clip the global gradient norm to this (inf: no clipping).")
    seed: int = option(0, help="Seed of the batch plan, of --model scratch's init and of torch/numpy/random.")
    num_threads: int = option(0, help="torch.set_num_threads (0: torch's default).")
    dtype: Literal["float32", "bfloat16", "float64"] = option("float32", help="Weights' dtype (bfloat16: LoRA only).")
    mixed_precision: Literal["none", "bfloat16"] = option("none", help="Compute dtype; weights stay in --dtype.")
    log_every: int = option(10, help="Append metrics to train_log.jsonl every N steps.")
    save_every: int = option(100, help="Write the resume state every N steps (0: never).")
    gradient_checkpointing: bool = option(False, help="Recompute each layer's activations in backward: less memory.")
    logits_chunk_mib: float = option(256.0, help="MiB of float32 logits at a time, recomputed in backward (0: all).")
    optim: Literal["adamw", "adamw_fused"] = option("adamw", help="AdamW: default, or fused (TRL's; other rounding).")
    gradient_accumulation_steps: int = option(1, help="Micro-batches per optimizer step (z0 over all of them).")
    lora_r: int = option(0, help="LoRA rank (0: full fine-tuning); OUTPUT merged, OUTPUT/adapter the adapters.")
    lora_alpha: float = option(16.0, help="--lora_r: LoRA scaling numerator (the update is alpha / r * B A).")
    lora_dropout: float = option(0.0, help="--lora_r: dropout on the adapters' input.")
    lora_target_modules: str = option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                      help="--lora_r: comma-separated names of the adapted modules.")
    report_to: tracking.ReportTo = option("none", help="Also log to TensorBoard or W&B, in OUTPUT/tracking.")
    on_change: provenance.OnChange = option("stop", help=provenance.ON_CHANGE_HELP)


# Resuming with other values of these is safe: they do not change what is computed (not in the provenance record).
RESUME_FREE_ARGS = ("num_threads", "log_every", "save_every", "gradient_checkpointing", "logits_chunk_mib", "report_to",
                    "on_change")


# ----------------------------------------------------------------------------- rows, then tokens (paper Sec. 2.1)


class Example(NamedTuple):
    tokens: Tokenized
    desirable: bool  # outcome label (KTO); True for sft rows
    step_labels: list[bool | None]  # (num_steps,): None for a step without a verdict; [] for sft and kto rows
    anchored: bool  # desirable at every level (every sft row is): the rows whose NLL the anchor (and sft) trains


def load_examples(args: Args, tokenizer) -> list[Example]:
    """The rows of --data as Examples; bad rows raise DataError naming file, line and field."""
    if args.objective == "sft":
        return [sft_example(tokenizer, row, args.prompt_style) for row in jsonl.read_jsonl(args.data, jsonl.SFT_ROW)]
    with_steps = args.objective == "step-kto"
    rows = jsonl.read_numbered_jsonl(args.data, jsonl.STEP_KTO_ROW if with_steps else jsonl.KTO_ROW)
    return [kto_example(tokenizer, row, f"{args.data}:{line}", with_steps, args.unjudged_steps) for line, row in rows]


def sft_example(tokenizer, row: dict, prompt_style: str) -> Example:
    """The prompted problem and its completion + EOS, desirable (no offsets: sft has no steps)."""
    prompt = prompting.build_prompt(tokenizer, row["problem"], prompt_style)
    prompt_ids = prompting.encode_prompt(tokenizer, prompt)
    completion_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Example(Tokenized(prompt_ids, completion_ids, np.full(len(completion_ids), -1), 0), True, [], True)


def kto_example(tokenizer, row: dict, where: str, with_steps: bool, unjudged_steps: str = "ignore") -> Example:
    """One label.py row -> Example (unjudged_steps "wrong": a null step label is False); DataError names where."""
    if row["finish_reason"] not in ("stop", "length"):
        raise DataError(f"{where}: field 'finish_reason' must be 'stop' or 'length', got {row['finish_reason']!r}")
    spans = []
    if with_steps:  # label.py writes the spans; only rows from elsewhere are split here
        spans = [tuple(s) for s in row["step_spans"]] if "step_spans" in row else prompting.step_spans(row["completion"])
        if not all(isinstance(label, bool) or label is None for label in row["labels"]):
            raise DataError(f"{where}: field 'labels' must be a list of booleans and nulls (null: no verdict)")
        for name in ("labels", "completions"):
            if len(row[name]) != len(spans):
                raise DataError(f"{where}: field '{name}' has {len(row[name])} items but the completion has "
                                f"{len(spans)} steps (prompting.step_spans: steps are separated by blank lines)")
    prompt_ids, completion_ids, offsets = tokenized_text(tokenizer, row, where)
    if not prompt_ids:
        raise DataError(f"{where}: field 'prompt' is empty: the first completion token would have no context")
    wrong = unjudged_steps == "wrong"  # a step without a verdict labelled wrong
    labels = [False if label is None and wrong else label for label in row["labels"]] if with_steps else []
    tokens = Tokenized(prompt_ids, completion_ids, steps_of_tokens(offsets, spans), len(spans))
    return Example(tokens, row["outcome"], labels, row["outcome"] and all(label is True for label in labels))


def tokenized_text(tokenizer, row: dict, where: str = "") -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, completion ids, completion offsets): generate.py's when the row has them, else tokenized here (a
    BPE may differ from what was sampled), EOS appended when the model chose to stop (EOS is then rewarded too)."""
    if "completion_ids" in row:
        for name in ("prompt_ids", "completion_ids", "completion_offsets"):
            values = row.get(name)
            if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise DataError(f"{where}: field '{name}' must be a list of integers (generate.py writes it)")
        if len(row["completion_offsets"]) != len(row["completion_ids"]):
            raise DataError(f"{where}: field 'completion_offsets' must have one offset per item of 'completion_ids'")
        return row["prompt_ids"], row["completion_ids"], row["completion_offsets"]
    prompt_ids = prompting.encode_prompt(tokenizer, row["prompt"])
    encoding = tokenizer(row["completion"], add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], [start for start, _ in encoding["offset_mapping"]]
    if row["finish_reason"] == "stop":
        ids, offsets = ids + [tokenizer.eos_token_id], offsets + [len(row["completion"])]
    return prompt_ids, ids, offsets


def steps_of_tokens(token_starts: list[int], spans: list[tuple[int, int]]) -> np.ndarray:
    """Step index of each completion token (the step_ids of (6)): the step its FIRST character is in, a step running
    to the next one's start (".\\n\\n" ends its step); the stop token is the last step's; -1 without steps."""
    token_starts = np.asarray(token_starts, dtype=np.int64)  # (C,)
    if not spans:
        return np.full_like(token_starts, -1)
    span_starts = np.array([start for start, _ in spans], dtype=np.int64)  # (K,)
    return np.maximum(np.searchsorted(span_starts, token_starts, side="right") - 1, 0)  # (C,)


# ----------------------------------------------------------------------------- the batch plan and the KTO weights


@dataclass
class Data:
    examples: list[Example]
    plan: list[PlanBatch]  # every global batch of the run
    kl_offsets: list[int]  # index in the reference's KL pairs of each global batch's first pair (one pair per row)
    pad_id: int
    lambdas: dict  # lambda_d, lambda_u, step_lambda_d, step_lambda_u of (3) for stepkto_loss (kto / step-kto)
    w_outcome: float  # the weights of (8): kto IS step-kto with w_step = 0
    w_step: float
    reference: Optional[Reference] = None  # log pi_ref of every row and KL pair (reference_logps)


def prepare_data(args: Args, env: Env, tokenizer) -> Data:
    """Examples, batch plan, lambda_D / lambda_U of (3) (--lambda_d/--lambda_u, or balanced per level: KTO paper)."""
    examples = load_examples(args, tokenizer)
    kto = args.objective != "sft"
    shards = env.world_size * args.gradient_accumulation_steps
    global_batch = args.per_device_batch_size * shards
    lengths = [e.tokens.length() for e in examples]
    plan = build_plan(lengths, global_batch, shards, args.epochs, args.seed, min_batch_size=2 if kto else 1)
    plan = plan[: args.max_steps] if args.max_steps else plan
    if not plan:
        raise UsageError(f"{args.data}: {len(examples)} rows make no batch of {global_batch}: lower the batch size")
    lambdas = dict(lambda_d=args.lambda_d, lambda_u=args.lambda_u) if kto else {}
    if kto and args.balance_lambdas:  # per level over the whole data; the steps: those the step level scores
        labels, scored = step_tensors(examples, max((len(e.step_labels) for e in examples), default=0), args, "cpu")
        n_d, steps_d, steps_all = sum(e.desirable for e in examples), int((labels & scored).sum()), int(scored.sum())
        (d, u), (sd, su) = balanced_lambdas(n_d, len(examples) - n_d), balanced_lambdas(steps_d, steps_all - steps_d)
        lambdas = dict(lambda_d=d, lambda_u=u, step_lambda_d=sd, step_lambda_u=su)
    if env.rank == 0:
        print(f"{len(examples)} rows, {len(plan)} steps of {global_batch} rows", flush=True)
        if kto:
            print("KTO weights: " + ", ".join(f"{k} {v:.3f}" for k, v in lambdas.items()), flush=True)
    offsets = np.cumsum([0] + [len(b.rows) for b in plan]).tolist()
    w_outcome, w_step = (args.w_outcome, args.w_step) if args.objective == "step-kto" else (1.0, 0.0)
    return Data(examples, plan, offsets, tokenizer.pad_token_id, lambdas, w_outcome, w_step)


def balanced_lambdas(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(lambda_D, lambda_U) of (3) with lambda_D * n_D = lambda_U * n_U, the larger side weighted down (KTO paper)."""
    if min(n_desirable, n_undesirable) == 0:
        return 1.0, 1.0
    return min(1.0, n_undesirable / n_desirable), min(1.0, n_desirable / n_undesirable)


def step_tensors(examples: list[Example], num_steps: int, args: Args, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(step_labels, step_mask), (B, K) bool: judged right, and K_i of (7): judged (first_error: through the wrong)."""
    padded = [e.step_labels + [None] * (num_steps - len(e.step_labels)) for e in examples]  # (B, K)
    labels = torch.tensor([[label is True for label in row] for row in padded], dtype=torch.bool, device=device)
    judged = torch.tensor([[label is not None for label in row] for row in padded], dtype=torch.bool, device=device)
    return labels, through_first_error(labels, judged) if args.step_scope == "first_error" else judged


# ----------------------------------------------------------------------------- the KL pairs, the reference log-probs


def kl_pairs(rows: list[int], slots, examples: list[Example], keep_steps: bool) -> list[Tokenized]:
    """KTO's mismatched pairs (x_j, y_{j-1}) of (2) (KTO paper Sec. 4.1), cyclic in ``rows`` as TRL; keep_steps for
    --step_z0 step."""
    pairs = [(examples[rows[j]].tokens.prompt_ids, examples[rows[j - 1]].tokens) for j in slots]
    if keep_steps:
        return [completion._replace(prompt_ids=prompt_ids) for prompt_ids, completion in pairs]
    # one read-only -1 per token, no copy: the reference pass holds every pair of the plan at once
    return [Tokenized(prompt_ids, c.completion_ids, np.broadcast_to(np.int64(-1), (len(c.completion_ids),)), 0)
            for prompt_ids, c in pairs]


def reference_logps(args: Args, env: Env, policy: nn.Module, data: Data, tokenizer, work: Path) -> Reference:
    """log pi_ref of every row and KL pair, once, cached in work: the untrained policy's, or --ref_model's (freed)."""
    def compute() -> Reference:
        scorer = policy
        if args.ref_model and Path(args.ref_model).resolve() != Path(args.model).resolve():
            scorer = distributed.build_policy(args.ref_model, args, tokenizer, None, env, False, CompletionLogProbs)
        scorer.eval()
        keep_steps = args.step_z0 == "step"
        pairs = [p for b in data.plan for p in kl_pairs(b.rows, range(len(b.rows)), data.examples, keep_steps)]
        totals, steps = score_rows(scorer, [e.tokens for e in data.examples] + pairs, args.step_span,
                                   args.per_device_batch_size, env, data.pad_id)
        if hasattr(policy, "reshard"):  # FSDP2 keeps the root gathered: the optimizer must see the shards
            policy.reshard()
        policy.train()
        del scorer
        gc.collect()
        n = len(data.examples)
        return Reference(totals[:n], steps[:n], totals[n:], steps[n:, : max((p.num_steps for p in pairs), default=0)])

    return cached_reference(work / "reference_logps.pt", compute, env.rank)


# ----------------------------------------------------------------------------- the training loop (paper Sec. 2.3, 2.4)
# A pass of the loop, one step of (8) on a global batch: z0 (2), each micro-batch's (8) and backward, one update.


class MicroBatch(NamedTuple):
    """One micro-batch of this rank's slice of a global batch, on its device. The KTO fields are None for sft."""
    rows: Batch  # its rows, collated
    anchored: torch.Tensor  # (B,) bool: fully desirable rows, whose NLL the anchor (and sft) trains
    kl: Optional[Batch]  # its rows' mismatched pairs (x_j, y_{j-1}) of (2)
    ref: Optional[Reference]  # log pi_ref of its rows (B,), (B, K) and of its KL pairs (B,), (B, K_kl)
    desirable: Optional[torch.Tensor]  # (B,) bool: the outcome labels
    step_labels: Optional[torch.Tensor]  # (B, K) bool: judged right
    step_mask: Optional[torch.Tensor]  # (B, K) bool: the scored steps, K_i of (7): judged ones only


class StepInputs(NamedTuple):
    """This rank's micro-batches of a global batch, and the global batch's denominators of (5), (7) and the NLL."""
    micro: list[MicroBatch]
    n_outcome: torch.Tensor  # the completions
    n_step: torch.Tensor  # those with a judged step (every --step_scope scores a completion's first judged step)
    nll_tokens: int  # completion tokens of the fully desirable rows (at least 1)
    tokens: Counter  # tokens/real and tokens/computed (padded) of this rank's forwards, for the throughput


def step_inputs(step: int, data: Data, args: Args, env: Env) -> StepInputs:
    """Global batch ``step`` as this rank computes it: its micro-batches, and the global batch's counts."""
    examples = [data.examples[i] for i in data.plan[step].rows]
    nll_tokens = max(sum(len(e.tokens.completion_ids) for e in examples if e.anchored), 1)
    n_step = sum(any(step_label is not None for step_label in e.step_labels) for e in examples)
    slots = distributed.micro_slots(len(examples), env, args.gradient_accumulation_steps)
    micro = [micro_batch(step, s, data, args, env.device) for s in slots]
    batches = [b for m in micro for b in (m.rows, m.kl) if b is not None]
    tokens = Counter({"tokens/real": sum(b.real_tokens for b in batches),
                      "tokens/computed": sum(b.computed_tokens for b in batches)})
    return StepInputs(micro, torch.tensor(float(len(examples))), torch.tensor(float(n_step)), nll_tokens, tokens)


def micro_batch(step: int, slots: range, data: Data, args: Args, device: torch.device) -> MicroBatch:
    """The rows at ``slots`` of global batch ``step``, collated, with their KL pairs, labels, masks and log pi_ref."""
    rows = [data.plan[step].rows[j] for j in slots]
    examples = [data.examples[i] for i in rows]
    batch = collate([e.tokens for e in examples], data.pad_id, device)
    anchored = torch.tensor([e.anchored for e in examples], device=device)  # (B,)
    if args.objective == "sft":
        return MicroBatch(batch, anchored, None, None, None, None, None)
    kl = collate(kl_pairs(data.plan[step].rows, slots, data.examples, args.step_z0 == "step"), data.pad_id, device)
    full, num_steps = data.reference, batch.step_mask.size(1)
    index = [data.kl_offsets[step] + j for j in slots]  # the pairs' place among the reference's
    ref = Reference(full.row_total[rows], full.row_steps[rows, :num_steps], full.kl_total[index],
                    full.kl_steps[index, : kl.step_mask.size(1)])
    step_labels, step_mask = step_tensors(examples, num_steps, args, device)
    desirable = torch.tensor([e.desirable for e in examples], device=device)  # (B,)
    return MicroBatch(batch, anchored, kl, Reference(*(t.to(device) for t in ref)), desirable, step_labels, step_mask)


def train(policy: nn.Module, optimizer, scheduler, data: Data, args: Args, env: Env, work: Path, start_step: int,
          log: distributed.TrainLog) -> None:
    """Each global batch of the plan: one step of (8) (kto: w_step = 0; sft: the NLL), then one AdamW update."""
    kto = args.objective != "sft"
    z0 = z0_step = totals = None  # sft has no reference points and no level sums
    for step in range(start_step, len(data.plan)):
        inputs = step_inputs(step, data, args, env)  # this rank's micro-batches with pi_ref and labels
        if kto:  # (2) z0 over the whole global batch (every micro-batch, all ranks: estimate_z0 all-reduces), no grad
            z0, z0_step = reference_points(policy, inputs.micro, args.step_z0 == "step", args.step_span)
        sums, level_sums = Counter(inputs.tokens), []  # logged metrics, added up; each micro-batch's (5) and (7)
        for m in inputs.micro:
            if kto:
                logps, step_logps = completion_logps(policy, m.rows, args.step_span)  # (B,), (B, K) log pi
                terms, rewards = stepkto_loss(
                    outcome_logratios=logps - m.ref.row_total, outcome_labels=m.desirable,  # (1) (B,)
                    step_logratios=step_logps - m.ref.row_steps, step_labels=m.step_labels, step_mask=m.step_mask,  # (6)
                    z0=z0, z0_step=z0_step, beta=args.beta, **data.lambdas, w_outcome=data.w_outcome,
                    w_step=data.w_step, step_aggregation=args.step_aggregation, reduction="none")
                loss = terms.loss(inputs)  # this micro-batch's share of (8): its sums over the GLOBAL counts
                nll = -(logps * m.anchored).sum()  # the anchor: NOT Step-KTO's (README)
                if args.nll_weight:
                    loss = loss + args.nll_weight * (nll / inputs.nll_tokens)
                level_sums.append(terms.sums())
                sums.update(rewards)
            else:  # sft: the mean NLL of the completion tokens (+ EOS) over the global batch
                nll = -policy(m.rows.input_ids, m.rows.attention_mask, m.rows.positions, m.rows.targets).sum()
                loss = nll / inputs.nll_tokens
            (loss * env.world_size).backward()  # FSDP averages the gradients over the ranks: their sum is the step's
            sums.update({"loss/total": loss.detach(), "loss/nll": nll.detach()})
        sums = distributed.all_reduce_sums(sums, env.device)  # over the ranks, in one collective
        if kto:  # the sums of (5) and (7) of the global batch, as docs/loss.md adds them
            totals = LevelSums(*distributed.all_reduce(functools.reduce(LevelSums.add, level_sums).stack()))
        metrics = step_metrics(sums, totals, z0, z0_step, inputs, args, data)
        lr = scheduler.get_last_lr()[0]
        grad_norm = distributed.update(policy, optimizer, scheduler, metrics["loss/total"], args.max_grad_norm, step,
                                       work)
        log.step(step, data.plan[step].epoch, lr, grad_norm, metrics, sums, len(data.plan[step].rows))
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < len(data.plan):
            checkpoints.save_train_state(work, policy, optimizer, scheduler, step + 1, bool(args.lora_r))


@torch.no_grad()
def reference_points(policy: nn.Module, micro: list[MicroBatch], own_step_z0: bool, span: str):
    """(z0, z0_step) of (2) over every micro-batch's KL pairs (not per micro-batch as TRL: accumulation is exact)."""
    outcome, steps = [], []
    for m in micro:
        totals, step_logps = completion_logps(policy, m.kl, span)  # (B,), (B, K)
        outcome.append(totals - m.ref.kl_total)  # (1) r(x, y')
        steps.append((step_logps - m.ref.kl_steps)[m.kl.step_mask])  # (6) r_k of the pairs' real steps
    return estimate_z0(torch.cat(outcome)), estimate_z0(torch.cat(steps)) if own_step_z0 else None  # (2)


def step_metrics(sums: dict, totals: Optional[LevelSums], z0, z0_step, inputs: StepInputs, args, data) -> dict:
    """The global batch's metrics: (5), (7), loss/total ((8) and the anchor), rewards, counts, z0; sft: the NLL."""
    if args.objective == "sft":
        return {"loss/total": sums["loss/nll"] / inputs.nll_tokens}
    metrics = {k: float(v) for k, v in totals.loss_metrics(data.w_outcome, data.w_step).items()}
    metrics |= {"loss/total": sums["loss/total"]} | {k: float(v) for k, v in reward_means(sums).items()}
    if args.nll_weight:
        metrics["loss/nll"] = sums["loss/nll"] / inputs.nll_tokens
    return metrics | {"kl/z0": float(z0)} | ({} if z0_step is None else {"kl/z0_step": float(z0_step)})


# ----------------------------------------------------------------------------- main: arguments, the policy, resume


def run(args: Args, env: Env) -> None:
    """One iteration M_t -> M_{t+1} (pi_ref = M_t = --model unless --ref_model), or SFT; nothing if OUTPUT is done."""
    settings = {k: v for k, v in asdict(args).items() if k not in RESUME_FREE_ARGS}
    record = checkpoints.training_record(settings, env.world_size)  # OUTPUT's provenance record
    if not checkpoints.claim_output(args.output_dir, record, args.on_change, env):
        return
    sharding.seed_everything(args.seed)
    tokenizer = models.tokenizer_for(args.model, args.scratch_tokenizer)
    data = prepare_data(args, env, tokenizer)  # bad data fails here, before anything is written
    work = checkpoints.open_work(args.output_dir, record, env)
    lora = distributed.Lora(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules) if args.lora_r \
        else None
    policy = distributed.build_policy(args.model, args, tokenizer, lora, env, True, CompletionLogProbs)
    policy.train()
    if args.objective != "sft":  # before any update and before loading a resume state: pi_ref = initial policy
        data.reference = reference_logps(args, env, policy, data, tokenizer, work)
    optimizer, scheduler = distributed.make_optimizer(policy, len(data.plan), args.lr, args.weight_decay,
                                                      args.warmup_ratio, args.lr_schedule, args.optim == "adamw_fused")
    start_step = checkpoints.load_train_state(work, policy, optimizer, scheduler, bool(args.lora_r))
    tracker = tracking.open_tracker(args.report_to if env.rank == 0 else "none", work / "tracking",
                                    Path(args.output_dir).name, asdict(args), start_step + 1)
    log = distributed.TrainLog(work, args.log_every, len(data.plan), start_step, args.objective, tracker, env.rank)
    train(policy, optimizer, scheduler, data, args, env, work, start_step, log)
    log.close()
    config = asdict(args) | {"world_size": env.world_size}  # OUTPUT/train_args.json
    checkpoints.save_final_model(policy, tokenizer, Path(args.output_dir), work, config, lora, args.model)


def main(args: Args) -> None:
    """Train; first fail on arguments that cannot work, or that would do nothing (stepkto/options.py)."""
    cli.check_choices(args)
    options.refuse_inapplicable("train.py", args)
    if args.model == "scratch" and (args.objective != "sft" or args.lora_r):
        raise UsageError("--model scratch is for --objective sft without --lora_r: KTO and adapters need a trained one")
    for name in ("model", "ref_model"):
        path = getattr(args, name)
        if path and path != "scratch" and Path(path).resolve() == Path(args.output_dir).resolve():
            raise UsageError(f"--output_dir {args.output_dir} is --{name}: training would overwrite its own input")
    positive = ("per_device_batch_size", "epochs", "log_every", "lr", "max_grad_norm", "gradient_accumulation_steps")
    for name in positive + ("lambda_d", "lambda_u", "lora_r", "max_steps", "save_every", "logits_chunk_mib"):
        if not (getattr(args, name) > 0 if name in positive else getattr(args, name) >= 0):
            raise UsageError(f"--{name} must be {'>' if name in positive else '>='} 0, got {getattr(args, name)}")
    if not 0 < args.beta < math.inf or not 0 <= args.warmup_ratio < 1:
        raise UsageError(f"need 0 < --beta < inf and 0 <= --warmup_ratio < 1, got {args.beta}, {args.warmup_ratio}")
    if min(args.w_outcome, args.w_step) < 0 or args.w_outcome == args.w_step == 0:  # (8)'s weights
        raise UsageError(f"--w_outcome {args.w_outcome}, --w_step {args.w_step}: need both >= 0, not both 0")
    if args.dtype == "bfloat16" and not args.lora_r:  # bfloat16 weights lose every update under 1/256 of the weight
        raise UsageError("--dtype bfloat16 trains bfloat16 weights: use --dtype float32 --mixed_precision bfloat16")
    if args.dtype == "float64" and args.mixed_precision != "none":
        raise UsageError("--mixed_precision bfloat16 needs --dtype float32 (autocast casts float32 only)")
    cli.set_num_threads(args.num_threads)
    distributed.run_in_process_group(functools.partial(run, args))


if __name__ == "__main__":
    cli.run_cli(Args, main)
    distributed.exit_under_torchrun()
