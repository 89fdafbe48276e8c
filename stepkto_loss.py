"""The Step-KTO objective in one file (imports only torch): copy it into your trainer.

Step-KTO (Lin et al., 2025, arXiv:2501.10799) trains on a binary OUTCOME label per completion and a binary label per
reasoning STEP (Section 2.1), both through the KTO value function (Ethayarajh et al., 2024, arXiv:2402.01306) in one
objective: Section 2.3, this file (iterating it, Section 2.4, is the trainer's job; results: Section 3). Notation: x
a prompt, y = (s_1, ..., s_K) a completion of K steps, pi the policy, pi_ref the frozen reference, sigma the
logistic function, beta > 0, lambda_D / lambda_U the desirable / undesirable weights. A trailing `# (n)` in the code
marks the line that implements equation (n).

    (1) implied reward   r(x, y) = log pi(y | x) - log pi_ref(y | x)
    (2) reference point  z0 = max(0, mean_{(x, y') in KL pairs} r(x, y')),  detached
                         (y' is another row's completion: a mismatched pair)
    (3) value            v(x, y) = lambda_D * sigma(beta * (r(x, y) - z0))   if y is desirable
                                   lambda_U * sigma(beta * (z0 - r(x, y)))   if y is undesirable
    (4) per-item loss    l(x, y) = lambda_y - v(x, y)     (lambda_y = lambda_D or lambda_U by the label)
    (5) outcome loss     L_outcome = (1 / B) * sum_{i=1..B} l(x_i, y_i)
    (6) step reward      span="step"   (default)  r_k = log pi(s_k | x, s_<k) - log pi_ref(s_k | x, s_<k)
                         span="prefix"            r_k = log pi(s_<=k | x) - log pi_ref(s_<=k | x)
                                                      = sum_{j<=k} r_j(span="step")
    (7) step loss        L_step = (1 / |S|) * sum_{i in S} AGG_{k in K_i} l_k
                         l_k = (4) with r_k, the step's label, z0_step in place of z0 (default: z0 itself)
                               and step_lambda_d / step_lambda_u (default: lambda_D / lambda_U)
                         K_i = the scored steps of completion i (step_mask), S = {i : K_i not empty}
                         AGG = mean (default) or sum over K_i (step_aggregation)
    (8) objective        L = w_outcome * L_outcome + w_step * L_step      (defaults w_outcome = w_step = 1)
                         a term whose weight is 0 is left out; L_step also when S is empty

Where the code is: (1) the caller's (per token in step_rewards), (2) estimate_z0, (3)-(4) kto_losses, (5) and (7)
per_completion's summands and StepKTOTerms.loss's means (reduction "mean" is terms.loss(terms.sums())), (6)
step_logps / step_rewards, (8) StepKTOTerms.loss, K_i optionally through_first_error.

What is the paper's and what is ours:
  * the paper's (Section 2.3): KTO's value function (1)-(5) on the outcome label, i.e. plain KTO (TRL's
    `loss_type="kto"`, KTO paper eq. 7-8); binary step and outcome labels (Section 2.1); one objective (8).
  * OUR READING: the step level (6)-(7); steps get binary labels for a KTO-style objective, but the paper's
    step-level equation is not available to us, so each open choice is an option: the span of r_k (span), the
    aggregation over steps (step_aggregation), the scored steps (step_mask, or through_first_error: docs/loss.md),
    the steps' z0 (z0_step: None reuses z0, or estimate_z0 over mismatched pairs' step log-ratios), their weights
    (step_lambda_d, step_lambda_u) and the levels' weights in (8) (w_outcome, w_step).
  * w_step = 0 is plain KTO (the paper's baseline); w_outcome = 0 is a step-only ablation.

Under torch.distributed (and gradient accumulation: docs/loss.md) estimate_z0 is the global batch's, and a trainer
takes the global means of (5) and (7) from reduction="none" in one collective:

    terms, metrics = stepkto_loss(..., reduction="none")
    totals = LevelSums(*all_reduce(terms.sums().stack()))  # the global sums and counts of (5) and (7)
    loss = terms.loss(totals)                              # this rank's sums over the GLOBAL counts: its share of (8)
    (loss * dist.get_world_size()).backward()              # times world_size: DDP / FSDP average over ranks
"""

from typing import NamedTuple

import torch
import torch.distributed as dist

