"""Typed stage configs: one dataclass per stage gives the CLI flags, the function's keywords and config.json.

A config field is declared once with ``setting(default, help, ...)``; ``add_arguments(parser, Config)`` makes
its flag (``--embedding-dim`` for ``embedding_dim``; help shows the default), ``from_args(Config, args)``
reads it back, and ``dataclasses.asdict(config)`` is what the stage records. Renamed flags keep working for
one release through ``DeprecatedFlag``, which warns.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

C = TypeVar("C")


def setting(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None,
            old_flags: tuple[str, ...] = (), metavar: str | None = None, cli: bool = True) -> Any:
    """A config field: its default, its help text and how it appears on the command line.

    Args:
        default: the default value (a tuple for list-valued settings, so configs stay hashable).
        help: one line for ``--help`` (the default is appended).
        flag: the flag, if not ``--`` + the field name with dashes.
        choices: the allowed values.
        old_flags: earlier spellings, accepted with a deprecation warning.
        metavar: the value's name in ``--help``.
        cli: ``False`` for settings only the Python API takes.
    """
    meta = dict(help=help, flag=flag, choices=choices, old_flags=old_flags, metavar=metavar, cli=cli)
    return dataclasses.field(default=default, metadata=meta)


class DeprecatedFlag(argparse.Action):
    """Stores like ``store`` under the new flag's ``dest`` and records a deprecation warning for the CLI to log.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> _ = parser.add_argument("--model-dir")
        >>> _ = parser.add_argument("--model", dest="model_dir", action=DeprecatedFlag, new_flag="--model-dir")
        >>> args = parser.parse_args(["--model", "m"])
        >>> args.model_dir, args.deprecations
        ('m', ['--model is deprecated, use --model-dir (the old spelling goes in the next release)'])
    """

    def __init__(self, option_strings, dest, new_flag: str, **kwargs):
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.new_flag = new_flag

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values if self.nargs != 0 else self.const)
        notes = getattr(namespace, "deprecations", None) or []
        notes.append(f"{option_string} is deprecated, use {self.new_flag} (the old spelling goes in the next release)")
        namespace.deprecations = notes
        # errors about this value name the flag as the user typed it (``spelling``)
        namespace.spellings = {**(getattr(namespace, "spellings", None) or {}), self.dest: option_string}


def spelling(args: argparse.Namespace, dest: str, flag: str) -> str:
    """How the user spelled the flag behind ``dest``: ``flag``, or the deprecated spelling they typed."""
    return (getattr(args, "spellings", None) or {}).get(dest, flag)


def add_renamed(parser: argparse.ArgumentParser, flag: str, old_flags: tuple[str, ...], *, required: bool = False,
                **kwargs) -> None:
    """``parser.add_argument(flag, **kwargs)`` plus ``old_flags`` as deprecated spellings of it.

    With ``required``, one of the spellings must be given (argparse names the new one).
    """
    dest = kwargs.pop("dest", flag.lstrip("-").replace("-", "_"))
    target = parser.add_mutually_exclusive_group(required=True) if required else parser
    target.add_argument(flag, dest=dest, **kwargs)
    passthrough = {k: kwargs[k] for k in ("type", "choices", "metavar") if k in kwargs}
    for old in old_flags:
        target.add_argument(old, dest=dest, action=DeprecatedFlag, new_flag=flag, **passthrough)


def add_arguments(parser: argparse.ArgumentParser, config: type, *, group: str | None = None) -> None:
    """One flag per CLI field of the dataclass ``config`` (booleans as ``--x / --no-x``)."""
    target = parser.add_argument_group(group) if group else parser
    for field in dataclasses.fields(config):
        meta = field.metadata
        if not meta.get("cli", True):
            continue
        flag = meta.get("flag") or "--" + field.name.replace("_", "-")
        kwargs: dict[str, Any] = dict(dest=field.name, default=field.default, help=meta.get("help"))
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        kind = _field_type(field)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:
            kwargs.update(action="append", default=None)
        else:
            kwargs["type"] = kind
        if meta.get("old_flags"):
            add_renamed(target, flag, meta["old_flags"], **kwargs)
        else:
            target.add_argument(flag, **kwargs)


def from_args(config: type[C], args: argparse.Namespace, **overrides: Any) -> C:
    """The ``config`` dataclass from parsed ``args`` (fields the CLI does not set keep their defaults)."""
    values = {}
    for field in dataclasses.fields(config):
        if field.name in overrides:
            values[field.name] = overrides[field.name]
        elif field.metadata.get("cli", True) and getattr(args, field.name, None) is not None:
            value = getattr(args, field.name)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return config(**values)


def documented(config: type[C]) -> type[C]:
    """Class decorator: append an ``Args:`` section to the config's docstring, one line per field from its
    ``setting`` help and default, so the docs, ``--help`` and the defaults cannot drift apart."""
    lines = ["    Args:"]
    for field in dataclasses.fields(config):
        lines.append(f"        {field.name}: {field.metadata.get('help', '').replace('%%', '%')} "
                     f"(default {field.default!r}).")
    doc = (config.__doc__ or "").rstrip()
    head, sep, example = doc.partition("\n    Example:")
    config.__doc__ = head.rstrip() + "\n\n" + "\n".join(lines) + "\n" + (sep + example + "\n" if sep else "")
    return config


def _field_type(field: dataclasses.Field) -> type:
    """The scalar type argparse converts a field's value to (from its annotation, else its default)."""
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    for name, kind in (("bool", bool), ("tuple", tuple), ("int", int), ("float", float), ("str", str)):
        if annotation.split("|")[0].strip().startswith(name):
            return kind
    return type(field.default) if field.default is not None else str
