"""stepkto/cli.py: every option of every stage declares its help."""

from stepkto import cli


def test_option_declares_a_field_with_its_help():
    from dataclasses import MISSING, dataclass, fields

    @dataclass
    class Args:
        path: str = cli.option(help="where")
        n: int = cli.option(3, help="how many")

    path, n = fields(Args)
    assert (path.default, path.metadata["help"]) == (MISSING, "where") and (n.default, n.metadata["help"]) == (3, "how many")


def test_every_stage_option_has_help():
    from dataclasses import fields

    import evaluate
    import generate
    import label
    from stepkto import arith_task, report

    for args_class in (generate.Args, label.Args, evaluate.Args, report.Args, arith_task.Args):
        missing = [f.name for f in fields(args_class) if not f.metadata.get("help")]
        assert not missing, f"{args_class.__module__}.Args: no help for {missing}"
