"""train.py's practitioner options on real tiny Llamas: gradient accumulation, LoRA (peft), --report_to.

Exact comparisons use --dtype float64 (see test_train.py's docstring); torchrun runs use 2 gloo ranks.
"""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


from stepkto import distributed, models, scoring

import train  # noqa: E402
from test_train import (  # noqa: E402,F401  (fixtures are found by name)
    cli, dcp_state, kill_at_first_resume_state, label_rows, one_thread, read_log, run_main, run_script, sft_rows, tiny_model,
    tokenizer, write_jsonl,
)

TORCHRUN_ONE = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1")
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
LOGGED = ("loss/", "rewards/", "count/", "kl/", "grad_norm", "lr")


def data_args(objective: str, tmp_path: Path, tokenizer, model: Path) -> dict:
    rows = sft_rows() if objective == "sft" else label_rows(tokenizer)
    args = dict(objective=objective, model=str(model), data=str(write_jsonl(tmp_path / "data.jsonl", rows)),
                lr=1e-3, log_every=1, dtype="float64")
    if objective == "sft":
        return args | dict(prompt_style="minimal", epochs=2)
    return args | dict(epochs=2, step_z0="step", nll_weight=0.5) if objective == "step-kto" else args | dict(epochs=2)


def assert_same_run(out_a: Path, out_b: Path, tolerance: float) -> None:
    log_a, log_b = read_log(out_a), read_log(out_b)
    assert len(log_a) == len(log_b) > 1
    for a, b in zip(log_a, log_b):
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith(LOGGED):
                assert a[key] == pytest.approx(b[key], abs=tolerance), (a["step"], key)
    weights_a, weights_b = load_file(out_a / "model.safetensors"), load_file(out_b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=0, atol=tolerance)


# ----------------------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("objective", ["sft", "kto", "step-kto"])
def test_gradient_accumulation_equals_one_batch_that_many_times_larger(objective, tmp_path, tiny_model, tokenizer):
    """2 micro-batches of 2 rows = 1 batch of 4: losses, z0, rewards, counts, NLL anchor and parameters.
    z0 is estimated over the accumulated batch; per micro-batch (as TRL) the logged kl/z0 would differ."""
    args = data_args(objective, tmp_path, tokenizer, tiny_model)
    accumulated = run_main(**args, per_device_batch_size=2, gradient_accumulation_steps=2,
                           output_dir=str(tmp_path / "accumulated"))
    single = run_main(**args, per_device_batch_size=4, output_dir=str(tmp_path / "single"))
    assert_same_run(accumulated, single, 1e-6)
    if objective == "step-kto":  # z0 is live (not clamped to 0) on some steps, so its batch matters
        assert any(entry["kl/z0"] > 0 and entry["kl/z0_step"] > 0 for entry in read_log(single))


@pytest.mark.parametrize("objective", ["sft", "kto", "step-kto"])
def test_gradient_accumulation_under_torchrun_equals_one_process(objective, tmp_path, tiny_model, tokenizer):
    """2 ranks x 2 micro-batches of 1 row = 1 process with batches of 4 (z0 all-reduced over ranks and
    estimated over both micro-batches; the step level's means count items over all 4 shards)."""
    args = data_args(objective, tmp_path, tokenizer, tiny_model)
    two = cli(**args, per_device_batch_size=1, gradient_accumulation_steps=2, output_dir=tmp_path / "two")
    result = run_script(*two, launcher=TORCHRUN)
    assert result.returncode == 0, result.stderr[-3000:]
    single = run_main(**args, per_device_batch_size=4, output_dir=str(tmp_path / "single"))
    assert_same_run(tmp_path / "two", single, 1e-6)


def test_plan_trims_the_last_batch_to_whole_micro_batches():
    plan = train.build_plan([10] * 11, global_batch_size=4, shards=4, epochs=1, seed=0, min_batch_size=2)
    assert [len(b.rows) for b in plan] == [4, 4]  # 11 rows: the 3 left over cannot fill 4 shards
    env = train.Env(1, 2, torch.device("cpu"))
    assert distributed.micro_slots(8, env, 2) == [range(4, 6), range(6, 8)]  # rank 1's half, cut in two


# ----------------------------------------------------------------------------- LoRA


LORA = dict(lora_r=4, lora_alpha=8.0, lora_dropout=0.0)


