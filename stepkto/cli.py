"""A stage's command line: its options (an ``Args`` dataclass, one help line per field), its entry (``run_cli``:
one line per error, no traceback), and URLs with their user, password and secret parameters redacted wherever
they are printed or written."""

from __future__ import annotations

import re
import sys
import typing
from dataclasses import MISSING, field
from pathlib import Path

from stepkto import jsonl


class UsageError(jsonl.StageError, ValueError):
    """Arguments that cannot work together; the message says which."""


def option(default=MISSING, help: str = ""):
    """A dataclass field with its --help text (HfArgumentParser reads metadata["help"]): every stage's options."""
    return field(default=default, metadata={"help": help})


def run_cli(args_class, main) -> None:
    """Every stage's entry: ``main(args)`` with the command line parsed into ``args_class``; a StageError or
    ValueError (these name file, line and field) ends the process with its message in one line, not a traceback."""
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(args_class).parse_args_into_dataclasses()
    try:
        main(args)
    except (jsonl.StageError, ValueError) as error:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {redact_urls(str(error))}")  # a URL's password is never shown


def set_num_threads(threads: int) -> None:
    """A stage's --num_threads: torch's CPU threads (0: torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def check_choices(args) -> None:
    """Every Literal field of ``args`` holds one of its choices (argparse checks the command line, this an Args built
    in code)."""
    for name, hint in typing.get_type_hints(type(args)).items():
        choices, value = typing.get_args(hint), getattr(args, name)
        if typing.get_origin(hint) is typing.Literal and value not in choices:
            raise UsageError(f"--{name} {value!r}: must be one of {' | '.join(map(str, choices))}")


# A URL's credentials, never printed or written: its userinfo (scheme://user:password@host, scheme://user@host) and
# the value of a query or fragment parameter whose name says it is a secret (?api_key=, &token=, ;password=, #key=).
# run.sh's redact_urls does the same with sed.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>.,:;!?)\]]")  # not the text's punctuation after it
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")
_SECRET_PARAMETER = re.compile(r"([?&;#](?:[\w.-]*[_-])?(?:(?:api)?key|token|passw(?:or)?d|pwd|secret|sig(?:nature)?"
                               r"|auth(?:orization)?|credential)s?=)(?:[^&#;\s'\"<>]*[^&#;\s'\"<>.,:!?)\]])?",
                               re.IGNORECASE)
REDACTED = "***"


def redact_url(url: str) -> str:
    """``url`` with its user, password and secret-named parameters' values replaced by ***: host, port and path stay,
    so that a message still says which server it means."""
    url = _USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", url, count=1)
    start = min((i for i in (url.find("?"), url.find("#")) if i >= 0), default=len(url))
    return url[:start] + _SECRET_PARAMETER.sub(lambda m: m.group(1) + REDACTED, url[start:])


def redact_urls(text: str) -> str:
    """``text`` (a message, a command line, an exception's text quoting a URL) with every URL in it redacted."""
    return _URL.sub(lambda m: redact_url(m.group()), text)
