"""Write docs/reference.md, the reference of every command-line option of every stage and every setting of run.sh and
setup.sh, read from the code so that it cannot drift from it: the options from each stage's ``Args`` dataclass (type,
default, the ``help`` that ``cli.option`` stores), run.sh's settings from its ``NAME=${NAME:-default}  # meaning``
lines under their ``# ---- heading`` lines, setup.sh's flags from its usage comment. tests/test_docs.py checks that the
committed file is this script's output, and that every flag and setting the README and docs/ name exists.

    .venv/bin/python docs/make_reference.py
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "reference.md"
COMMAND = ".venv/bin/python docs/make_reference.py"
STAGES = ["generate", "label", "train", "evaluate", "stepkto.report", "stepkto.arith_task"]  # modules with an Args
# What a variable means where run.sh or setup.sh gives it no comment (or reads it without a NAME=${NAME:-...} line);
# the code's own comment next to it, where there is one, follows.
MEANINGS = {
    "ITERATIONS": "iterations i = 1..ITERATIONS of the loop, each training M(i) from M(i-1)",
    "NODE_RANK": "this node's rank, 0 .. NNODES - 1 (node 0 writes the data and the report)",
    "MASTER_PORT": "node 0's port (torchrun's rendezvous)",
    "MIN_OPS": "TASK=hard: fewest operations per problem",
    "MAX_OPS": "TASK=hard: most operations per problem",
    "PYTHON": "the Python of train.py, stepkto/report.py and the built-in task (and of every stage unless GEN_PYTHON); "
              "unset: run.sh first runs `bash setup.sh` (with --gpu for a GPU .venv)",
    "GEN_PYTHON": "the Python of generate.py, label.py and evaluate.py",
    "CUDA_VISIBLE_DEVICES": "the node's GPUs, which the sampling shards split GPUS / TP at a time (commands.log "
                            "records each stage's own)",
    "PYTHON_FOR_VENV": "the Python that creates the venvs (`python -m venv`)",
    "-h|--help": "print this usage (setup.sh's comment block) and exit",
}
SETTING = re.compile(r"([A-Z][A-Z0-9_]*)=\$\{([A-Z][A-Z0-9_]*):-")  # a top-level NAME=${NAME:-default} line
READ = re.compile(r"\$\{([A-Z][A-Z0-9_]*):-")                      # any ${NAME:-default}


def one_line(text) -> str:
    """Table-safe text: one line, | escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def cell(text) -> str:
    """A table cell of prose: also < escaped (seed<S> is no HTML tag)."""
    return one_line(text).replace("<", "&lt;")


def code(text) -> str:
    return f"`{one_line(text)}`" if str(text) else '`""`'


# ----------------------------------------------------------------------------- the stages' options


def type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " | ".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[X]: X, default None
        return type_name(next(a for a in typing.get_args(hint) if a is not type(None)))
    return hint.__name__


def default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(value, bool):
        return code(str(value).lower())
    return "unset" if value is None else code(value)


def title(stage: str) -> str:
    """A stage's file: generate.py, stepkto/report.py."""
    return f"{stage.replace('.', '/')}.py"


def command(stage: str) -> str:
    """How a stage runs: a top-level script by its file, a module of the package with -m."""
    return f"python -m {stage}" if "." in stage else f"python {stage}.py"