SPANS = ("step", "prefix")
STEP_AGGREGATIONS = ("mean", "sum")
REDUCTIONS = ("mean", "none")
LEVELS, SIDES = ("outcome", "step"), ("desirable", "undesirable")


# --- (1), (6): step rewards from per-token log-probs
def step_logps(token_logps, step_ids, num_steps, span="step"):
    """Per-step sums of the (B, T) token_logps in one scatter_add; step_ids (B, T) long: each token's step
    0..num_steps-1, or -1 for a token not scored (prompt, padding). Returns (B, num_steps):
        span="step":   out[b, k] = sum_{j: step_ids[b, j] == k} token_logps[b, j]      (the step's own tokens)
        span="prefix": out[b, k] = sum_{j: 0 <= step_ids[b, j] <= k} token_logps[b, j] (all tokens through k)
    A step with no tokens adds nothing: 0, or the previous prefix (mask such padding steps out with step_mask)."""
    _check_step_inputs(token_logps, step_ids, num_steps, span)
    batch_size = token_logps.size(0)
    # Unscored tokens go to an extra column that is dropped, so their values (even -inf/NaN) never mix in.
    column = torch.where(step_ids >= 0, step_ids, torch.full_like(step_ids, num_steps))  # (B, T)
    sums = token_logps.new_zeros(batch_size, num_steps + 1).scatter_add(1, column, token_logps)  # (B, K+1) (6)
    sums = sums[:, :num_steps]  # (B, K)
    if span == "prefix":
        # The prefix through step k is the step sums of steps 0..k: a cumsum over the step axis.
        sums = sums.cumsum(dim=1)  # (6) span="prefix"
    return sums


def step_rewards(policy_token_logps, ref_token_logps, step_ids, num_steps, span="step"):
    """(B, num_steps) step rewards (6) r_k = step_logps(policy) - step_logps(ref), as one scatter of the per-token
    log-ratio (1) (step_logps is linear); with num_steps=1 and one step over the completion, r_0 is (1)'s r(x, y)."""
    _check_like("ref_token_logps", ref_token_logps, "policy_token_logps", policy_token_logps)
    return step_logps(policy_token_logps - ref_token_logps, step_ids, num_steps, span)  # (1) per token -> (6)


# --- (2): the reference point
def estimate_z0(kl_logratios):
    """z0 (2), a detached scalar, at least float32, from the (N,) kl_logratios of mismatched pairs (N may be 0 on a
    rank): under torch.distributed the sum and count are all-reduced, so the mean is over every pair of every rank
    (a mean of ranks' means would give unequal ranks equal votes); no pair anywhere gives 0."""
    if kl_logratios.dim() != 1:
        raise ValueError(f"estimate_z0: kl_logratios must be 1-D (N,), got shape {tuple(kl_logratios.shape)}")
    with torch.no_grad():
        dtype = torch.promote_types(kl_logratios.dtype, torch.float32)  # bf16 sums lose too much
        count = torch.tensor(float(kl_logratios.numel()), dtype=dtype, device=kl_logratios.device)
        sum_and_count = torch.stack([kl_logratios.to(dtype).sum(), count])  # (2,)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sum_and_count, op=dist.ReduceOp.SUM)
        total, count = sum_and_count
        return (total / count.clamp(min=1)).clamp(min=0)  # (2)


# --- (3)-(4): the KTO value and the per-item loss
def kto_losses(rewards, desirable, z0, beta=0.1, lambda_d=1.0, lambda_u=1.0):
    """Per-item KTO loss (4) l = lambda_y - v (KTO paper eq. 7-8; TRL's `loss_type="kto"`), elementwise over the
    implied rewards r (1) and the bool ``desirable`` of their shape; z0 is a scalar baseline, detached here."""
    _check_like("desirable", desirable, "rewards", rewards, mask=True)
    _check_scalar("z0", z0)
    z0 = z0.detach()
    desirable_value = lambda_d * torch.sigmoid(beta * (rewards - z0))  # (3)
    undesirable_value = lambda_u * torch.sigmoid(beta * (z0 - rewards))  # (3)
    return torch.where(desirable, lambda_d - desirable_value, lambda_u - undesirable_value)  # (4)


