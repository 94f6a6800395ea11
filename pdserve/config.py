"""Frozen config dataclasses and the CLI generated from them (one source of truth).

Every component declares its options as a frozen dataclass whose fields carry
`metadata={"help": ..., "flag": ...}`; `add_arguments` turns the fields into argparse
options and `from_args` builds the dataclass back from the parsed namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def opt(
    default: Any,
    help: str,
    flag: str | None = None,
    choices: list | None = None,
    aliases: tuple[str, ...] = (),
    allow_inf: bool = False,
    flag_string: bool = False,
    **kw: Any,
):
    """A dataclass field with CLI metadata. `flag` defaults to --field-name; `aliases` are
    other spellings of it (e.g. SGLang's, where ours is shorter). A float flag takes finite
    numbers only, `inf` too where `allow_inf`. A `flag_string` option's value is flags for
    another command (see `ArgumentParser`)."""
    meta = {"help": help, "flag": flag, "choices": choices, "aliases": aliases}
    if allow_inf:
        meta["allow_inf"] = True
    if flag_string:
        meta["flag_string"] = True
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata=meta, **kw
        )
    return dataclasses.field(default=default, metadata=meta, **kw)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, except that a flag-string option also takes one lone flag as its value:
    argparse reads `--server-args --disable-radix-cache` as two options ("expected one
    argument"), and passes a value starting with "-" only when it holds a space."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.flag_string_options: set[str] = set()

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        tokens = iter(sys.argv[1:] if args is None else args)
        joined = []
        for token in tokens:
            value = next(tokens, None) if token in self.flag_string_options else None
            joined.append(token if value is None else f"{token}={value}")
        return super().parse_known_args(joined, namespace)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, optional) for annotations like `int | None` or `Optional[float]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def finite_float(text: str) -> float:
    """argparse type of float flags: inf passed every `> 0` check and then broke the server
    (a deadline of inf seconds overflows a timestamp), nan fails every comparison."""
    value = float_or_inf(text)
    if math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


# The longest duration a `*_s` flag takes (about 31 years): a worker start deadline of 1e12 s
# overflowed a socket timeout (OverflowError in the worker, which then exited).
MAX_SECONDS = 1e9


def seconds(text: str) -> float:
    """argparse type of a duration flag (a float field named `*_s`)."""
    value = finite_float(text)
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_SECONDS:g} seconds, got {text!r}")
    return value


def float_or_inf(text: str) -> float:
    """argparse type of float flags where inf means something (no limit)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def group_title(cls: type) -> str:
    """A readable --help section title for a config class: `RouterConfig` -> "router options"."""
    name = re.sub(r"(Config|Args)$", "", cls.__name__) or cls.__name__
    words = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z0-9]+", name)
    return " ".join(word.lower() for word in words) + " options"


def help_text(help: str, default: Any) -> str:
    """`help` with its default appended, unless the help already says what the default is
    or there is nothing to show (None, an empty list or string: the help says what unset means)."""
    if "default" in help.lower() or default is None or default == [] or default == "":
        return help
    return f"{help} (default: {default})"


def add_arguments(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    """One argparse option per field of `cls` that has help, in a section named `title`
    (default: derived from the class name)."""
    group = parser.add_argument_group(title or group_title(cls))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        tp, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text(f.metadata["help"], default)}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            kwargs["nargs"] = "*"
            kwargs["type"] = typing.get_args(tp)[0]
        elif tp is float and f.metadata.get("allow_inf"):
            kwargs["type"] = float_or_inf
        elif tp is float:
            kwargs["type"] = seconds if f.name.endswith("_s") else finite_float
        else:
            kwargs["type"] = tp
        kwargs["default"] = argparse.SUPPRESS
        group.add_argument(_flag(f), *f.metadata.get("aliases", ()), **kwargs)
        if f.metadata.get("flag_string") and isinstance(parser, ArgumentParser):
            parser.flag_string_options.add(_flag(f))


def from_args(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    """Build `cls` from the parsed args; fields not given on the command line keep defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(ns).items() if k in names}
    values.update(overrides)
    return cls(**values)


def check(cond: bool, message: str) -> None:
    """Validation helper for `__post_init__`: raise ValueError with a clear message."""
    if not cond:
        raise ValueError(message)


def check_ports(ports: dict[str, int | None]) -> None:
    """The ports given (by flag; None or 0: any free one) are in range and distinct: one
    given twice failed only once the model had loaded, as a bind error naming one of them."""
    flag_of: dict[int, str] = {}
    for flag, port in ports.items():
        if not port:
            continue
        check(0 < port < 65536, f"{flag} out of range: {port}")
        check(port not in flag_of, f"{flag_of.get(port)} and {flag} are both {port}: one port each")
        flag_of[port] = flag
