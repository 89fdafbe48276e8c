"""The Step-KTO objective in one file (imports only torch): copy it into your trainer.

Step-KTO (Lin et al., 2025, arXiv:2501.10799) trains a policy on binary feedback at two levels: a binary
OUTCOME label per completion (is the final answer right?) and a binary label per reasoning STEP (from a
process reward model / step labeller). Both levels go through the KTO value function of Ethayarajh et
al. (2024, arXiv:2402.01306).

Notation. x is a prompt, y = (s_1, ..., s_K) a completion made of K steps, pi the policy, pi_ref the frozen
reference, sigma the logistic function, beta > 0, lambda_D / lambda_U the desirable / undesirable weights.

    implied reward      r(x, y)   = log pi(y | x) - log pi_ref(y | x)
    reference point     z0        = max(0, mean_{(x, y') in KL pairs} [log pi(y' | x) - log pi_ref(y' | x)])
                                    (y' is another row's completion: a mismatched pair; z0 is detached)
    value               v(x, y)   = lambda_D * sigma(beta * (r(x, y) - z0))   if y is desirable
                                    lambda_U * sigma(beta * (z0 - r(x, y)))   if y is undesirable
    per-item loss       l(x, y)   = lambda_y - v(x, y)       (lambda_y = lambda_D or lambda_U by the label)

Outcome level (THE PAPER'S: plain KTO on the outcome label, KTO paper eq. 7-8):

    L_outcome = mean_{i=1..B} l(x_i, y_i)

Step level (OUR READING: the paper says steps get binary labels that enter a KTO-style objective, but its
exact step-level equation is not available to us). The step reward of step k is

    span="step"   (default)  r_k = log pi(s_k | x, s_<k) - log pi_ref(s_k | x, s_<k)
    span="prefix"            r_k = log pi(s_<=k | x)    - log pi_ref(s_<=k | x)   = sum_{j<=k} r_j(step)

    l_k = lambda_{y_k} - v_k,  v_k as above with r_k, the step label, and z0_step in place of z0
    L_step = mean over completions with at least one step of  AGG_{k=1..K_i} l_k
             AGG = mean (default) or sum over that completion's real (unpadded) steps

    L = w_outcome * L_outcome + w_step * L_step        (defaults w_outcome = w_step = 1)

Which steps carry a label (OUR READING, `through_first_error`): a step after the first wrong step is judged
on a prefix that is already wrong, and its label then depends on the labeller's convention (against the
value the text wrote, or the true one). Uesato et al. (2022) and ProcessBench (Zheng et al., 2024) label
the first error only; passing step_mask = through_first_error(step_labels, step_mask) scores the steps up
to and including the first wrong one, and none after it. Passing step_mask as it is scores every real step
(the default of train.py, as the paper's judge labels every step).

What is the paper's and what is ours:
  * paper: KTO value function at the outcome level; binary step labels and binary outcome labels; one
    objective combining both levels; iterative training (M0 -> M1 -> M2 -> M3, the trainer's job).
  * ours: the span of the step reward (own tokens vs whole prefix), the aggregation over steps (mean vs sum),
    which steps are scored (all, or through the first wrong step),
    the weighting between levels (w_outcome, w_step), and z0 for steps (default: reuse the outcome-level z0;
    alternatively estimate_z0 over mismatched pairs' step log-ratios, passed as z0_step).
  * w_step = 0 is plain KTO (the paper's baseline); w_outcome = 0 is a step-only ablation.

Deviation from TRL, on purpose: under torch.distributed, estimate_z0 takes the mean over all items of all
ranks (sum and count all-reduced); TRL's KTOTrainer averages per-rank means. They agree on one process.
"""

import torch
import torch.distributed as dist

SPANS = ("step", "prefix")
STEP_AGGREGATIONS = ("mean", "sum")


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
    desirable_value = lambda_d * torch.sigmoid(beta * (rewards - z0))
    undesirable_value = lambda_u * torch.sigmoid(beta * (z0 - rewards))
    return torch.where(desirable, lambda_d - desirable_value, lambda_u - undesirable_value)


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
        return (total / count.clamp(min=1)).clamp(min=0)


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
    sums = token_logps.new_zeros(batch_size, num_steps + 1).scatter_add(1, column, token_logps)  # (B, K+1)
    sums = sums[:, :num_steps]  # (B, K)
    if span == "prefix":
        # The prefix through step k is the step sums of steps 0..k: a cumsum over the step axis.
        sums = sums.cumsum(dim=1)
    return sums


def step_rewards(policy_token_logps, ref_token_logps, step_ids, num_steps, span="step"):
    """Step-level implied rewards r_k = step_logps(policy) - step_logps(ref), shape (B, num_steps).

    Both token log-prob tensors are (B, T) over the same token ids and step_ids; see step_logps for span.
    Computed as one scatter of the per-token log-ratio, which is the same sum (step_logps is linear).
    """
    _check_same_shape("ref_token_logps", ref_token_logps, "policy_token_logps", policy_token_logps)
    return step_logps(policy_token_logps - ref_token_logps, step_ids, num_steps, span)