# --- (5), (7): the two levels' per-completion summands
def through_first_error(step_labels, step_mask):
    """(B, K) bool K_i of (7), OUR READING: the steps of step_mask up to and including the first wrong one (keep_k =
    step_mask_k and no j < k with step_mask_j and not step_labels_j); a step after an error has an ill-defined label
    (docs/loss.md)."""
    for name, tensor in (("step_labels", step_labels), ("step_mask", step_mask)):
        _check_like(name, tensor, "step_labels", step_labels, mask=True)
    wrong = (step_mask & ~step_labels).long()  # (B, K)
    wrong_before = wrong.cumsum(dim=1) - wrong  # (B, K) wrong steps strictly before k
    return step_mask & (wrong_before == 0)  # K_i of (7)


class KTOWeights(NamedTuple):
    beta: float
    lambda_d: float
    lambda_u: float


class Level(NamedTuple):
    """One level of (8) as (B, K) items: the outcome with K = 1 (the completion), the steps with K steps."""

    logratios: torch.Tensor  # (B, K): r(x, y) of (1), or r_k of (6)
    labels: torch.Tensor  # (B, K) bool: desirable
    mask: torch.Tensor  # (B, K) bool: the items scored (every completion; K_i of (7))
    z0: torch.Tensor  # the level's reference point (2)
    kto: KTOWeights  # beta, lambda_D, lambda_U of (3)
    weight: float  # w_outcome or w_step of (8)


def per_completion(level: Level, aggregation: str):
    """((B,) summands AGG_{k in K_i} l_k of the level's mean, (B,) bool: the completions in that mean, those with a
    scored item; none when the level's weight is 0). Losses outside the mask are 0, still on the graph."""
    # Padding items may hold anything (even NaN): replace them before the sigmoid so that neither the
    # loss nor its gradient sees them (torch.where sends zero gradient to the unselected branch).
    real = torch.where(level.mask, level.logratios, torch.zeros_like(level.logratios))  # (B, K)
    losses = kto_losses(real, level.labels, level.z0, *level.kto) * level.mask  # (B, K) l of (4), l_k of (7)
    count = level.mask.sum(dim=1)  # (B,) |K_i|
    summands = losses.sum(dim=1)  # (B,) AGG = sum
    if aggregation == "mean":
        summands = summands / count.clamp(min=1)  # (B,) AGG = mean
    in_mean = (count > 0) & (level.weight != 0)  # (B,) S of (7); every completion for (5)
    return torch.where(in_mean, summands, torch.zeros_like(summands)), in_mean


# --- (5), (7), (8) from the summands: sums and counts that add over micro-batches and ranks
class LevelSums(NamedTuple):
    """Sums of the summands of (5) and (7) over some completions (a batch, a rank's, all ranks'), and how many
    completions each mean runs over: (5) = outcome / n_outcome, (7) = step / n_step. Detached scalars, at least
    float32 (exact counts). They add over micro-batches and ranks: add(), or all-reduce stack()."""

    outcome: torch.Tensor
    n_outcome: torch.Tensor
    step: torch.Tensor
    n_step: torch.Tensor

    def add(self, other: "LevelSums") -> "LevelSums":
        return LevelSums(*(a + b for a, b in zip(self, other)))

    def stack(self) -> torch.Tensor:
        return torch.stack(tuple(self))  # (4,): one tensor to all-reduce

    def loss_metrics(self, w_outcome: float, w_step: float) -> dict:
        """loss/outcome (5), loss/step (7) and loss/total (8) of these sums; a level of weight 0 or count 0 left out."""
        metrics, total = {}, 0.0
        for name, value, count, weight in (("outcome", self.outcome, self.n_outcome, w_outcome),
                                           ("step", self.step, self.n_step, w_step)):
            if weight != 0 and count > 0:
                metrics[f"loss/{name}"] = value / count  # (5), (7)
                total = total + weight * metrics[f"loss/{name}"]  # (8)
        return metrics | {"loss/total": torch.as_tensor(total, dtype=self.outcome.dtype)}


