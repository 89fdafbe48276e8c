"""Tests for stepkto_loss.py against independent references: per-prefix forwards of a real tiny
transformers model, autograd.gradcheck, a real optimizer step, a 2-process torchrun, closed-form values.
The comparison with TRL's KTOTrainer lives in tests/test_loss_trl.py."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import stepkto_loss as sk  # noqa: E402
from helpers import perturbed_copy, tiny_llama  # noqa: E402
from stepkto_loss import (  # noqa: E402
    SPANS, StepKTOTerms, estimate_z0, kto_losses, step_logps, step_rewards, stepkto_loss, through_first_error,
)

VOCAB_SIZE = 50
PAD_ID = 0

# (prompt length, token count of each step): unequal prompts, steps and step counts, one row of 1 step.
EXAMPLES = [(5, [3, 2, 4]), (2, [1, 5]), (7, [2, 2, 2, 3]), (3, [6])]
NUM_STEPS = max(len(steps) for _, steps in EXAMPLES)


def make_sequences(seed):
    """Per row: the full token list, the step index of every token (-1 for the prompt), the step lengths."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for prompt_len, step_lens in EXAMPLES:
        length = prompt_len + sum(step_lens)
        tokens = torch.randint(1, VOCAB_SIZE, (length,), generator=generator).tolist()
        ids = [-1] * prompt_len + [k for k, n in enumerate(step_lens) for _ in range(n)]
        rows.append((tokens, ids, step_lens))
    return rows


def pad_batch(rows):
    """Right-padded (B, T) input_ids, attention_mask and per-token step ids (-1 on prompt and padding)."""
    width = max(len(tokens) for tokens, _, _ in rows)
    input_ids = torch.full((len(rows), width), PAD_ID)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    token_step_ids = torch.full((len(rows), width), -1)
    for b, (tokens, ids, _) in enumerate(rows):
        input_ids[b, : len(tokens)] = torch.tensor(tokens)
        attention_mask[b, : len(tokens)] = 1
        token_step_ids[b, : len(ids)] = torch.tensor(ids)
    return input_ids, attention_mask, token_step_ids


