"""Command lines built from a job's config dataclass, so flags are never restated by hand.

Every field becomes a flag named after it (``image_size`` → ``--image-size``); the help is the
field's line in the class docstring's ``Attributes:`` section; booleans get ``--x/--no-x``; lists
take several values; dicts take JSON. A field holding another config dataclass (``loop:
LoopConfig``) is flattened: its fields are flags too, prefixed with the field's name only where a
name would clash (``--loop-seed`` beside a sweep's own ``--seed``). Only the flags given change
the starting config, so a preset or a default stays as it was for everything else.

    parser = config_parser(SafetyTrainConfig, description=__doc__)
    cfg = config_from_args(SafetyTrainConfig(), parser.parse_args(argv))
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import json
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from livelens.errors import ConfigError


def _field_docs(cls: type) -> dict[str, str]:
    """``{field: help}`` from the Google-style ``Attributes:`` section of ``cls``'s docstring."""
    doc = cls.__doc__ or ""
    out: dict[str, str] = {}
    section = doc.split("Attributes:", 1)
    if len(section) < 2:
        return out
    current = None
    for line in section[1].splitlines():
        m = re.match(r"^\s{4,8}(\w+):\s*(.*)$", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and line.strip() and not re.match(r"^\S", line):
            out[current] += " " + line.strip()
        elif not line.strip() and current:
            current = None
    return {k: v.replace("%", "%%") for k, v in out.items()}


# A ``Sequence[int]`` field is a list on the command line too (it was read as one string before).
_LISTS = (list, tuple, collections.abc.Sequence)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _flags(cls: type, prefix: str = "", outer: frozenset[str] = frozenset()) -> list[tuple[str, tuple[str, ...], Any, str]]:
    """``(flag, path, type, help)`` for every field of ``cls``, nested configs flattened.

    ``outer`` holds the names the enclosing configs use; a nested field that clashes with one is
    prefixed with ``prefix`` (its parent field's name).
    """
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    own = frozenset(f.name for f in dataclasses.fields(cls))
    out = []
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            for flag, path, sub_tp, help_ in _flags(tp, f.name, outer | own):
                out.append((flag, (f.name, *path), sub_tp, help_))
            continue
        name = f"{prefix}_{f.name}" if prefix and f.name in outer else f.name
        out.append((name, (f.name,), hints[f.name], docs.get(f.name, "")))
    return out


def _parse_json(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None


def _optional(conv: Any) -> Any:
    def parse(value: str) -> Any:
        return None if value.lower() in ("none", "null", "all", "") else conv(value)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def config_parser(cls: type, *, description: str | None = None, exclude: tuple[str, ...] = (),
                  parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the config dataclass ``cls``."""
    p = parser or argparse.ArgumentParser(description=description,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, path, tp, help_ in _flags(cls):
        if flag in exclude or path[-1] in exclude:
            continue
        opt = "--" + flag.replace("_", "-")
        base, optional = _unwrap_optional(tp)
        kw: dict[str, Any] = {"dest": "cfg:" + ".".join(path), "default": argparse.SUPPRESS, "help": help_}
        origin = typing.get_origin(base)
        if base is bool:
            p.add_argument(opt, action=argparse.BooleanOptionalAction, **kw)
            continue
        if origin in _LISTS:
            (item,) = typing.get_args(base)[:1] or (str,)
            p.add_argument(opt, nargs="*", type=item if item in (int, float, str) else str, metavar=flag.upper(), **kw)
            continue
        conv = _parse_json if (origin in (dict, Mapping) or base in (dict, Any)) else (
            base if base in (int, float, str) else str)
        p.add_argument(opt, type=_optional(conv) if optional else conv, metavar=flag.upper(), **kw)
    return p


def _set(obj: Any, path: tuple[str, ...], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    child = getattr(obj, path[0])
    return dataclasses.replace(obj, **{path[0]: _set(child, path[1:], value)})


def config_from_args(base: Any, ns: argparse.Namespace) -> Any:
    """``base`` with the fields of every flag that was given replaced."""
    cfg = base
    for key, value in vars(ns).items():
        if key.startswith("cfg:"):
            cfg = _set(cfg, tuple(key[4:].split(".")), value)
    return cfg


def apply_flat(base: Any, values: Mapping[str, Any]) -> Any:
    """``base`` with fields replaced from a flat ``{flag_name: value}`` mapping (presets, notebooks).

    Raises:
        ConfigError: A name that is no field (or nested field) of the config.
    """
    paths = {flag: path for flag, path, _, _ in _flags(type(base))}
    cfg = base
    for name, value in values.items():
        if name not in paths:
            raise ConfigError(f"unknown {type(base).__name__} setting {name!r}; known: {sorted(paths)}")
        cfg = _set(cfg, paths[name], value)
    return cfg


def config_argv(cfg: Any) -> list[str]:
    """The flags :func:`config_parser` reads back into ``cfg`` (to start a job as a child process).

    Every field is given, so the child runs exactly ``cfg`` whatever its defaults are; dicts and
    ``Any`` go as JSON, lists as one flag with several values, None as ``none``.
    """
    out: list[str] = []
    for flag, path, tp, _ in _flags(type(cfg)):
        value = cfg
        for name in path:
            value = getattr(value, name)
        opt = "--" + flag.replace("_", "-")
        base, _ = _unwrap_optional(tp)
        if base is bool:
            out.append(opt if value else f"--no-{flag.replace('_', '-')}")
        elif value is None:
            out += [opt, "none"]
        elif typing.get_origin(base) in _LISTS:
            out += [opt, *map(str, value)]
        elif isinstance(value, dict) or base in (dict, Any) or typing.get_origin(base) in (dict, Mapping):
            out += [opt, json.dumps(value)]
        else:
            out += [opt, str(value)]
    return out