class StepKTOTerms(NamedTuple):
    """What stepkto_loss(..., reduction="none") returns: the per-completion summands of (5) and (7), with gradient,
    0 outside their means; summing them is all the reduction a trainer does (sums, loss)."""

    outcome: torch.Tensor  # (B,) l(x_i, y_i) of (4), the summand of (5)
    step: torch.Tensor  # (B,) AGG_{k in K_i} l_k, the summand of (7)
    has_outcome: torch.Tensor  # (B,) bool: in the mean (5): all completions, none when w_outcome = 0
    has_step: torch.Tensor  # (B,) bool: in the mean (7): those with a scored step, none when w_step = 0
    w_outcome: float  # the weights of (8)
    w_step: float

    def sums(self) -> LevelSums:
        """This batch's LevelSums, detached: all-reduce them (or add them over micro-batches) in one go."""
        dtype = torch.promote_types(self.outcome.dtype, torch.float32)
        parts = (self.outcome.sum(), self.has_outcome.sum(), self.step.sum(), self.has_step.sum())
        return LevelSums(*(part.detach().to(dtype) for part in parts))

    def loss(self, totals: LevelSums):
        """This shard's share of (8), its sums over the counts n_outcome, n_step of ``totals`` (a LevelSums, or any
        tuple with them): with its own sums() the batch's (8); with those of all shards of a step, the shards'
        losses add up to the step's (8). A level with count 0 adds a zero still on the graph."""
        n_outcome, n_step = totals.n_outcome.clamp(min=1), totals.n_step.clamp(min=1)
        return self.w_outcome * self.outcome.sum() / n_outcome + self.w_step * self.step.sum() / n_step  # (8)


# --- (8): the objective
def stepkto_loss(outcome_logratios, outcome_labels, step_logratios, step_labels, step_mask, z0, z0_step=None,
                 beta=0.1, lambda_d=1.0, lambda_u=1.0, w_outcome=1.0, w_step=1.0, step_aggregation="mean",
                 step_lambda_d=None, step_lambda_u=None, reduction="mean"):
    """Step-KTO loss (8) L = w_outcome * L_outcome + w_step * L_step (equations in the module docstring).

    outcome_logratios (B,): r(x_i, y_i) of (1); outcome_labels (B,) bool; step_logratios (B, K): r_k of (6);
    step_labels (B, K) bool; step_mask (B, K) bool: the scored steps K_i (K may be 0). z0: estimate_z0 (2) of the
    KL pairs; z0_step: None reuses z0 for the steps, else estimate_z0 of the pairs' step log-ratios. step_lambda_d /
    _u: the step level's lambdas (None: the outcome level's; the KTO paper's advice holds per level).

    reduction="mean": (loss, metrics), the batch's scalar (8) and, detached, loss/total, loss/outcome, loss/step,
    kl/z0, kl/z0_step (when given), rewards/{level}_{side} (mean of beta * log-ratio, TRL's `rewards/chosen`) and
    count/{level}_{side} for each side present. reduction="none": (terms, metrics), a StepKTOTerms from which a
    distributed trainer takes GLOBAL means with one all-reduce, and reward_sums' sums and counts (every key), to
    add over micro-batches and ranks and divide with reward_means; the losses' metrics: LevelSums.loss_metrics.
    """
    _check_stepkto_inputs(outcome_logratios, outcome_labels, step_logratios, step_labels, step_mask)
    _check_stepkto_options(z0, z0_step, w_outcome, w_step, step_aggregation, reduction)
    outcome = Level(outcome_logratios[:, None], outcome_labels[:, None], torch.ones_like(outcome_labels[:, None]),
                    z0, KTOWeights(beta, lambda_d, lambda_u), w_outcome)  # (B, 1): one item per completion
    step_kto = KTOWeights(beta, lambda_d if step_lambda_d is None else step_lambda_d,
                          lambda_u if step_lambda_u is None else step_lambda_u)
    step = Level(step_logratios, step_labels, step_mask, z0 if z0_step is None else z0_step, step_kto, w_step)
    outcome_summands, has_outcome = per_completion(outcome, "mean")  # (B,) (4) of the one item: the summand of (5)
    step_summands, has_step = per_completion(step, step_aggregation)  # (B,) the summand of (7)
    terms = StepKTOTerms(outcome_summands, step_summands, has_outcome, has_step, w_outcome, w_step)
    if reduction == "none":  # sums, which a trainer adds over micro-batches and ranks before it divides
        return terms, reward_sums(outcome, step)
    metrics = {"kl/z0": z0.detach(), **({} if z0_step is None else {"kl/z0_step": z0_step.detach()})}
    metrics |= reward_means(reward_sums(outcome, step)) | terms.sums().loss_metrics(w_outcome, w_step)
    return terms.loss(terms.sums()), metrics