def test_lora_trains_adapters_only_and_saves_the_merged_model_and_the_adapter(tmp_path, tiny_model, tokenizer):
    from peft import PeftModel

    args = data_args("step-kto", tmp_path, tokenizer, tiny_model) | dict(lr=1e-2, per_device_batch_size=4)
    out = run_main(**args, **LORA, output_dir=str(tmp_path / "lora"))
    full = run_main(**args, output_dir=str(tmp_path / "full"))
    # Before the first update the policy is the base model with B = 0, i.e. the reference: the same loss.
    assert read_log(out)[0]["loss/total"] == pytest.approx(read_log(full)[0]["loss/total"], abs=1e-12)
    merged, base = load_file(out / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    assert merged.keys() == base.keys()  # an ordinary checkpoint: no peft names
    for key in base:
        changed = not torch.equal(merged[key], base[key].to(merged[key].dtype))
        assert changed == any(m in key for m in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj",
                                                   "gate_proj")), key
    assert (out / "adapter" / "adapter_config.json").exists() and models.is_complete_model_dir(out)
    # merged weights and base + adapter compute the same function
    ids = torch.tensor([tokenizer("Problem: 3 + 4\nSolution:\n")["input_ids"]])
    adapted = PeftModel.from_pretrained(models.load_model(str(tiny_model), "float64"), str(out / "adapter"))
    with torch.no_grad():
        expected = adapted(ids).logits
        torch.testing.assert_close(models.load_model(str(out), "float64")(ids).logits, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("objective", ["sft", "kto"])
def test_lora_trains_sft_and_kto_too(objective, tmp_path, tiny_model, tokenizer):
    args = data_args(objective, tmp_path, tokenizer, tiny_model) | LORA | dict(lr=1e-2, per_device_batch_size=4)
    out = run_main(**args, output_dir=str(tmp_path / "lora"))
    merged, base = load_file(out / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    assert not torch.equal(merged["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])
    torch.testing.assert_close(merged["model.norm.weight"], base["model.norm.weight"].to(torch.float64), rtol=0, atol=0)
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_lora_under_torchrun_equals_one_process(tmp_path, tiny_model, tokenizer):
    args = data_args("step-kto", tmp_path, tokenizer, tiny_model) | LORA | dict(lr=1e-2)
    result = run_script(*cli(**args, per_device_batch_size=2, output_dir=tmp_path / "two"), launcher=TORCHRUN)
    assert result.returncode == 0, result.stderr[-3000:]
    single = run_main(**args, per_device_batch_size=4, output_dir=str(tmp_path / "one"))
    assert_same_run(tmp_path / "two", single, 1e-6)
    adapters = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    for key, value in load_file(single / "adapter" / "adapter_model.safetensors").items():
        torch.testing.assert_close(adapters[key], value, rtol=0, atol=1e-6)


def test_lora_resumes_after_kill_with_the_uninterrupted_result(tmp_path, tiny_model, tokenizer):
    args = data_args("step-kto", tmp_path, tokenizer, tiny_model) | LORA | dict(epochs=5, per_device_batch_size=4)
    out = tmp_path / "killed"
    kill_at_first_resume_state(args, out)
    saved = [k for k in dcp_state(Path(f"{out}.resume") / "state-2") if k.startswith("model.")]
    assert saved and all("lora_" in key for key in saved)  # the resume state holds the adapters alone
    resumed = run_script(*cli(**args, save_every=2, output_dir=out))
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-3000:]
    uninterrupted = run_main(**args, save_every=0, output_dir=str(tmp_path / "uninterrupted"))
    assert_same_run(out, uninterrupted, 1e-12)


# ----------------------------------------------------------------------------- optimizer


def test_weight_decay_shrinks_matrices_and_leaves_norm_gains_alone(tmp_path, tiny_model, tokenizer):
    """One AdamW step with --weight_decay wd against one without: the same gradient, so a matrix ends up
    lr * wd * its initial value lower (decoupled decay), while 1-D tensors (RMSNorm gains) are not decayed."""
    lr, wd = 1e-2, 0.5
    args = data_args("sft", tmp_path, tokenizer, tiny_model) | dict(per_device_batch_size=4, max_steps=1, lr=lr)
    plain = load_file(run_main(**args, output_dir=str(tmp_path / "plain")) / "model.safetensors")
    decayed = load_file(run_main(**args, weight_decay=wd, output_dir=str(tmp_path / "decayed")) / "model.safetensors")
    initial = load_file(tiny_model / "model.safetensors")
    assert {value.ndim for value in initial.values()} == {1, 2}  # matrices and norm gains
    for key, value in initial.items():
        expected = plain[key] - lr * wd * value.to(torch.float64) if value.ndim >= 2 else plain[key]
        torch.testing.assert_close(decayed[key], expected, rtol=0, atol=1e-12)
        assert value.ndim < 2 or not torch.equal(decayed[key], plain[key]), key


# ----------------------------------------------------------------------------- tracking and usage


def test_report_to_tensorboard_logs_the_train_log_scalars(tmp_path, tiny_model, tokenizer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = data_args("kto", tmp_path, tokenizer, tiny_model)
    out = run_main(**args, per_device_batch_size=4, report_to="tensorboard", output_dir=str(tmp_path / "tb"))
    events = EventAccumulator(str(out / "tracking"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss/total")}
    assert logged == pytest.approx({e["step"]: e["loss/total"] for e in read_log(out)}, abs=1e-6)


# ----------------------------------------------------------------------------- mixed precision


def test_autocast_computes_the_log_probs_in_bf16_and_keeps_float32_gradients(tiny_model, tokenizer):
    """CompletionLogProbs(autocast=bf16): log-probs within bf16 rounding of float32's but not equal to them, float32
    out; the gradients land on the float32 weights."""
    examples = [train.kto_example(tokenizer, row, f"f:{i}", True) for i, row in enumerate(label_rows(tokenizer, 6))]
    batch = scoring.collate([e.tokens for e in examples], tokenizer.pad_token_id, torch.device("cpu"))
    logps = {}
    for autocast in (None, torch.bfloat16):
        scorer = scoring.CompletionLogProbs(models.load_model(str(tiny_model)), autocast=autocast)
        logps[autocast] = scorer(batch.input_ids, batch.attention_mask, batch.positions, batch.targets)  # (N,)
        logps[autocast].sum().backward()
        assert all(p.grad.dtype == torch.float32 for p in scorer.parameters())
    assert logps[torch.bfloat16].dtype == torch.float32
    difference = (logps[torch.bfloat16] - logps[None]).abs().max().item()
    assert 1e-5 < difference < 0.1


def test_bf16_weights_are_refused_and_mixed_precision_trains_float32_weights(tmp_path, tiny_model, tokenizer):
    """--dtype bfloat16 on weights trained in place would round small AdamW updates away: refused. --mixed_precision
    bfloat16 updates float32 weights, so at a learning rate far under bf16's resolution (1/256 of a weight) the
    matrices still move, where the same update added to bf16 weights mostly rounds away. Before the first update
    the policy matches its cached reference up to bf16 rounding."""
    args = data_args("step-kto", tmp_path, tokenizer, tiny_model) | dict(per_device_batch_size=4, epochs=1, lr=1e-6)
    with pytest.raises(train.UsageError, match="--dtype float32 --mixed_precision bfloat16"):
        run_main(**args | dict(dtype="bfloat16"), output_dir=str(tmp_path / "bf16"))
    out = run_main(**args | dict(dtype="float32", mixed_precision="bfloat16"), output_dir=str(tmp_path / "mixed"))
    first = read_log(out)[0]
    assert all(abs(value) < 1e-3 for key, value in first.items() if key.startswith("rewards/"))
    weights, base = load_file(out / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    assert all(weights[key].dtype == torch.float32 for key in weights)
    matrices = [key for key in base if base[key].dim() == 2]
    updates = {key: weights[key] - base[key] for key in matrices}
    moved = sum((updates[k] != 0).float().mean().item() for k in matrices) / len(matrices)
    in_bf16 = sum((base[k].bfloat16() + updates[k].bfloat16() != base[k].bfloat16()).float().mean().item()
                  for k in matrices) / len(matrices)
    assert moved > 0.9 and in_bf16 < 0.1


def test_lora_on_a_bf16_base_trains_and_under_torchrun_matches_one_process(tmp_path, tiny_model, tokenizer):
    """--dtype bfloat16 is allowed with LoRA: the base is frozen and peft's adapters are float32 (FSDP2 needs the
    trainable parameters of a group in one dtype; the frozen bf16 base may differ)."""
    args = data_args("step-kto", tmp_path, tokenizer, tiny_model) | LORA | dict(dtype="bfloat16", lr=1e-2)
    result = run_script(*cli(**args, per_device_batch_size=2, output_dir=tmp_path / "two"), launcher=TORCHRUN)
    assert result.returncode == 0, result.stderr[-3000:]
    single = run_main(**args, per_device_batch_size=4, output_dir=str(tmp_path / "single"))
    logs = list(zip(read_log(tmp_path / "two"), read_log(single), strict=True))
    assert all(a["loss/total"] == pytest.approx(b["loss/total"], rel=1e-3) for a, b in logs)
    assert logs[-1][1]["loss/total"] != logs[0][1]["loss/total"]
    assert load_file(single / "adapter" / "adapter_model.safetensors")["base_model.model.model.layers.0.mlp.down_proj"
                                                                       ".lora_B.weight"].dtype == torch.float32
    # merged in float32: the base as saved plus the whole update, nothing rounded away
    merged, base = load_file(single / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    adapters = load_file(single / "adapter" / "adapter_model.safetensors")
    a, b = (adapters[f"base_model.model.{key[:-len('.weight')]}.lora_{x}.weight"] for x in "AB")
    update = LORA["lora_alpha"] / LORA["lora_r"] * b @ a
    assert merged[key].dtype == torch.float32
    torch.testing.assert_close(merged[key], base[key] + update, rtol=0, atol=1e-6)


def test_mixed_precision_under_torchrun_matches_one_process(tmp_path, tiny_model, tokenizer):
    """bf16 mixed precision: FSDP2's MixedPrecisionPolicy on 2 gloo ranks trains what it trains on one rank, up to
    the order of the float32 gradient reduction, and what torch.autocast trains in one process, up to bf16
    rounding (the policy casts every parameter to bf16, norm gains too; autocast only the matmuls' inputs)."""
    args = data_args("step-kto", tmp_path, tokenizer, tiny_model) | dict(dtype="float32", mixed_precision="bfloat16")
    for name, launcher, batch in (("two", TORCHRUN, 2), ("one_rank", TORCHRUN_ONE, 4)):
        result = run_script(*cli(**args, per_device_batch_size=batch, output_dir=tmp_path / name), launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
    single = run_main(**args, per_device_batch_size=4, output_dir=str(tmp_path / "single"))
    two, one_rank = read_log(tmp_path / "two"), read_log(tmp_path / "one_rank")
    assert two[0]["loss/total"] == pytest.approx(one_rank[0]["loss/total"], rel=1e-6)  # before any update
    # After an update, a float32 weight that the two reduction orders leave on either side of a bf16 rounding
    # boundary is cast to bf16 one ulp apart. Measured largest relative loss difference: under 1e-4 on an AMD
    # EPYC Zen 4, 1.4e-4 on an Intel Xeon with AMX; the bound is a quarter of bf16's relative precision (2^-8).
    for a, b, c in zip(two, one_rank, read_log(single), strict=True):
        assert a["loss/total"] == pytest.approx(b["loss/total"], rel=1e-3) and a["step"] == b["step"]
        assert a["loss/total"] == pytest.approx(c["loss/total"], rel=1e-2)
    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in ("two", "one_rank")}
    autocast, base = load_file(single / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    def norm(pairs):  # the norm of the whole model's weight difference
        return sum(((a[key] - b[key]).double() ** 2).sum().item() for a, b in [pairs] for key in base) ** 0.5

    moved = norm((autocast, base))
    sharding, rounding = norm((weights["two"], weights["one_rank"])) / moved, norm((weights["two"], autocast)) / moved
    print(f"update norm {moved:.3e}; 2 ranks vs 1 rank: {sharding:.3f} of it, vs autocast: {rounding:.3f}")
    assert sharding < 0.05 and rounding < 0.2


@pytest.mark.parametrize("options, message", [
    (dict(lambda_d=2.0), "--lambda_d does nothing unless .* --balance_lambdas is false"),
    (dict(lora_alpha=32.0), "--lora_alpha does nothing unless --lora_r is not 0"),
    (dict(lora_r=4, lora_target_modules="no_such_proj"), "--lora_target_modules no_such_proj"),
    (dict(gradient_accumulation_steps=0), "--gradient_accumulation_steps must be > 0"),
    (dict(step_aggregation="sum"), "--step_aggregation does nothing unless --objective is step-kto"),  # kto's args
    (dict(mixed_precision="bfloat16"), "casts float32 only"),  # the args are float64
])
def test_options_that_would_do_nothing_or_cannot_work_are_refused(options, message, tmp_path, tiny_model, tokenizer):
    args = data_args("kto", tmp_path, tokenizer, tiny_model) | dict(per_device_batch_size=4)
    with pytest.raises(train.UsageError, match=message):
        run_main(**args, **options, output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weights", [dict(w_outcome=0.0, w_step=0.0), dict(w_step=-1.0)])
def test_weights_of_the_objective_are_checked_by_the_loss_before_anything_loads(weights, tmp_path, tokenizer):
    """(8)'s weights are refused by stepkto_loss's own check, as a usage error naming the options, before any file
    is read (the model path does not exist)."""
    args = dict(objective="step-kto", model=str(tmp_path / "absent"), data=str(tmp_path / "absent.jsonl"))
    with pytest.raises(train.UsageError, match=r"--w_outcome \S+, --w_step \S+: "):
        run_main(**args, **weights, output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
