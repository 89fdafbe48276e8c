"""The Step-KTO objective in one file (imports only torch): copy it into your trainer.

Step-KTO (Lin et al., 2025, arXiv:2501.10799, Section 2) trains a policy on binary feedback at two levels:
a binary OUTCOME label per completion (is the final answer right?) and a binary label per reasoning STEP
(from a process reward model / step labeller) -- the paper's Section 2.1, feedback collection. Both levels
go through the KTO value function of Ethayarajh et al. (2024, arXiv:2402.01306) in one objective -- the
paper's Section 2.3, the loss, which this file implements. Section 2.4, iterative training (M0 -> M1 -> M2
-> M3, each round's reference = the previous model), is the trainer's job. Results (Table 3): Section 3.

Notation. x is a prompt, y = (s_1, ..., s_K) a completion made of K steps, pi the policy, pi_ref the frozen
reference, sigma the logistic function, beta > 0, lambda_D / lambda_U the desirable / undesirable weights.
A trailing `# (n)` in the code marks the line that implements equation (n).

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

Where the code is: (1) is the caller's (the sum over the completion's tokens; step_rewards per token),
(2) estimate_z0, (3)-(4) kto_losses, (5) and (8) stepkto_loss, (6) step_logps / step_rewards, (7)
_per_completion_step_losses and _step_loss, K_i optionally through_first_error.

What is the paper's and what is ours:
  * the paper's (Section 2.3): the KTO value function (1)-(5) on the outcome label -- plain KTO, TRL's
    `loss_type="kto"` (KTO paper eq. 7-8); binary step and outcome labels (Section 2.1); one objective
    combining both levels (8).
  * OUR READING: the step level (6)-(7). The paper says steps get binary labels that enter a KTO-style
    objective, but its exact step-level equation is not available to us. Every open choice is an option:
    the span of r_k (span: own tokens "step" vs whole prefix "prefix"), the aggregation over a completion's
    steps (step_aggregation: mean vs sum), which steps are scored (step_mask as given, or
    through_first_error), the reference point of the steps (z0_step: None reuses z0, or estimate_z0 over
    mismatched pairs' step log-ratios), the step level's weights (step_lambda_d, step_lambda_u) and the
    weighting between the levels in (8) (w_outcome, w_step).
  * w_step = 0 is plain KTO (the paper's baseline); w_outcome = 0 is a step-only ablation.

Which steps carry a label (OUR READING, `through_first_error`): a step after the first wrong step is judged
on a prefix that is already wrong, and its label then depends on the labeller's convention (against the
value the text wrote, or the true one). Uesato et al. (2022) and ProcessBench (Zheng et al., 2024) label
the first error only; passing step_mask = through_first_error(step_labels, step_mask) scores the steps up
to and including the first wrong one, and none after it. Passing step_mask as it is scores every real step
(the default of train.py, as the paper's judge labels every step).

Under torch.distributed (each rank calls stepkto_loss on its slice of the global batch):
  * z0 (2): estimate_z0 all-reduces the sum and the count of the KL log-ratios, so every rank gets the
    GLOBAL batch's z0, the mean over all mismatched pairs of all ranks. This is what HALOs (the KTO
    authors' code) uses: its KTO trainer gathers the KL log-ratios of all ranks and takes their mean
    (`accelerator.gather(KL_rewards.detach()).mean().clamp(min=0)`).
    TRL's KTOTrainer averages the per-rank means instead (a deviation from TRL, on purpose); the two
    differ when ranks hold unequal numbers of KL pairs and agree on one process. z0 is detached: no
    gradient crosses the collective.
  * L_outcome (5) and L_step (7) of reduction="mean" are THIS rank's means. DDP and FSDP average the
    gradients over the ranks, i.e. they average the per-rank means. For (5) with equal slices that is the
    global mean. For (7) it is not: the mean runs over the completions that have a scored step, and their
    number differs from rank to rank (and from micro-batch to micro-batch) even with equal slices; a rank
    with 1 such completion gives it the weight that another rank spreads over 3.
  * Hence reduction="none": stepkto_loss returns StepKTOTerms, the per-completion summands of (5) and (7)
    and the masks of which completions are in each mean. The trainer takes the global means itself:

        terms, metrics = stepkto_loss(..., reduction="none")
        totals = terms.sums()                 # (4,) [sum, count] of (5) and of (7), detached
        dist.all_reduce(totals)               # ONE collective: the global sums and counts
        loss = terms.loss(totals)             # this rank's sums over the GLOBAL counts: its share of (8)
        (loss * dist.get_world_size()).backward()   # times world_size: DDP / FSDP average over ranks

    Summed over the ranks, the shares are (8) of the global batch, value and gradient. The global value
    of (8), for logging, is w_outcome * totals[0] / totals[1] + w_step * totals[2] / totals[3], a level
    with count 0 left out. Gradient accumulation is the same with micro-batches for ranks, except that
    loss() must know the counts of ALL the optimizer step's micro-batches before the first backward. It
    reads only the counts, and they need no forward pass (N_outcome: the completions, N_step: those with
    a scored step, i.e. step_mask.any(dim=1)), so count them up front; add the micro-batches' sums() for
    the logged value.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist

SPANS = ("step", "prefix")
STEP_AGGREGATIONS = ("mean", "sum")
REDUCTIONS = ("mean", "none")


class StepKTOTerms(NamedTuple):
    """What stepkto_loss(..., reduction="none") returns: the per-completion summands of (5) and (7).

    outcome: (B,) l(x_i, y_i) of (4), the summand of (5); 0 where has_outcome is False.
    step: (B,) AGG_{k in K_i} l_k, the summand of (7); 0 where has_step is False.
    has_outcome: (B,) bool, the completions in the mean (5): all of them, none when w_outcome = 0.
    has_step: (B,) bool, the completions in the mean (7): those with >= 1 scored step, none when w_step = 0.
    w_outcome, w_step: the weights of (8), as passed to stepkto_loss.
    outcome and step carry the gradient. Summing them is all the reduction the trainer does: see sums/loss.
    """

    outcome: torch.Tensor
    step: torch.Tensor
    has_outcome: torch.Tensor
    has_step: torch.Tensor
    w_outcome: float
    w_step: float

    def sums(self):
        """(4,) detached [sum of outcome, count of has_outcome, sum of step, count of has_step], at least
        float32 (exact counts): all-reduce it (or add it over micro-batches) in one go."""
        dtype = torch.promote_types(self.outcome.dtype, torch.float32)
        parts = (self.outcome.sum(), self.has_outcome.sum(), self.step.sum(), self.has_step.sum())
        return torch.stack([part.detach().to(dtype) for part in parts])

    def loss(self, totals):
        """This shard's share of (8): w_outcome * sum(outcome) / N_outcome + w_step * sum(step) / N_step.

        totals: (4,) from sums(); only its counts N_outcome = totals[1], N_step = totals[3] are used. With
        this batch's own sums() it equals reduction="mean"; with the sums of all shards (ranks or
        micro-batches) of one step, the shards' losses add up to (8) of the whole step's batch. A level
        with count 0 adds a zero that is still on the graph.
        """
        n_outcome, n_step = totals[1].clamp(min=1), totals[3].clamp(min=1)
        return self.w_outcome * self.outcome.sum() / n_outcome + self.w_step * self.step.sum() / n_step  # (8)


def kto_losses(rewards, desirable, z0, beta=0.1, lambda_d=1.0, lambda_u=1.0):
    """Per-item KTO loss  l = lambda_y - v  (KTO paper eq. 7-8; TRL's `loss_type="kto"`).

        v = lambda_D * sigmoid(beta * (r - z0))   if desirable
            lambda_U * sigmoid(beta * (z0 - r))   if undesirable

    rewards: (N,) implied rewards r = log pi(y|x) - log pi_ref(y|x) (any shape works: it is elementwise).
    desirable: bool, same shape as rewards. z0: scalar tensor; detached here, since KTO's reference point
    is a baseline, not something to optimise. Returns the per-item losses, same shape as rewards.
    """
    _check_same_shape("desirable", desirable, "rewards", rewards)
    _check_bool("desirable", desirable)
    _check_scalar("z0", z0)
    z0 = z0.detach()
    desirable_value = lambda_d * torch.sigmoid(beta * (rewards - z0))  # (3)
    undesirable_value = lambda_u * torch.sigmoid(beta * (z0 - rewards))  # (3)
    return torch.where(desirable, lambda_d - desirable_value, lambda_u - undesirable_value)  # (4)


def estimate_z0(kl_logratios):
    """KTO reference point z0 = max(0, mean of log pi(y'|x) - log pi_ref(y'|x)) over mismatched pairs; detached.

    kl_logratios: (N,) log-ratios of (prompt, another row's completion) pairs; N may be 0 on a rank.
    When torch.distributed is initialised the mean runs over ALL items of ALL ranks: the sum and the count
    are all-reduced, so a rank with 3 items and a rank with 30 do not get equal votes (a mean of local
    means would give them that). No items anywhere gives z0 = 0. Returns a scalar tensor, at least float32.
    """
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


def step_logps(token_logps, step_ids, num_steps, span="step"):
    """Sum per-token log-probs into per-step log-probs in one pass (one scatter_add, no per-step loop).

    token_logps: (B, T) log-probs of the completion tokens (log p(t_j | t_<j), already shifted).
    step_ids: (B, T) long, the step index 0..num_steps-1 of each token, -1 for tokens not scored
    (prompt, padding). Returns (B, num_steps):
        span="step":   out[b, k] = sum_{j: step_ids[b, j] == k} token_logps[b, j]    (the step's own tokens)
        span="prefix": out[b, k] = sum_{j: 0 <= step_ids[b, j] <= k} token_logps[b, j] (all tokens through k)
    A step index with no tokens adds nothing: 0 for span="step", the previous prefix for span="prefix"
    (mask such padding steps out with step_mask downstream).
    """
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
    """Step-level implied rewards (6) r_k = step_logps(policy) - step_logps(ref), shape (B, num_steps).

    Both token log-prob tensors are (B, T) over the same token ids and step_ids; see step_logps for span.
    Computed as one scatter of the per-token log-ratio (1), which is the same sum (step_logps is linear).
    With one step covering the whole completion (num_steps=1), r_0 is the completion's r(x, y) of (1).
    """
    _check_same_shape("ref_token_logps", ref_token_logps, "policy_token_logps", policy_token_logps)
    return step_logps(policy_token_logps - ref_token_logps, step_ids, num_steps, span)  # (1) per token -> (6)


def through_first_error(step_labels, step_mask):
    """Step mask (K_i of (7), OUR READING) that keeps the steps up to and including the first wrong step.

        keep_k = step_mask_k  and  no j < k with step_mask_j and not step_labels_j

    step_labels, step_mask: (B, K) bool. Returns (B, K) bool. A completion with no wrong step keeps all its
    real steps. Why: the label of a step that follows an error is ill-defined (module docstring).
    """
    _check_same_shape("step_mask", step_mask, "step_labels", step_labels)
    _check_bool("step_labels", step_labels)
    _check_bool("step_mask", step_mask)
    wrong = (step_mask & ~step_labels).long()  # (B, K)
    wrong_before = wrong.cumsum(dim=1) - wrong  # (B, K) wrong steps strictly before k
    return step_mask & (wrong_before == 0)  # K_i of (7)


def stepkto_loss(outcome_logratios, outcome_labels, step_logratios, step_labels, step_mask, z0, z0_step=None,
                 beta=0.1, lambda_d=1.0, lambda_u=1.0, w_outcome=1.0, w_step=1.0, step_aggregation="mean",
                 step_lambda_d=None, step_lambda_u=None, reduction="mean"):
    """Step-KTO loss (8)  L = w_outcome * L_outcome + w_step * L_step  (equations in the module docstring).

    outcome_logratios (B,): r(x_i, y_i) of (1), summed over each completion's tokens; outcome_labels (B,)
    bool. step_logratios (B, K): r_k of (6), from step_rewards; step_labels (B, K) bool; step_mask (B, K)
    bool: the scored steps K_i (False for padding steps; K may be 0; optionally through_first_error).
    z0: scalar from estimate_z0 (2) over the outcome-level KL pairs; z0_step: None reuses z0 for the steps
    (our default), else estimate_z0 over mismatched pairs' step log-ratios. L_outcome (5): mean over the B
    completions of kto_losses (TRL's KTO loss). L_step (7): mean over completions with >= 1 scored step of
    the mean (or sum: step_aggregation) of kto_losses over its scored steps; a term of weight 0 (or with no
    scored step) is skipped. step_lambda_d / _u: the step level's lambda_D / U (None: the outcome level's;
    the KTO paper advises lambda_D n_D / (lambda_U n_U) in [1, 4/3] at each level, and the two differ).

    reduction="mean": (loss, metrics), loss the scalar (8) of this batch. reduction="none": (terms, metrics),
    terms a StepKTOTerms (per-completion summands of (5) and (7) and the masks of each mean), from which a
    distributed trainer takes GLOBAL means with one all-reduce (module docstring, "Under torch.distributed");
    terms.loss(terms.sums()) is the "mean" loss. metrics, detached: loss/total, loss/outcome, loss/step (this
    batch's means), kl/z0, kl/z0_step (when given), and per level and side rewards/{level}_{side} (mean of
    beta * log-ratio, TRL's `rewards/chosen`) and count/{level}_{side}; a side absent from the batch is absent.
    """
    _check_stepkto_inputs(outcome_logratios, outcome_labels, step_logratios, step_labels, step_mask)
    _check_stepkto_options(z0, z0_step, w_outcome, w_step, step_aggregation, reduction)
    kto_args = dict(beta=beta, lambda_d=lambda_d, lambda_u=lambda_u)
    step_z0, step_args = _step_level(z0, z0_step, kto_args, step_lambda_d, step_lambda_u)
    metrics = {"kl/z0": z0.detach(), **({} if z0_step is None else {"kl/z0_step": z0_step.detach()}),
               **_reward_metrics("outcome", outcome_logratios, outcome_labels, beta),
               **_reward_metrics("step", step_logratios[step_mask], step_labels[step_mask], beta)}
    outcome_level = (outcome_logratios, outcome_labels, z0, kto_args, w_outcome)
    step_level = (step_logratios, step_labels, step_mask, step_z0, step_aggregation, step_args, w_step)
    if reduction == "none":
        return _per_completion_terms(outcome_level, step_level, metrics), metrics
    loss = _mean_loss(outcome_level, step_level, metrics)
    metrics["loss/total"] = loss.detach()
    return loss, metrics


def _per_completion_terms(outcome_level: tuple, step_level: tuple, metrics: dict) -> "StepKTOTerms":
    """reduction="none": the per-completion summands of (5) and (7) and the masks of their means."""
    outcome_logratios, outcome_labels, z0, kto_args, w_outcome = outcome_level
    step_logratios, step_labels, step_mask, step_z0, step_aggregation, step_args, w_step = step_level
    outcome_losses = kto_losses(outcome_logratios, outcome_labels, z0, **kto_args)  # (4): summands of (5)
    step_losses, has_step = _per_completion_step_losses(step_logratios, step_labels, step_mask, step_z0,
                                                        step_aggregation, step_args)
    terms = _masked_terms(outcome_losses, step_losses, has_step, w_outcome, w_step)
    metrics.update(_terms_metrics(terms))
    return terms


def _mean_loss(outcome_level: tuple, step_level: tuple, metrics: dict):
    """reduction="mean": (8) over this batch's means (5) and (7); adds loss/outcome, loss/step to metrics."""
    outcome_logratios, outcome_labels, z0, kto_args, w_outcome = outcome_level
    step_logratios, step_labels, step_mask, step_z0, step_aggregation, step_args, w_step = step_level
    terms = []
    if w_outcome != 0:
        outcome_loss = kto_losses(outcome_logratios, outcome_labels, z0, **kto_args).mean()  # (5)
        metrics["loss/outcome"] = outcome_loss.detach()
        terms.append(w_outcome * outcome_loss)  # (8)
    if w_step != 0 and bool(step_mask.any()):
        step_loss = _step_loss(step_logratios, step_labels, step_mask, step_z0, step_aggregation, step_args)
        metrics["loss/step"] = step_loss.detach()
        terms.append(w_step * step_loss)  # (8)
    # Nothing to learn from (step-only with no real steps): a zero that is still on the graph, so that
    # backward() and DDP's gradient hooks run as usual.
    return sum(terms) if terms else (outcome_logratios * 0).sum()  # (8)


def _step_level(z0, z0_step, kto_args, step_lambda_d, step_lambda_u):
    """(z0 of the step level, kto_losses arguments of the step level): each None falls back to the outcome's."""
    step_z0 = z0 if z0_step is None else z0_step
    step_args = dict(
        beta=kto_args["beta"],
        lambda_d=kto_args["lambda_d"] if step_lambda_d is None else step_lambda_d,
        lambda_u=kto_args["lambda_u"] if step_lambda_u is None else step_lambda_u,
    )
    return step_z0, step_args


def _per_completion_step_losses(step_logratios, step_labels, step_mask, z0, step_aggregation, kto_args):
    """(B,) AGG_{k in K_i} l_k, the summands of (7) (0 for a completion without scored steps), and (B,) bool
    has_step: the completions with >= 1 scored step, the set S of (7)."""
    # Padding steps may hold anything (even NaN): replace them before the sigmoid so that neither the
    # loss nor its gradient sees them (torch.where sends zero gradient to the unselected branch).
    real_logratios = torch.where(step_mask, step_logratios, torch.zeros_like(step_logratios))  # (B, K)
    per_step = kto_losses(real_logratios, step_labels, z0, **kto_args) * step_mask  # (B, K) l_k of (7)
    steps_per_completion = step_mask.sum(dim=1)  # (B,) |K_i|
    per_completion = per_step.sum(dim=1)  # (B,) AGG = sum
    if step_aggregation == "mean":
        per_completion = per_completion / steps_per_completion.clamp(min=1)  # (B,) AGG = mean
    return per_completion, steps_per_completion > 0


def _step_loss(step_logratios, step_labels, step_mask, z0, step_aggregation, kto_args):
    """L_step (7) = mean over completions with >= 1 scored step of (mean | sum) over its scored steps of l_k."""
    per_completion, has_step = _per_completion_step_losses(
        step_logratios, step_labels, step_mask, z0, step_aggregation, kto_args
    )
    return per_completion[has_step].mean()  # (7)


def _masked_terms(outcome_losses, step_losses, has_step, w_outcome, w_step):
    """StepKTOTerms of reduction="none": a level whose weight is 0 has no completion in its mean, as in
    reduction="mean" where it is skipped; losses outside the masks are 0 (still on the graph)."""
    has_outcome = torch.full_like(has_step, w_outcome != 0)  # (B,) bool
    has_step = has_step & (w_step != 0)  # (B,) bool
    return StepKTOTerms(
        outcome=torch.where(has_outcome, outcome_losses, torch.zeros_like(outcome_losses)),
        step=torch.where(has_step, step_losses, torch.zeros_like(step_losses)),
        has_outcome=has_outcome,
        has_step=has_step,
        w_outcome=w_outcome,
        w_step=w_step,
    )


def _terms_metrics(terms):
    """loss/* of reduction="none", as reduction="mean" logs them: this batch's means of (5), (7) and (8)."""
    totals = terms.sums()  # (4,)
    metrics = {}
    if terms.w_outcome != 0:
        metrics["loss/outcome"] = totals[0] / totals[1]
    if terms.w_step != 0 and totals[3] > 0:
        metrics["loss/step"] = totals[2] / totals[3]
    metrics["loss/total"] = terms.loss(totals).detach()
    return metrics


def _reward_metrics(level, logratios, labels, beta):
    """rewards/{level}_{side} (mean of beta * r) and count/{level}_{side}, only for sides present."""
    metrics = {}
    for side, is_side in (("desirable", labels), ("undesirable", ~labels)):
        count = is_side.sum()
        if count > 0:
            metrics[f"rewards/{level}_{side}"] = (beta * logratios[is_side]).mean().detach()
            metrics[f"count/{level}_{side}"] = count.detach().float()
    return metrics


def _check_step_inputs(token_logps, step_ids, num_steps, span):
    """Fail early, naming the argument, instead of a scatter index error (or a CUDA device assert)."""
    if token_logps.dim() != 2:
        raise ValueError(f"step_logps: token_logps must be (B, T), got shape {tuple(token_logps.shape)}")
    _check_same_shape("step_ids", step_ids, "token_logps", token_logps)
    if step_ids.dtype != torch.long:
        raise ValueError(f"step_logps: step_ids must be torch.long, got {step_ids.dtype}")
    if span not in SPANS:
        raise ValueError(f"step_logps: span must be one of {SPANS}, got {span!r}")
    if num_steps < 0:
        raise ValueError(f"step_logps: num_steps must be >= 0, got {num_steps}")
    if step_ids.numel() > 0 and (step_ids.min() < -1 or step_ids.max() >= num_steps):
        raise ValueError(
            f"step_logps: step_ids must lie in [-1, {num_steps - 1}] (num_steps={num_steps}), "
            f"got min {int(step_ids.min())} max {int(step_ids.max())}"
        )


def _check_stepkto_inputs(outcome_logratios, outcome_labels, step_logratios, step_labels, step_mask):
    """Shapes and dtypes of stepkto_loss's batch tensors: (B,) outcome, (B, K) step, bool labels/mask."""
    if outcome_logratios.dim() != 1 or outcome_logratios.numel() == 0:
        shape = tuple(outcome_logratios.shape)
        raise ValueError(f"stepkto_loss: outcome_logratios must be (B,) with B >= 1, got {shape}")
    _check_same_shape("outcome_labels", outcome_labels, "outcome_logratios", outcome_logratios)
    batch_size = outcome_logratios.size(0)
    if step_logratios.dim() != 2 or step_logratios.size(0) != batch_size:
        raise ValueError(f"stepkto_loss: step_logratios must be (B={batch_size}, K), got {tuple(step_logratios.shape)}")
    _check_same_shape("step_labels", step_labels, "step_logratios", step_logratios)
    _check_same_shape("step_mask", step_mask, "step_logratios", step_logratios)
    for name, tensor in (("outcome_labels", outcome_labels), ("step_labels", step_labels), ("step_mask", step_mask)):
        _check_bool(name, tensor)


def _check_stepkto_options(z0, z0_step, w_outcome, w_step, step_aggregation, reduction):
    """stepkto_loss's scalar arguments: z0 / z0_step scalar tensors, weights, step_aggregation, reduction."""
    _check_scalar("z0", z0)
    if z0_step is not None:
        _check_scalar("z0_step", z0_step)
    if w_outcome < 0 or w_step < 0 or (w_outcome == 0 and w_step == 0):
        raise ValueError(f"stepkto_loss: need w_outcome, w_step >= 0, not both 0; got {w_outcome}, {w_step}")
    if step_aggregation not in STEP_AGGREGATIONS:
        raise ValueError(f"stepkto_loss: step_aggregation must be one of {STEP_AGGREGATIONS}, got {step_aggregation!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"stepkto_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_same_shape(name, tensor, reference_name, reference):
    if tensor.shape != reference.shape:
        expected, got = tuple(reference.shape), tuple(tensor.shape)
        raise ValueError(f"{name} must have the shape of {reference_name} {expected}, got {got}")


def _check_bool(name, tensor):
    if tensor.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {tensor.dtype}")


def _check_scalar(name, tensor):
    if not torch.is_tensor(tensor) or tensor.numel() != 1:
        shape = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a scalar tensor (e.g. from estimate_z0), got {shape}")