# --- reward metrics that add over micro-batches and ranks
def reward_sums(outcome: Level, step: Level) -> dict:
    """rewards_sum/{level}_{side} (sum of beta * r over the scored items) and count/{level}_{side}, detached, every
    key present (0 for an absent side), so that they add over micro-batches and ranks; reward_means divides."""
    sums = {}
    for name, level in zip(LEVELS, (outcome, step)):
        values, labels = level.logratios[level.mask].detach(), level.labels[level.mask]  # (N,)
        dtype = torch.promote_types(values.dtype, torch.float32)
        for side, is_side in zip(SIDES, (labels, ~labels)):
            sums[f"rewards_sum/{name}_{side}"] = (level.kto.beta * values[is_side]).to(dtype).sum()
            sums[f"count/{name}_{side}"] = is_side.sum().to(dtype)
    return sums


def reward_means(sums: dict) -> dict:
    """rewards/{level}_{side} (mean of beta * r, TRL's `rewards/chosen`) and count/{level}_{side}, for each side
    with a count, from reward_sums (of one batch, or added over micro-batches and ranks)."""
    means = {}
    for key in (f"{level}_{side}" for level in LEVELS for side in SIDES):
        if sums[f"count/{key}"] > 0:
            means[f"rewards/{key}"] = sums[f"rewards_sum/{key}"] / sums[f"count/{key}"]
            means[f"count/{key}"] = sums[f"count/{key}"]
    return means


# --- input checks: fail early, naming the argument
def _check_step_inputs(token_logps, step_ids, num_steps, span):
    """Fail early, naming the argument, instead of a scatter index error (or a CUDA device assert)."""
    _check_like("step_ids", step_ids, "token_logps", token_logps)
    if token_logps.dim() != 2 or step_ids.dtype != torch.long or span not in SPANS or num_steps < 0:
        raise ValueError(f"step_logps: need token_logps (B, T), step_ids torch.long, span in {SPANS}, num_steps >= 0; "
                         f"got {tuple(token_logps.shape)}, {step_ids.dtype}, {span!r}, {num_steps}")
    if step_ids.numel() > 0 and (step_ids.min() < -1 or step_ids.max() >= num_steps):
        raise ValueError(f"step_logps: step_ids must lie in [-1, {num_steps - 1}] (num_steps={num_steps}), "
                         f"got min {int(step_ids.min())} max {int(step_ids.max())}")


def _check_stepkto_inputs(outcome_logratios, outcome_labels, step_logratios, step_labels, step_mask):
    """Shapes and dtypes of stepkto_loss's batch tensors: (B,) outcome, (B, K) step, bool labels/mask."""
    if outcome_logratios.dim() != 1 or outcome_logratios.numel() == 0 or step_logratios.dim() != 2 \
            or step_logratios.size(0) != outcome_logratios.size(0):
        raise ValueError(f"stepkto_loss: need outcome_logratios (B,) with B >= 1 and step_logratios (B, K), got "
                         f"{tuple(outcome_logratios.shape)}, {tuple(step_logratios.shape)}")
    _check_like("outcome_labels", outcome_labels, "outcome_logratios", outcome_logratios, mask=True)
    for name, tensor in (("step_labels", step_labels), ("step_mask", step_mask)):
        _check_like(name, tensor, "step_logratios", step_logratios, mask=True)


def _check_stepkto_options(z0, z0_step, w_outcome, w_step, step_aggregation, reduction):
    """stepkto_loss's scalar arguments: z0 / z0_step scalar tensors, weights, step_aggregation, reduction."""
    _check_scalar("z0", z0)
    if z0_step is not None:
        _check_scalar("z0_step", z0_step)
    if w_outcome < 0 or w_step < 0 or (w_outcome == 0 and w_step == 0):
        raise ValueError(f"stepkto_loss: need w_outcome, w_step >= 0, not both 0; got {w_outcome}, {w_step}")
    if step_aggregation not in STEP_AGGREGATIONS or reduction not in REDUCTIONS:
        raise ValueError(f"stepkto_loss: need step_aggregation in {STEP_AGGREGATIONS}, reduction in {REDUCTIONS}; "
                         f"got {step_aggregation!r}, {reduction!r}")


def _check_like(name, tensor, reference_name, reference, mask=False):
    """``tensor`` has the shape of ``reference`` (and, with ``mask``, dtype torch.bool)."""
    if tensor.shape != reference.shape or (mask and tensor.dtype != torch.bool):
        raise ValueError(f"{name} must be a {'bool ' if mask else ''}tensor of the shape of {reference_name} "
                         f"{tuple(reference.shape)}, got {tensor.dtype} {tuple(tensor.shape)}")


def _check_scalar(name, tensor):
    if not torch.is_tensor(tensor) or tensor.numel() != 1:
        shape = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a scalar tensor (e.g. from estimate_z0), got {shape}")