def through_first_error(step_labels, step_mask):
    """Step mask that keeps the steps up to and including each completion's first wrong step.

        keep_k = step_mask_k  and  no j < k with step_mask_j and not step_labels_j

    step_labels, step_mask: (B, K) bool. Returns (B, K) bool. A completion with no wrong step keeps all its
    real steps. Why: the label of a step that follows an error is ill-defined (module docstring).
    """
    _check_same_shape("step_mask", step_mask, "step_labels", step_labels)
    _check_bool("step_labels", step_labels)
    _check_bool("step_mask", step_mask)
    wrong = (step_mask & ~step_labels).long()  # (B, K)
    wrong_before = wrong.cumsum(dim=1) - wrong  # (B, K) wrong steps strictly before k
    return step_mask & (wrong_before == 0)


def stepkto_loss(
    outcome_logratios,
    outcome_labels,
    step_logratios,
    step_labels,
    step_mask,
    z0,
    z0_step=None,
    beta=0.1,
    lambda_d=1.0,
    lambda_u=1.0,
    w_outcome=1.0,
    w_step=1.0,
    step_aggregation="mean",
    step_lambda_d=None,
    step_lambda_u=None,
):
    """Step-KTO loss  L = w_outcome * L_outcome + w_step * L_step  (equations in the module docstring).

    outcome_logratios: (B,) r(x_i, y_i) summed over each completion's tokens. outcome_labels: (B,) bool.
    step_logratios: (B, K) from step_rewards. step_labels: (B, K) bool. step_mask: (B, K) bool, False for
    padding steps (K may be 0). z0: scalar from estimate_z0 over the outcome-level KL pairs. z0_step: None
    reuses z0 for the steps (our default), else the step-level estimate (estimate_z0 over mismatched pairs'
    step log-ratios). L_outcome = mean over the B completions of kto_losses: this is TRL's KTO loss (TRL
    takes the nanmean of the concatenated desirable and undesirable losses). L_step = mean over completions
    with >= 1 real step of the mean (or sum, step_aggregation) of kto_losses over that completion's real
    steps. A term whose weight is 0 is skipped, the step term also when no completion has a real step.
    step_lambda_d / step_lambda_u: lambda_D / lambda_U of the step level (None: the outcome level's). The
    two levels are usually unbalanced in different ways (e.g. few right answers but many right steps), and
    the KTO paper advises lambda_D * n_D / (lambda_U * n_U) in [1, 4/3] at each level.

    Returns (loss, metrics). metrics holds detached tensors: loss/total, loss/outcome, loss/step (when
    computed), kl/z0, kl/z0_step (when given), and per level and side, rewards/{level}_{side} (mean of
    beta * log-ratio, TRL's `rewards/chosen` convention) and count/{level}_{side}; a side absent from
    the batch is absent from the dict.
    """
    _check_stepkto_inputs(outcome_logratios, outcome_labels, step_logratios, step_labels, step_mask)
    _check_scalar("z0", z0)
    if z0_step is not None:
        _check_scalar("z0_step", z0_step)
    if w_outcome < 0 or w_step < 0 or (w_outcome == 0 and w_step == 0):
        raise ValueError(f"stepkto_loss: need w_outcome, w_step >= 0, not both 0; got {w_outcome}, {w_step}")
    if step_aggregation not in STEP_AGGREGATIONS:
        raise ValueError(f"stepkto_loss: step_aggregation must be one of {STEP_AGGREGATIONS}, got {step_aggregation!r}")
    kto_args = dict(beta=beta, lambda_d=lambda_d, lambda_u=lambda_u)

    metrics = {"kl/z0": z0.detach()}
    if z0_step is not None:
        metrics["kl/z0_step"] = z0_step.detach()
    metrics.update(_reward_metrics("outcome", outcome_logratios, outcome_labels, beta))
    metrics.update(_reward_metrics("step", step_logratios[step_mask], step_labels[step_mask], beta))

    terms = []
    if w_outcome != 0:
        outcome_loss = kto_losses(outcome_logratios, outcome_labels, z0, **kto_args).mean()
        metrics["loss/outcome"] = outcome_loss.detach()
        terms.append(w_outcome * outcome_loss)
    if w_step != 0 and bool(step_mask.any()):
        step_z0 = z0 if z0_step is None else z0_step
        step_args = dict(
            beta=beta,
            lambda_d=lambda_d if step_lambda_d is None else step_lambda_d,
            lambda_u=lambda_u if step_lambda_u is None else step_lambda_u,
        )
        step_loss = _step_loss(step_logratios, step_labels, step_mask, step_z0, step_aggregation, step_args)
        metrics["loss/step"] = step_loss.detach()
        terms.append(w_step * step_loss)
    # Nothing to learn from (step-only with no real steps): a zero that is still on the graph, so that
    # backward() and DDP's gradient hooks run as usual.
    loss = sum(terms) if terms else (outcome_logratios * 0).sum()
    metrics["loss/total"] = loss.detach()
    return loss, metrics


def _step_loss(step_logratios, step_labels, step_mask, z0, step_aggregation, kto_args):
    """L_step = mean over completions with >= 1 real step of (mean | sum) over its real steps of l_k."""
    # Padding steps may hold anything (even NaN): replace them before the sigmoid so that neither the
    # loss nor its gradient sees them (torch.where sends zero gradient to the unselected branch).
    real_logratios = torch.where(step_mask, step_logratios, torch.zeros_like(step_logratios))  # (B, K)
    per_step = kto_losses(real_logratios, step_labels, z0, **kto_args) * step_mask  # (B, K)
    steps_per_completion = step_mask.sum(dim=1)  # (B,)
    per_completion = per_step.sum(dim=1)  # (B,)
    if step_aggregation == "mean":
        per_completion = per_completion / steps_per_completion.clamp(min=1)
    return per_completion[steps_per_completion > 0].mean()


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
