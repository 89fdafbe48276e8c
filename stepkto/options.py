"""When each stage's options apply, and the one check that refuses an option that would do nothing.

A row of TABLE says when an option applies: ALWAYS; only(...), conditions on other options that must all hold;
either(...), alternatives of such conditions; or NEVER. A condition reads another option, or a value the stage
resolves when it runs (what --engine auto becomes). No torch here, and no stage imported: every stage imports this."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from stepkto.cli import UsageError


class When(NamedTuple):
    """A condition: the value of option ``field`` is one of ``values``, or with ``negate`` none of them."""

    field: str
    values: tuple
    negate: bool = False

    def holds(self, value) -> bool:
        return (value in self.values) != self.negate

    def __str__(self) -> str:
        return f"--{self.field} is {'not ' if self.negate else ''}{' | '.join(map(_shown, self.values))}"

    def here(self, value, given) -> str:
        """What the condition read, and the option's own value when the stage resolved it (--engine auto)."""
        resolved = f", resolved to {_shown(value)}" if given is not None and given != value else ""
        return f"--{self.field} {_shown(value if given is None else given)}{resolved}"


def _shown(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


Rule = tuple  # alternatives, each a tuple of Whens that must all hold; () never holds
ALWAYS: Rule = ((),)
NEVER: Rule = ()


def only(*conditions: When) -> Rule:
    return (conditions,)


def either(*alternatives: Rule) -> Rule:
    return tuple(alternative for rule in alternatives for alternative in rule)


def when(field: str, *values) -> When:
    return When(field, values)


def unless(field: str, *values) -> When:
    return When(field, values, negate=True)


SFT, KTO, STEP_KTO = when("objective", "sft"), when("objective", "kto", "step-kto"), when("objective", "step-kto")
JUDGE, MC, REWARD_MODEL = when("prm", "judge"), when("prm", "mc"), when("prm", "reward_model")
VLLM, JUDGE_VLLM, SERVED = when("engine", "vllm"), when("judge_engine", "vllm"), when("judge_engine", "openai")

# sharding.ShardArgs, engines.EngineSettings, generate.Policy: the sampling options of generate.py and evaluate.py
SHARDS = {"num_shards": ALWAYS, "shard_index": ALWAYS}
ENGINE = {"engine": ALWAYS, "dtype": ALWAYS, "tensor_parallel_size": only(VLLM), "gpu_memory_utilization": only(VLLM),
          "max_model_len": only(VLLM), "enable_prefix_caching": only(VLLM)}
POLICY = {name: ALWAYS for name in ("model", "max_new_tokens", "seed", "prompt_style", "chunk_size")}
# label.Settings: the step labeller of label.py and evaluate.py (in label.py the engine options are mc's rollouts')
LABELLER = {
    "prm": ALWAYS,
    **{name: only(JUDGE) for name in ("judge_model", "judge_protocol", "judge_max_new_tokens", "judge_engine",
                                      "judge_verdict", "allow_missing_reference")},
    "judge_threshold": only(JUDGE, when("judge_verdict", "logprobs")),
    # a served judge (stepkto/served.py); a served PRM (prm_base_url) uses its key variable and concurrency
    **{name: only(JUDGE, SERVED) for name in ("judge_base_url", "judge_api")},
    **{name: either(only(JUDGE, SERVED), only(REWARD_MODEL, unless("prm_base_url", ""))) for name in (
        "judge_api_key_env", "judge_max_concurrency")},
    "judge_tokenizer": only(JUDGE, SERVED, when("judge_api", "completions")),
    "judge_dtype": only(JUDGE, unless("judge_engine", "openai")),
    **{name: only(JUDGE, JUDGE_VLLM) for name in ("judge_tensor_parallel_size", "judge_gpu_memory_utilization",
                                                  "judge_max_model_len")},
    **{name: only(MC) for name in ("policy_model", "mc_rollouts", "mc_threshold", "mc_temperature",
                                   "mc_max_new_tokens", "seed")},
    # a trained PRM (stepkto/prm_models.py), in this process or on a server
    **{name: only(REWARD_MODEL) for name in ("prm_model", "prm_format", "prm_threshold", "prm_base_url")},
    **{name: only(REWARD_MODEL, when("prm_format", "step_tag")) for name in ("prm_step_tag", "prm_good_token",
                                                                            "prm_bad_token")},
}
PREFIX_CACHING_OF_JUDGE = only(JUDGE, JUDGE_VLLM)  # the judge's engine takes --enable_prefix_caching too

TABLE: dict[str, dict[str, Rule]] = {
    "stepkto/arith_task.py": {name: ALWAYS for name in (
        "output_dir", "num_train", "num_test", "num_sft", "seed", "min_ops", "max_ops", "on_change")},
    "generate.py": {**SHARDS, **ENGINE, **POLICY, **{name: ALWAYS for name in (
        "num_samples", "temperature", "problems", "output", "max_problems", "num_threads", "on_change")}},
    "label.py": {
        **SHARDS, **LABELLER, "engine": only(MC), "dtype": only(MC),
        **{name: only(MC, VLLM) for name in ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len")},
        "enable_prefix_caching": either(only(MC, VLLM), PREFIX_CACHING_OF_JUDGE),
        "input": ALWAYS, "output": ALWAYS, "chunk_size": ALWAYS, "on_change": ALWAYS},
    "evaluate.py": {
        **SHARDS, **ENGINE, **POLICY, **LABELLER, "enable_prefix_caching": either(only(VLLM), PREFIX_CACHING_OF_JUDGE),
        "allow_missing_reference": NEVER,  # evaluate.py labels every benchmark, and counts the rows without one
        "seed": either(only(unless("sample_k", 0)), only(MC)), "benchmark": ALWAYS, "output_dir": ALWAYS,
        "max_problems": ALWAYS, "sample_k": ALWAYS, "sample_temperature": only(unless("sample_k", 0)),
        "num_threads": ALWAYS, "report_to": ALWAYS, "step": only(unless("report_to", "none")), "on_change": ALWAYS},
    "train.py": {
        **{name: ALWAYS for name in (
            "objective", "model", "data", "output_dir", "per_device_batch_size", "epochs", "max_steps", "lr",
            "weight_decay", "warmup_ratio", "lr_schedule", "max_grad_norm", "seed", "num_threads", "dtype",
            "mixed_precision", "log_every", "save_every", "gradient_checkpointing", "logits_chunk_mib", "optim",
            "gradient_accumulation_steps", "lora_r", "report_to", "on_change")},
        "prompt_style": only(SFT), "ref_model": only(KTO), "beta": only(KTO), "balance_lambdas": only(KTO),
        "nll_weight": only(KTO), "lambda_d": only(KTO, when("balance_lambdas", False)),
        "lambda_u": only(KTO, when("balance_lambdas", False)),
        **{name: only(STEP_KTO) for name in ("w_outcome", "w_step", "step_span", "step_aggregation", "step_scope",
                                             "step_z0", "unjudged_steps")},
        **{name: only(when("model", "scratch")) for name in ("scratch_tokenizer", "hidden_size", "num_layers",
                                                             "intermediate_size")},
        **{name: only(unless("lora_r", 0)) for name in ("lora_alpha", "lora_dropout", "lora_target_modules")}},
    "stepkto/report.py": {"runs": ALWAYS, "plot": ALWAYS, "title": only(unless("plot", ""))},
}


def refuse_inapplicable(stage: str, args, **resolved) -> None:
    """UsageError for the first option of ``args`` (a stage's Args, or some of them) off its default where its row
    does not hold. ``resolved``: values the stage decides when it runs (a callable is called only when read)."""
    for name, rule, failing in inapplicable(stage, args, resolved):
        if not rule:
            raise UsageError(f"--{name} does nothing in {stage}: drop it")
        needs = " or ".join(" and ".join(map(str, alternative)) for alternative in rule)
        raise UsageError(f"--{name} does nothing unless {needs} (here {', '.join(failing)}): drop it")


def applicable(stage: str, args, **resolved):
    """``args``, options that would do nothing reset (bench/processbench_labellers.py: one command, many labellers)."""
    fields = {f.name: f for f in dataclasses.fields(args)}
    reset = {name: default_of(fields[name]) for name, _, _ in inapplicable(stage, args, resolved)}
    return dataclasses.replace(args, **reset)


def inapplicable(stage: str, args, resolved: dict):
    """(option, its row, the failing conditions' values) of every option that refuse_inapplicable refuses."""
    rows, cache = TABLE[stage], {}

    def value(name: str):
        if name not in cache:
            found = resolved[name] if name in resolved else getattr(args, name)
            cache[name] = found() if callable(found) else found
        return cache[name]

    for f in dataclasses.fields(args):
        rule = rows.get(f.name, ALWAYS)  # tests/test_options.py fails on an option without a row
        if getattr(args, f.name) == default_of(f) or any(all(c.holds(value(c.field)) for c in alt) for alt in rule):
            continue
        failing = {c.field: c.here(value(c.field), getattr(args, c.field, None)) for alt in rule for c in alt
                   if not c.holds(value(c.field))}
        yield f.name, rule, list(failing.values())


def default_of(f: dataclasses.Field):
    """A field's default (MISSING for a required option, which no value equals)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
