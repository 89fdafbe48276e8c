"""stepkto/options.py's table: every option of every stage has a row, and an option that differs from its default is refused
exactly in the cases where its row does not hold, with one line naming it; each stage runs the check before any
work. A new option (or stage) without a row fails here."""

import dataclasses
import importlib
import itertools
import re
import typing
from pathlib import Path

import pytest

from stepkto import options
from stepkto.cli import UsageError

REPO = Path(__file__).resolve().parents[1]
# the stages: the scripts whose entry is cli.run_cli
STAGES = sorted(p.relative_to(REPO).as_posix() for p in [*REPO.glob("*.py"), *(REPO / "stepkto").glob("*.py")]
                if re.search(r"^\s+cli\.run_cli\(Args, main\)", p.read_text(), re.M))


def module_of(stage: str):
    """A stage's module: a top-level script, or a module of the package run with -m (stepkto/report.py)."""
    return importlib.import_module(stage.removesuffix(".py").replace("/", "."))


def args_class(stage: str):
    return module_of(stage).Args


def field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def other_value(hint, values: tuple):
    """A value of type ``hint`` outside ``values`` (a value of its own type if the type allows nothing else)."""
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    if typing.get_origin(hint) is typing.Literal:
        return next(c for c in typing.get_args(hint) if c not in values)
    if hint is bool or all(isinstance(v, bool) for v in values):
        return not values[0]
    if hint in (int, float):
        return hint(max(v for v in values if v is not None) + 1) if any(v is not None for v in values) else hint(1)
    return "other" + "".join(map(str, values))


def base_args(cls):
    """An instance of a stage's Args: every required option given a placeholder, the rest at their defaults."""
    required = {f.name: "placeholder" for f in dataclasses.fields(cls) if options.default_of(f) is dataclasses.MISSING}
    return cls(**required)


def applies(rule, values: dict) -> bool:
    return any(all(c.holds(values[c.field]) for c in alternative) for alternative in rule)


def test_every_stage_and_every_option_has_exactly_one_row():
    assert STAGES == sorted(options.TABLE), "a stage without its options in options.TABLE (or a row for none)"
    for stage in STAGES:
        fields = [f.name for f in dataclasses.fields(args_class(stage))]
        missing = sorted(set(fields) - set(options.TABLE[stage]))
        stale = sorted(set(options.TABLE[stage]) - set(fields))
        assert not missing and not stale, f"{stage}: options without a row {missing}, rows without an option {stale}"


def test_a_required_option_always_applies():
    for stage in STAGES:
        for f in dataclasses.fields(args_class(stage)):
            if options.default_of(f) is dataclasses.MISSING:
                assert options.TABLE[stage][f.name] == options.ALWAYS, (stage, f.name)


def cases(stage: str, option: str):
    """Every combination of the values the option's row reads: each value its conditions name, and one outside."""
    cls, rule = args_class(stage), options.TABLE[stage][option]
    hints, fields = field_types(cls), {f.name for f in dataclasses.fields(cls)}
    by_field = {}
    for condition in (c for alternative in rule for c in alternative):
        by_field.setdefault(condition.field, set()).update(condition.values)
    candidates = {}
    for name, values in by_field.items():
        values = tuple(sorted(values, key=repr))
        candidates[name] = values + (other_value(hints.get(name, bool) if name in fields else bool, values),)
    for combination in itertools.product(*candidates.values()):
        yield dict(zip(candidates, combination))


ROWS = [(stage, option) for stage in sorted(options.TABLE) for option in options.TABLE[stage]]


@pytest.mark.parametrize("stage, option", ROWS, ids=[f"{s}:{o}" for s, o in ROWS])
def test_an_option_is_refused_exactly_where_its_row_does_not_hold(stage, option):
    cls = args_class(stage)
    base, fields = base_args(cls), {f.name: f for f in dataclasses.fields(cls)}
    if options.default_of(fields[option]) is dataclasses.MISSING:
        return  # always given; always applies (test above)
    changed = other_value(field_types(cls)[option], (options.default_of(fields[option]),))
    for case in cases(stage, option):
        settings = {name: value for name, value in case.items() if name in fields}
        resolved = {name: value for name, value in case.items() if name not in fields}
        args = dataclasses.replace(base, **settings, **{option: changed})
        values = {name: getattr(args, name) for name in fields} | resolved
        refused = [name for name, f in fields.items() if getattr(args, name) != options.default_of(f)
                   and not applies(options.TABLE[stage][name], values)]
        if not refused:
            options.refuse_inapplicable(stage, args, **resolved)
            continue
        never = options.TABLE[stage][refused[0]] == options.NEVER
        expected = rf"does nothing in {stage}" if never else r"does nothing unless .+ \(here .+\)"
        with pytest.raises(UsageError, match=rf"^--{refused[0]} {expected}: drop it$"):
            options.refuse_inapplicable(stage, args, **resolved)
        assert option in refused or applies(options.TABLE[stage][option], values), case


def test_resolved_values_are_read_only_when_a_condition_needs_them():
    """--engine auto is resolved (importing vLLM) only when a vLLM-only option is set."""
    import generate

    args = base_args(generate.Args)
    options.refuse_inapplicable("generate.py", args, engine=lambda: pytest.fail("resolved for nothing"))
    with pytest.raises(UsageError, match=r"--max_model_len does nothing unless --engine is vllm \(here --engine "
                                         r"auto, resolved to transformers\)"):
        options.refuse_inapplicable("generate.py", dataclasses.replace(args, max_model_len=4096),
                                    engine=lambda: "transformers")


@pytest.mark.parametrize("stage, options_set, message", [
    ("generate.py", dict(engine="transformers", enable_prefix_caching=False), "--enable_prefix_caching does nothing"),
    ("generate.py", dict(engine="transformers", max_model_len=4096), "--max_model_len does nothing"),
    ("label.py", dict(prm="check", mc_rollouts=8), "--mc_rollouts does nothing unless --prm is mc"),
    ("label.py", dict(prm="check", engine="vllm"), "--engine does nothing unless --prm is mc"),
    ("evaluate.py", dict(sample_temperature=0.7), "--sample_temperature does nothing unless --sample_k is not 0"),
    ("evaluate.py", dict(step=1), "--step does nothing unless --report_to is not none"),
    ("stepkto/report.py", dict(title="x"), "--title does nothing unless --plot is not "),
])
def test_each_stage_refuses_before_any_work(stage, options_set, message, tmp_path):
    """Through the stage's own main, with inputs that do not exist: the refusal comes first."""
    module = module_of(stage)
    missing = str(tmp_path / "missing.jsonl")
    files = {"generate.py": dict(model=missing, problems=missing, output=str(tmp_path / "out.jsonl")),
             "label.py": dict(input=missing, output=str(tmp_path / "out.jsonl")),
             "evaluate.py": dict(model=missing, benchmark=missing, output_dir=str(tmp_path / "out")),
             "stepkto/report.py": dict(runs=str(tmp_path))}[stage]
    with pytest.raises(UsageError, match=message):
        module.main(module.Args(**files, **options_set))
    assert not any(tmp_path.iterdir())