def stage_section(name: str) -> list[str]:
    module = importlib.import_module(name)
    hints = typing.get_type_hints(module.Args)
    summary = ast.get_docstring(ast.parse(Path(module.__file__).read_text())).split("\n\n")[0]
    lines = [f"## {title(name)}", "", cell(summary) + f" `{command(name)} --help` prints the same options.", "",
             "| option | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(module.Args):
        flag = code(f"--{f.name}")
        if f.default is True:
            flag += " / " + code(f"--no_{f.name}")
        help_text = f.metadata.get("help", "").replace("%%", "%")
        lines.append(f"| {flag} | {cell(type_name(hints[f.name]))} | {default_text(f)} | {cell(help_text)} |")
    return lines + [""]


def stage_options() -> dict[str, dict[str, str]]:
    """{stage: {option: help}} of every stage, for the run.sh settings passed as an option."""
    return {s: {f.name: f.metadata.get("help", "").replace("%%", "%")
                for f in dataclasses.fields(importlib.import_module(s).Args)} for s in STAGES}


# ----------------------------------------------------------------------------- run.sh's settings


def split_default(text: str, where: str) -> tuple[str, str]:
    """The text after ``${NAME:-`` split at its closing brace: (default, rest of the line)."""
    depth = 1
    for i, ch in enumerate(text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return text[:i], text[i + 1:]
    raise ValueError(f"{where}: no closing brace in ${{...:-{text}")


def trailing_comment(line: str) -> str:
    """The comment after the code of a line (`code  # comment`), or the text of a comment line."""
    if line.lstrip().startswith("#"):
        return line.lstrip()[1:].strip()
    return line.split("  # ", 1)[1].strip() if "  # " in line else ""


def headings(lines: list[str]) -> list[str]:
    """The `# ---- heading` each line of the script stands under."""
    out, heading = [], ""
    for line in lines:
        heading = line[6:].strip() if line.startswith("# ----") else heading
        out.append(heading)
    return out


def comment_above(lines: list[str], i: int) -> list[str]:
    """The column-0 comment lines right above line i (no heading): a note on the line below them."""
    above = []
    while i > 0 and lines[i - 1].startswith("#") and not lines[i - 1].startswith(("# ----", "#!")):
        i -= 1
        above.insert(0, lines[i][1:].strip())
    return above


def comment_of(lines: list[str], i: int, column: int) -> str:
    """Line i's comment with what continues it: the comment lines below it whose # stands in the comment column, and
    the next line's trailing comment while a parenthesis is open (run.sh's BATCH: "GLOBAL_BATCH / (BATCH x" ...)."""
    parts = comment_above(lines, i) + [trailing_comment(lines[i])]
    j = i + 1
    while j < len(lines) and parts[-1] and trailing_comment(lines[j]):
        aligned = lines[j].lstrip().startswith("#") and lines[j].index("#") == column
        if not (aligned or " ".join(parts).count("(") > " ".join(parts).count(")")):
            break
        parts.append(trailing_comment(lines[j]))
        j += 1
    return " ".join(p for p in parts if p)


def comment_column(lines: list[str]) -> int:
    """The column most of the settings' comments start at: where their continuation lines' # stands."""
    columns = [line.index("  # ") + 2 for line in lines if SETTING.match(line) and "  # " in line]
    return max(set(columns), key=columns.count, default=-1)


def passed_as(lines: list[str], name: str, options: dict) -> list[tuple[str, str]]:
    """[(stage or "", option)] that the script passes $NAME's value to: `--option "$NAME"` (the stage: the last
    `<stage>.py` before it in its command, else the only stage with that option) or `set_only ARRAY option "$NAME"`."""
    text = "\n".join(lines).replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        pattern = r"(--|(?<=\s)(?=[a-z]))" if line.lstrip().startswith("set_only") else "(--)"
        for m in re.finditer(pattern + rf'([a-z][a-z0-9_]*) "\$(?:\{{|\(\()?{name}\b', line):
            named = [a or b for a, b in re.findall(r"\b(\w+)\.py\b|-m (stepkto\.\w+)", line[:m.start()])]
            owners = [s for s in STAGES if m[2] in options[s]]
            stage = named[-1] if named and named[-1] in owners else (owners[0] if len(owners) == 1 else "")
            if (stage, m[2]) not in found:
                found.append((stage, m[2]))
    return found


class Setting(typing.NamedTuple):
    heading: str
    name: str
    defaults: list[str]   # as written; several where the script sets it in several places
    passed_as: list[tuple[str, str]]
    meaning: str


def script_settings(path: Path, options: dict) -> list[Setting]:
    """Every variable the script reads with ${NAME:-...}, in the order of first reading, under the heading it stands
    under. A top-level NAME=${NAME:-default} line gives its default; another variable (run.sh's PYTHON:
    `if [ -z "${PYTHON:-}" ]; then ... PYTHON=.venv/bin/python`) the first default it is read with that is not
    empty, else the values the script sets it to. Both get the comment of the line that first reads them."""
    lines = path.read_text().splitlines()
    under, column, seen = headings(lines), comment_column(lines), {}
    for i, line in enumerate(lines):
        for m in READ.finditer(line):
            if m[1] in seen:
                continue
            default, rest = split_default(line[m.end():], f"{path.name}:{i + 1}")
            defaults = [default]
            if not line.startswith(f"{m[1]}=${{{m[1]}:-"):
                defaults = inline_defaults(path, lines, m[1])[:1] or assigned(lines, m[1]) or [""]
            elif rest.strip() and not rest.lstrip().startswith("#"):
                raise ValueError(f"{path.name}:{i + 1}: code after the setting {m[1]}: not a setting line")
            seen[m[1]] = (under[i], defaults, comment_of(lines, i, column))
    return [Setting(heading, name, defaults, passed_as(lines, name, options), meaning(name, comment, options, lines))
            for name, (heading, defaults, comment) in seen.items()]


def inline_defaults(path: Path, lines: list[str], name: str) -> list[str]:
    """The defaults that are not empty of every ${NAME:-default} in the script."""
    return [d for i, line in enumerate(lines) for m in READ.finditer(line) if m[1] == name
            for d in [split_default(line[m.end():], f"{path.name}:{i + 1}")[0]] if d]


def assigned(lines: list[str], name: str) -> list[str]:
    """The values an indented `NAME=value` line sets (a value continued on the next line ends in …)."""
    values = re.findall(rf"^\s+{name}=(.*)$", "\n".join(lines), re.M)
    return [re.sub(r"\s*\\$", " …", v) for v in values]


def meaning(name: str, comment: str, options: dict, lines: list[str]) -> str:
    """The hand-written meaning (MEANINGS) and the code's comment; without either, the help of the option it is
    passed as."""
    parts = [MEANINGS.get(name, ""), comment]
    for stage, option in passed_as(lines, name, options) if not any(parts) else []:
        if stage:
            parts.append(f"as {stage}.py --{option}: {options[stage][option]}")
            break
    return "; ".join(p for p in parts if p)


def settings_section(title: str, intro: str, settings: list[Setting]) -> list[str]:
    lines = [f"## {title}", "", intro, ""]
    for heading in dict.fromkeys(s.heading for s in settings):
        if heading:
            lines += [f"### {heading}", ""]
        lines += ["| setting | default | passed as | meaning |", "|---|---|---|---|"]
        for s in (s for s in settings if s.heading == heading):
            passed = ", ".join(code(f"{stage}.py --{opt}" if stage else f"--{opt}") for stage, opt in s.passed_as)
            lines.append(f"| `{s.name}` | {' or '.join(map(code, s.defaults))} | {passed} | {cell(s.meaning)} |")
        lines.append("")
    return lines


# ----------------------------------------------------------------------------- setup.sh's flags


def setup_flags(path: Path) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """setup.sh's usage comment (line 2 up to `set -euo`) as (intro, [(flag, meaning)], notes): a usage line is
    `#   bash setup.sh --flag  # meaning`, continued by comment lines whose text starts with #; a flag the script's
    `case $flag in` takes that the usage does not show gets its meaning from MEANINGS."""
    lines = path.read_text().splitlines()
    usage = [line[1:].strip() for line in lines[1:lines.index("set -euo pipefail")] if line.startswith("#")]
    intro, rows, notes = [], [], []
    for line in usage:
        m = re.match(r"bash setup\.sh((?: --?[a-z][\w-]*)*)(?: \.\.\.)?\s+#\s?(.*)", line)
        if m:
            rows.append([m[1].split()[0] if m[1] else "", m[2]])
        elif line.startswith("#") and rows and not notes:
            rows[-1][1] += " " + line[1:].strip()
        else:
            (notes if rows else intro).append(line)
    for flags in re.findall(r"^\s+(-[\w|-]+)\)", path.read_text(), re.M):
        if not any(flag in flags.split("|") for flag, _ in rows):
            rows.append([flags, MEANINGS.get(flags, "")])
    return intro, [tuple(r) for r in rows], notes


def setup_section(options: dict) -> list[str]:
    intro, rows, notes = setup_flags(ROOT / "setup.sh")
    lines = ["## setup.sh", "", cell(" ".join(intro)), "", "| flag | meaning |", "|---|---|"]
    for flag, text in rows:
        shown = ", ".join(map(code, flag.split("|"))) if flag else "(none)"
        lines.append(f"| {shown} | {cell(text)} |")
    lines += ["", cell(" ".join(notes)), ""]
    env = script_settings(ROOT / "setup.sh", options)
    return lines + settings_section("setup.sh's environment", "Read from the environment by setup.sh.", env)[2:]


# ----------------------------------------------------------------------------- the reference


HEADER = f"""# Reference: every stage option and every setting

Generated from the code by `docs/make_reference.py`; do not edit it by hand. Regenerate it with
`{COMMAND}` (tests/test_docs.py fails when it is stale). The stages' options come from their
`Args` dataclasses, run.sh's settings from its lines like `SEED=${{SEED:-0}}  # meaning`, setup.sh's flags from
its usage comment.

Every option is also spelled with dashes (`--max-new-tokens`); a bool option takes `true` / `false` or no value
(true). A setting of run.sh is an environment variable: `SEED=1 bash run.sh`.
"""


def render() -> str:
    """The text of docs/reference.md."""
    options = stage_options()
    titles = [title(s) for s in STAGES] + ["run.sh", "setup.sh"]
    lines = [HEADER, " · ".join(f"[{t}](#{re.sub(r'[^a-z0-9_-]', '', t.lower())})" for t in titles), ""]
    for stage in STAGES:
        lines += stage_section(stage)
    lines += settings_section("run.sh", "Environment variables run.sh reads, under the headings of run.sh that they "
                              "stand under; the default is as written there (shell).",
                              script_settings(ROOT / "run.sh", options))
    lines += setup_section(options)
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(ROOT)}")
