"""Process configuration: one dataclass per process, read from STRATUS_* variables, overridable by flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def env_name(field: str) -> str:
    return "STRATUS_" + field.upper()


def _convert(kind: Any, raw: str, name: str, parse: Callable[[str], Any] | None = None) -> Any:
    if parse is not None:
        # A field's own parser (JSON, a list): its ValueError says what is wrong, the name says where.
        try:
            return parse(raw)
        except ValueError as exc:
            raise ValueError(f"{name}={raw!r}: {exc}") from None
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name}={raw!r} is not a boolean; use true or false")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None


def _field_type(cls: type, field: dataclasses.Field[Any]) -> Any:
    hint = typing.get_type_hints(cls)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def parse_config(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Build `cls` from defaults < STRATUS_<FIELD> environment variables (`environ`, else os.environ) < flags.

    Each field's help text is its `metadata["help"]`; that is the documentation of the variable. A field
    whose value is not built from one string by its type (a JSON object, a list) names its parser in
    `metadata["parse"]`.
    """
    assert dataclasses.is_dataclass(cls)
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog=prog, description=description)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        kind = _field_type(cls, field)
        env = env_name(field.name)
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata.get('help', '')} [env {env}]"
        parse = field.metadata.get("parse")
        if env in environ:
            values[field.name] = _convert(kind, environ[env], env, parse)
        choices = field.metadata.get("choices")
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, type=parse or kind, choices=choices, help=help_text)
    args = parser.parse_args(argv)
    for field in dataclasses.fields(cls):
        given = getattr(args, field.name)
        if given is not None:
            values[field.name] = given
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        parser.error(", ".join(f"--{m.replace('_', '-')} (or {env_name(m)})" for m in missing) + " is required")
    return cls(**values)