def token_logps(model, input_ids, attention_mask):
    """(B, T-1): log p(input_ids[:, j+1] | input_ids[:, :j+1]), from the model's logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
    return logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def one_pass_logps(model, rows, span):
    """step_logps over one batched forward: the implementation under test."""
    input_ids, attention_mask, token_step_ids = pad_batch(rows)
    with torch.no_grad():
        logps = token_logps(model, input_ids, attention_mask)  # (B, T-1)
    # The log-prob at position j scores token j+1, so it belongs to token j+1's step.
    return logps, token_step_ids[:, 1:]


def per_prefix_logp(model, tokens, step_lens, k, span):
    """Independent reference: forward the prefix through step k alone and sum the scored tokens."""
    end = len(tokens) - sum(step_lens[k + 1 :])
    prefix = torch.tensor([tokens[:end]])
    with torch.no_grad():
        logps = token_logps(model, prefix, torch.ones_like(prefix))[0]
    scored = step_lens[k] if span == "step" else sum(step_lens[: k + 1])
    return logps[-scored:].sum().item()


@pytest.mark.parametrize("span", SPANS)
def test_step_rewards_one_pass_equal_one_forward_per_prefix(span):
    policy = tiny_llama(VOCAB_SIZE, seed=0, pad_token_id=PAD_ID).eval()
    reference = perturbed_copy(policy, seed=1)
    rows = make_sequences(seed=2)
    policy_logps, step_ids = one_pass_logps(policy, rows, span)
    ref_logps, _ = one_pass_logps(reference, rows, span)

    one_pass = step_logps(policy_logps, step_ids, NUM_STEPS, span)  # (B, K)
    rewards = step_rewards(policy_logps, ref_logps, step_ids, NUM_STEPS, span)  # (B, K)

    for b, (tokens, _, step_lens) in enumerate(rows):
        for k in range(len(step_lens)):
            expected_policy = per_prefix_logp(policy, tokens, step_lens, k, span)
            expected_reward = expected_policy - per_prefix_logp(reference, tokens, step_lens, k, span)
            assert one_pass[b, k].item() == pytest.approx(expected_policy, abs=1e-5)
            assert rewards[b, k].item() == pytest.approx(expected_reward, abs=1e-5)
        # Padding step columns (a row with fewer steps than K) add nothing to the step or the prefix.
        last_real = 0.0 if span == "step" else one_pass[b, len(step_lens) - 1]
        assert torch.all(one_pass[b, len(step_lens) :] == last_real)
    # The comparison is not vacuous: rewards are clearly non-zero.
    assert rewards[0, : len(rows[0][2])].abs().min() > 1e-3


def test_step_logps_ignores_unscored_tokens_even_if_not_finite():
    token_logps_ = torch.tensor([[float("nan"), -1.0, -2.0, float("-inf"), -4.0]])
    step_ids = torch.tensor([[-1, 0, 2, -1, 2]])  # step 1 has no tokens
    assert step_logps(token_logps_, step_ids, 3, "step").tolist() == [[-1.0, 0.0, -6.0]]
    assert step_logps(token_logps_, step_ids, 3, "prefix").tolist() == [[-1.0, -1.0, -7.0]]


def test_bad_step_ids_are_named():
    with pytest.raises(ValueError, match="step_ids must lie in"):
        step_logps(torch.zeros(1, 3), torch.tensor([[0, 1, 3]]), 3)
    with pytest.raises(ValueError, match="span"):
        step_logps(torch.zeros(1, 3), torch.tensor([[0, 1, 2]]), 3, span="suffix")
    with pytest.raises(ValueError, match="outcome_labels must be a bool"):
        stepkto_loss(torch.zeros(2), torch.tensor([1, 0]), torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool),
                     torch.zeros(2, 0, dtype=torch.bool), torch.tensor(0.0))


def random_batch(seed, batch_size=5, num_steps=4, dtype=torch.float64):
    """Mixed labels, unequal step counts (row 1 has none), padding steps holding NaN."""
    generator = torch.Generator().manual_seed(seed)
    outcome = torch.randn(batch_size, generator=generator, dtype=dtype)
    outcome_labels = torch.arange(batch_size) % 2 == 0
    steps = 3 * torch.randn(batch_size, num_steps, generator=generator, dtype=dtype)
    step_labels = torch.rand(batch_size, num_steps, generator=generator) < 0.5
    step_labels[0, 0], step_labels[0, 1] = True, False  # both sides present
    steps_per_row = torch.tensor([num_steps, 0, 2, 1, 3])[:batch_size]
    step_mask = torch.arange(num_steps)[None, :] < steps_per_row[:, None]
    steps = steps.masked_fill(~step_mask, float("nan"))
    return outcome, outcome_labels, steps, step_labels, step_mask


@pytest.mark.parametrize("aggregation", ["mean", "sum"])
def test_gradcheck_float64_and_no_gradient_into_z0(aggregation):
    outcome, outcome_labels, steps, step_labels, step_mask = random_batch(seed=0)
    z0 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    z0_step = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def loss_of(outcome_, steps_):
        return stepkto_loss(outcome_, outcome_labels, steps_, step_labels, step_mask, z0, z0_step,
                            beta=0.5, lambda_d=1.3, lambda_u=0.7, w_outcome=0.6, w_step=1.5,
                            step_aggregation=aggregation)[0]

    # gradcheck compares against finite differences; NaN padding must stay out of both.
    outcome.requires_grad_(True)
    steps.requires_grad_(True)
    assert torch.autograd.gradcheck(loss_of, (outcome, steps))
    loss_of(outcome, steps).backward()
    assert z0.grad is None and z0_step.grad is None
    assert torch.isfinite(steps.grad).all() and torch.all(steps.grad[~step_mask] == 0)


def test_gradcheck_through_step_rewards_prefix_span():
    generator = torch.Generator().manual_seed(3)
    policy = torch.randn(2, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    step_ids = torch.tensor([[-1, 0, 0, 1, 2, -1], [-1, -1, 0, 1, 1, 1]])
    step_labels = torch.tensor([[True, False, True], [False, True, True]])
    step_mask = torch.tensor([[True, True, True], [True, True, False]])

    def loss_of(policy_):
        rewards = step_rewards(policy_, ref, step_ids, 3, span="prefix")
        outcome = rewards[:, -1]
        return stepkto_loss(outcome, step_labels[:, 0], rewards, step_labels, step_mask, torch.tensor(0.1))[0]

    assert torch.autograd.gradcheck(loss_of, (policy,))


def test_estimate_z0_is_detached_clamped_mean():
    logratios = torch.tensor([0.5, -0.1, 1.0], requires_grad=True)
    z0 = estimate_z0(logratios)
    assert not z0.requires_grad
    assert z0.item() == pytest.approx(1.4 / 3)
    assert estimate_z0(torch.tensor([-1.0, 0.2])).item() == 0.0  # negative mean clamps to 0
    assert estimate_z0(torch.zeros(0)).item() == 0.0  # no items: 0, not NaN


def test_estimate_z0_torchrun_two_ranks_unequal_counts():
    worker = REPO_ROOT / "tests" / "dist_z0_worker.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    # Both ranks checked every case (the worker prints one line per rank and case).
    assert result.stdout.count("z0 OK") == 2 * 3, result.stdout


def test_kto_losses_closed_form_points():
    """At r = z0 the value is lambda * sigmoid(0) = lambda / 2 on both sides; far from z0 it saturates."""
    z0 = torch.tensor(0.4)
    rewards = torch.tensor([0.4, 0.4, 1e4, -1e4, 1e4, -1e4])
    desirable = torch.tensor([True, False, True, True, False, False])
    losses = kto_losses(rewards, desirable, z0, beta=0.1, lambda_d=2.0, lambda_u=0.5)
    assert losses.tolist() == pytest.approx([1.0, 0.25, 0.0, 2.0, 0.5, 0.0])


def check_finite(loss, metrics):
    assert torch.isfinite(loss)
    for name, value in metrics.items():
        assert not value.requires_grad, name
        assert torch.isfinite(value).all(), name


def test_all_desirable_and_all_undesirable_drop_the_absent_side():
    outcome, _, steps, _, step_mask = random_batch(seed=1)
    for side, absent in (("desirable", "undesirable"), ("undesirable", "desirable")):
        labels = torch.full((5,), side == "desirable")
        step_labels = torch.full((5, 4), side == "desirable")
        loss, metrics = stepkto_loss(outcome, labels, steps, step_labels, step_mask, torch.tensor(0.2))
        check_finite(loss, metrics)
        for level in ("outcome", "step"):
            assert f"rewards/{level}_{side}" in metrics and f"count/{level}_{side}" in metrics
            assert f"rewards/{level}_{absent}" not in metrics and f"count/{level}_{absent}" not in metrics
        assert metrics["count/step_" + side].item() == step_mask.sum().item()


def test_completion_without_steps_is_left_out_of_the_step_mean():
    outcome, labels, steps, step_labels, step_mask = random_batch(seed=2)
    assert not step_mask[1].any()
    z0 = torch.tensor(0.2, dtype=torch.float64)
    _, metrics = stepkto_loss(outcome, labels, steps, step_labels, step_mask, z0)
    # Reference built from kto_losses row by row, over the four rows that have steps.
    row_means = [kto_losses(steps[b][step_mask[b]], step_labels[b][step_mask[b]], z0).mean()
                 for b in range(5) if step_mask[b].any()]
    assert metrics["loss/step"].item() == pytest.approx(torch.stack(row_means).mean().item(), abs=1e-12)
    _, summed = stepkto_loss(outcome, labels, steps, step_labels, step_mask, z0, step_aggregation="sum")
    row_sums = [kto_losses(steps[b][step_mask[b]], step_labels[b][step_mask[b]], z0).sum()
                for b in range(5) if step_mask[b].any()]
    assert summed["loss/step"].item() == pytest.approx(torch.stack(row_sums).mean().item(), abs=1e-12)


def test_padding_steps_change_nothing():
    outcome, labels, steps, step_labels, step_mask = random_batch(seed=4)
    z0 = torch.tensor(0.1, dtype=torch.float64)
    loss, _ = stepkto_loss(outcome, labels, steps, step_labels, step_mask, z0)
    wider = torch.cat([steps, torch.full((5, 3), float("nan"), dtype=steps.dtype)], dim=1)  # 3 more pad steps
    wider_labels = torch.cat([step_labels, torch.ones(5, 3, dtype=torch.bool)], dim=1)
    wider_mask = torch.cat([step_mask, torch.zeros(5, 3, dtype=torch.bool)], dim=1)
    wider_loss, metrics = stepkto_loss(outcome, labels, wider, wider_labels, wider_mask, z0)
    check_finite(wider_loss, metrics)
    assert wider_loss.item() == pytest.approx(loss.item(), abs=1e-12)


def test_batch_of_one_and_weights_select_terms():
    outcome, labels = torch.tensor([0.8]), torch.tensor([True])
    steps, step_labels = torch.tensor([[0.5, -2.0]]), torch.tensor([[True, False]])
    step_mask = torch.ones(1, 2, dtype=torch.bool)
    z0, z0_step = torch.tensor(0.3), torch.tensor(0.9)
    loss, metrics = stepkto_loss(outcome, labels, steps, step_labels, step_mask, z0, z0_step, w_outcome=0.5, w_step=2.0)
    check_finite(loss, metrics)
    outcome_loss = kto_losses(outcome, labels, z0).mean()
    step_loss = kto_losses(steps[0], step_labels[0], z0_step).mean()  # the step term uses z0_step
    assert loss.item() == pytest.approx(0.5 * outcome_loss.item() + 2.0 * step_loss.item(), abs=1e-6)
    assert metrics["kl/z0_step"].item() == pytest.approx(0.9)

    plain_kto, plain_metrics = stepkto_loss(outcome, labels, steps, step_labels, step_mask, z0, w_step=0.0)
    assert plain_kto.item() == pytest.approx(outcome_loss.item(), abs=1e-7)
    assert "loss/step" not in plain_metrics and "kl/z0_step" not in plain_metrics
    step_only, step_metrics = stepkto_loss(outcome, labels, steps, step_labels, step_mask, z0, w_outcome=0.0)
    assert "loss/outcome" not in step_metrics
    # z0_step=None: the steps reuse the outcome-level z0 (our default).
    assert step_only.item() == pytest.approx(kto_losses(steps[0], step_labels[0], z0).mean().item(), abs=1e-7)


def test_no_real_steps_skips_the_step_term_and_stays_differentiable():
    outcome = torch.tensor([0.3, -0.2], requires_grad=True)
    labels = torch.tensor([True, False])
    no_steps = (torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool), torch.zeros(2, 0, dtype=torch.bool))
    loss, metrics = stepkto_loss(outcome, labels, *no_steps, torch.tensor(0.0))
    assert "loss/step" not in metrics
    assert not any(key.endswith(("step_desirable", "step_undesirable")) for key in metrics)
    assert loss.item() == pytest.approx(metrics["loss/outcome"].item())
    step_only, _ = stepkto_loss(outcome, labels, *no_steps, torch.tensor(0.0), w_outcome=0.0)
    step_only.backward()  # zero loss, still on the graph
    assert step_only.item() == 0.0 and torch.all(outcome.grad == 0)
    with pytest.raises(ValueError, match="not both 0"):
        stepkto_loss(outcome, labels, *no_steps, torch.tensor(0.0), w_outcome=0.0, w_step=0.0)


def test_one_optimizer_step_moves_step_logps_by_label():
    """A real tiny model: desirable steps become more likely, undesirable ones less likely."""
    policy = tiny_llama(VOCAB_SIZE, seed=5, initializer_range=0.02, pad_token_id=PAD_ID).eval()
    reference = copy.deepcopy(policy)
    rows = make_sequences(seed=6)
    input_ids, attention_mask, token_step_ids = pad_batch(rows)
    step_ids = token_step_ids[:, 1:]
    step_mask = torch.tensor([[k < len(steps) for k in range(NUM_STEPS)] for _, _, steps in rows])
    step_labels = torch.tensor([[True, False, True, False], [False, True, False, False],
                                [True, True, False, False], [False, False, False, False]])
    outcome_labels = torch.tensor([True, False, True, False])

    def step_logps_of(model):
        return step_logps(token_logps(model, input_ids, attention_mask), step_ids, NUM_STEPS)  # (B, K)

    with torch.no_grad():
        ref_steps = step_logps_of(reference)
        before = step_logps_of(policy)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    policy_steps = step_logps_of(policy)
    rewards = policy_steps - ref_steps
    completion_rewards = (rewards * step_mask).sum(dim=1)  # span "step" sums to the completion log-ratio
    loss, _ = stepkto_loss(completion_rewards, outcome_labels, rewards, step_labels, step_mask, torch.tensor(0.0),
                           w_outcome=0.0)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        change = step_logps_of(policy) - before  # (B, K)
    assert torch.all(change[step_mask & step_labels] > 0), change
    assert torch.all(change[step_mask & ~step_labels] < 0), change


def test_step_level_has_its_own_lambdas():
    """step_lambda_d / step_lambda_u weight only the step level; None falls back to the outcome's."""
    torch.manual_seed(0)
    outcome, steps = torch.randn(3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    o_labels = torch.tensor([True, False, False])
    s_labels = torch.tensor([[True, False], [False, False], [True, True]])
    mask = torch.ones(3, 2, dtype=torch.bool)
    z0 = torch.tensor(0.1, dtype=torch.float64)
    base = dict(outcome_logratios=outcome, outcome_labels=o_labels, step_logratios=steps, step_labels=s_labels,
                step_mask=mask, z0=z0, lambda_d=1.0, lambda_u=0.5)
    _, same = stepkto_loss(**base)
    _, explicit = stepkto_loss(**base, step_lambda_d=1.0, step_lambda_u=0.5)
    _, other = stepkto_loss(**base, step_lambda_d=0.25, step_lambda_u=1.0)
    assert torch.equal(same["loss/step"], explicit["loss/step"])
    assert torch.equal(same["loss/outcome"], other["loss/outcome"])
    expected = (kto_losses(steps, s_labels, z0, lambda_d=0.25, lambda_u=1.0).mean(dim=1)).mean()
    assert torch.allclose(other["loss/step"], expected)


def first_error_mask_by_loop(labels, mask):
    """Reference for through_first_error: walk each row's real steps, stop after the first wrong one."""
    keep = torch.zeros_like(mask)
    for b in range(mask.size(0)):
        for k in range(mask.size(1)):
            if mask[b, k]:
                keep[b, k] = True
                if not labels[b, k]:
                    break
    return keep


def test_through_first_error_matches_a_loop_on_random_masks():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        labels = torch.rand(6, 7, generator=generator) < 0.7
        mask = torch.rand(6, 7, generator=generator) < 0.8  # holes too: a wrong padding step counts for nothing
        assert torch.equal(through_first_error(labels, mask), first_error_mask_by_loop(labels, mask))
    labels = torch.tensor([[True, False, False, True], [True, True, True, True], [False, True, True, True]])
    expected = torch.tensor([[True, True, False, False], [True, True, True, True], [True, False, False, False]])
    assert torch.equal(through_first_error(labels, torch.ones(3, 4, dtype=torch.bool)), expected)
    with pytest.raises(ValueError, match="step_mask"):
        through_first_error(labels, torch.ones(3, 5, dtype=torch.bool))


def test_steps_after_the_first_error_get_no_gradient():
    steps = torch.tensor([[0.4, -1.0, 0.7, -0.3]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[True, False, True, False]])
    mask = through_first_error(labels, torch.ones(1, 4, dtype=torch.bool))
    loss, _ = stepkto_loss(torch.zeros(1, dtype=torch.float64), torch.tensor([True]), steps, labels, mask,
                           torch.tensor(0.0), w_outcome=0.0)
    loss.backward()
    assert torch.all(steps.grad[0, :2] != 0) and torch.all(steps.grad[0, 2:] == 0)
    assert loss.item() == pytest.approx(kto_losses(steps[0, :2], labels[0, :2], torch.tensor(0.0)).mean().item())


# reduction="none": per-completion terms from which a distributed trainer takes the global means itself.

NONE_OPTIONS = {
    "defaults": dict(),
    "lambdas_z0_step": dict(lambda_d=1.3, lambda_u=0.7, step_lambda_d=0.25, step_lambda_u=1.1, z0_step=0.9),
    "weights_beta": dict(beta=0.5, w_outcome=0.6, w_step=1.5),
    "step_only": dict(w_outcome=0.0),
    "outcome_only": dict(w_step=0.0),
    "first_error": dict(first_error=True, lambda_u=1.4),
}


def loss_both_ways(batch, options, reduction):
    """stepkto_loss on leaf copies of the batch's log-ratios; returns (loss or terms, metrics, leaves)."""
    outcome, labels, steps, step_labels, step_mask = batch
    options = dict(options)
    if options.pop("first_error", False):
        step_mask = through_first_error(step_labels, step_mask)
    if "z0_step" in options:
        options["z0_step"] = torch.tensor(options["z0_step"], dtype=torch.float64)
    outcome, steps = outcome.clone().requires_grad_(True), steps.clone().requires_grad_(True)
    result, metrics = stepkto_loss(outcome, labels, steps, step_labels, step_mask,
                                   torch.tensor(0.2, dtype=torch.float64), reduction=reduction, **options)
    return result, metrics, (outcome, steps)


@pytest.mark.parametrize("aggregation", ["mean", "sum"])
@pytest.mark.parametrize("name", sorted(NONE_OPTIONS))
def test_reduction_none_summed_over_the_counts_is_the_mean(aggregation, name):
    options = {**NONE_OPTIONS[name], "step_aggregation": aggregation}
    batch = random_batch(seed=7)
    loss, mean_metrics, mean_leaves = loss_both_ways(batch, options, "mean")
    terms, metrics, leaves = loss_both_ways(batch, options, "none")
    assert isinstance(terms, StepKTOTerms)
    assert terms.outcome.shape == terms.step.shape == terms.has_outcome.shape == terms.has_step.shape == (5,)
    assert terms.has_outcome.dtype == terms.has_step.dtype == torch.bool
    # Outside the masks the terms are exactly 0, so plain sums are the sums over the masked completions.
    assert torch.all(terms.outcome[~terms.has_outcome] == 0) and torch.all(terms.step[~terms.has_step] == 0)
    assert terms.has_step.tolist() == ([False] * 5 if options.get("w_step") == 0.0 else
                                       [True, False, True, True, True])
    # By hand: sum the per-completion terms, divide by the counts, weight as (8); a level with count 0 is out.
    w_outcome, w_step = options.get("w_outcome", 1.0), options.get("w_step", 1.0)
    by_hand = torch.zeros((), dtype=torch.float64)
    if terms.has_outcome.any():
        by_hand = by_hand + w_outcome * terms.outcome.sum() / terms.has_outcome.sum()
    if terms.has_step.any():
        by_hand = by_hand + w_step * terms.step.sum() / terms.has_step.sum()
    assert abs(by_hand.item() - loss.item()) < 1e-12
    # The same through the API, gradients included, and the same metrics.
    combined = terms.loss(terms.sums())
    assert abs(combined.item() - loss.item()) < 1e-12
    loss.backward()
    combined.backward()
    for leaf, mean_leaf in zip(leaves, mean_leaves):
        # one path: a level left out of (8) sends zeros either way
        assert torch.isfinite(leaf.grad).all() and torch.allclose(leaf.grad, mean_leaf.grad, rtol=0, atol=1e-12)
    # reduction="none" gives sums; divided, they are reduction="mean"'s metrics
    assert not any(k.startswith("kl/") for k in metrics)  # z0 is the caller's own
    metrics = {k: v for k, v in mean_metrics.items() if k.startswith("kl/")} | sk.reward_means(metrics) | \
        terms.sums().loss_metrics(w_outcome, w_step)
    assert sorted(metrics) == sorted(mean_metrics)
    for key, value in metrics.items():
        assert not value.requires_grad and abs(value.item() - mean_metrics[key].item()) < 1e-12, key


def shard(batch, rows):
    return tuple(tensor[rows] for tensor in batch)


def test_two_shards_of_reduction_none_combine_into_the_whole_batch_mean():
    """The property a distributed trainer needs: per-shard sums and counts, added (what one all_reduce does),
    give the whole batch's loss and gradient; averaging per-shard means (what DDP's gradient averaging does
    to reduction="mean") does not, when the shards hold different numbers of completions with steps."""
    generator = torch.Generator().manual_seed(11)
    outcome = torch.randn(6, generator=generator, dtype=torch.float64)
    labels = torch.tensor([True, False, True, False, False, True])
    steps = 3 * torch.randn(6, 4, generator=generator, dtype=torch.float64)
    step_labels = torch.rand(6, 4, generator=generator) < 0.5
    # Rows with steps: shard A (rows 0-1) has 1 of 2, shard B (rows 2-5) 4 of 4, with 4, 1, 3, 2 steps.
    step_mask = torch.arange(4)[None, :] < torch.tensor([3, 0, 4, 1, 3, 2])[:, None]
    steps = steps.masked_fill(~step_mask, float("nan"))
    shards = (torch.tensor([0, 1]), torch.tensor([2, 3, 4, 5]))
    z0 = torch.tensor(0.15, dtype=torch.float64)  # one z0 for all shards (estimate_z0 all-reduces)
    options = dict(beta=0.4, lambda_d=1.2, lambda_u=0.9, w_outcome=0.7, w_step=1.3)

    for aggregation in ("mean", "sum"):
        leaves = [outcome.clone().requires_grad_(True), steps.clone().requires_grad_(True)]
        whole, metrics = stepkto_loss(leaves[0], labels, leaves[1], step_labels, step_mask, z0,
                                      step_aggregation=aggregation, **options)
        whole.backward()
        parts = [outcome.clone().requires_grad_(True), steps.clone().requires_grad_(True)]
        batch = (parts[0], labels, parts[1], step_labels, step_mask)
        terms = [stepkto_loss(*shard(batch, rows), z0, step_aggregation=aggregation, reduction="none", **options)[0]
                 for rows in shards]
        totals = terms[0].sums().add(terms[1].sums())  # what all-reducing terms.sums().stack() gives every rank
        assert totals.n_outcome.item() == 6 and totals.n_step.item() == 5
        shares = [t.loss(totals) for t in terms]
        sum(shares).backward()  # each rank's backward; the gradients add up (DDP: mean, times world_size)
        assert abs(sum(shares).item() - whole.item()) < 1e-12
        for part, leaf in zip(parts, leaves):
            assert torch.allclose(part.grad, leaf.grad, rtol=0, atol=1e-12)
        assert abs(totals.loss_metrics(1.0, 1.0)["loss/step"].item() - metrics["loss/step"].item()) < 1e-12

        # Averaging the per-shard means gets the step term wrong: shard A's one completion with steps would
        # weigh 1/2 instead of 1/5. (It is right for the outcome term only when the shards are equal.)
        shard_metrics = [stepkto_loss(*shard((outcome, labels, steps, step_labels, step_mask), rows), z0,
                                      step_aggregation=aggregation, **options)[1] for rows in shards]
        mean_of_step_means = sum(m["loss/step"] for m in shard_metrics) / 2
        assert abs(mean_of_step_means.item() - metrics["loss/step"].item()) > 1e-3


def test_reduction_none_edge_cases():
    # No scored step anywhere and w_outcome = 0: a zero loss that is still on the graph, as reduction="mean".
    outcome = torch.tensor([0.3, -0.2], requires_grad=True)
    labels = torch.tensor([True, False])
    no_steps = (torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool), torch.zeros(2, 0, dtype=torch.bool))
    terms, metrics = stepkto_loss(outcome, labels, *no_steps, torch.tensor(0.0), w_outcome=0.0, reduction="none")
    assert not terms.has_outcome.any() and not terms.has_step.any()
    losses = terms.sums().loss_metrics(0.0, 1.0)
    assert "loss/outcome" not in losses and "loss/step" not in losses and losses["loss/total"].item() == 0.0
    loss = terms.loss(terms.sums())
    loss.backward()
    assert loss.item() == 0.0 and torch.all(outcome.grad == 0)
    # bfloat16 log-ratios: sums() is float32, so counts stay exact past bfloat16's 256.
    batch_size = 300
    ones = torch.ones(batch_size, 1, dtype=torch.bool)
    zeros = torch.zeros(batch_size, 1, dtype=torch.bfloat16)
    terms, _ = stepkto_loss(zeros[:, 0], ones[:, 0], zeros, ones, ones, torch.tensor(0.0), reduction="none")
    totals = terms.sums()
    assert totals.stack().dtype == torch.float32 and totals.n_outcome.item() == totals.n_step.item() == batch_size
    with pytest.raises(ValueError, match="reduction"):
        stepkto_loss(outcome, labels, *no_steps, torch.tensor(0.0), reduction="sum")
