"""How every method declares its options, once: a frozen dataclass of typed fields with their
defaults and allowed values (README, "Adding a method").

    @dataclass(frozen=True)
    class ACOptions(Options):
        n_components: int = option(10, lo=1)
        criterion: Literal["reserve", "size", "silhouette"] = "reserve"

    @DEFENSES.register("ac", options=ACOptions)

The YAML file of the method (`conf/<group>/<name>.yaml`) holds the values users see; at compose time
`Options.parse` checks a config node against the declaration (an unknown key, a wrong type or a
value out of range is a ConfigError that names the key and what is allowed), and
tests/test_options.py checks that every YAML agrees with its declaration. Code reads the parsed
object (`opts.n_components`), never `cfg.get(key, default)`: the dataclass default is the only
default in code, and the test keeps it equal to the YAML's.

Supported field types: int, float, bool, str, `X | None`, `Literal[...]` (the allowed values),
`tuple[X, ...]` (a YAML list; stored as a tuple), `dict[str, X]` and `Any` (not checked).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

import bdexp.conf
from bdexp.errors import ConfigError

# The config tree: the top-level `conf/` of the repository, installed as the package `bdexp.conf`.
CONF_DIR = Path(bdexp.conf.__file__).resolve().parent

O = TypeVar("O", bound="Options")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def show(value) -> str:
    """A value as it is written on the command line: null, true, 'abc', [0.1, 'x']."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return repr(value)


@dataclass(frozen=True)
class Bounds:
    """lo/hi bound every number of a field (open bounds with lo_open/hi_open)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {_num(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {_num(self.hi)}")
        return " and ".join(parts)


def option(default: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False, nonempty: bool = False) -> Any:
    """A dataclass field with its default, the range every number in it must lie in and, for a
    list, whether it may be empty."""
    meta = {"bounds": Bounds(lo, hi, lo_open, hi_open), "nonempty": nonempty}
    if isinstance(default, (list, dict)):
        frozen = tuple(default) if isinstance(default, list) else dict(default)
        return field(default_factory=lambda: frozen, metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------- type checks
def _is_none(tp) -> bool:
    return tp is type(None)


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "anything"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    if origin is Literal:  # as typed on the command line: inf, reserve
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if _is_none(a) else _describe(a) for a in args)
    if origin is tuple:
        if not args:
            return "a list"
        if args[-1] is not Ellipsis:
            return f"a list of {len(args)} {_describe(args[0]).split(' ', 1)[-1]}s"
        item = _describe(args[0])
        if item.startswith(("a ", "an ")):
            return f"a list of {item.split(' ', 1)[1]}s"
        return f"a list, each item {item}"
    if origin is dict or _is_options(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp, v) -> tuple[bool, Any]:
    """(ok, value as stored) of `v` for annotation `tp` (a YAML list becomes a tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True, v
    if tp is bool:
        return isinstance(v, bool), v
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool), v
    if tp is float:
        # inf and nan are refused: train.lr=inf or an infinite weight decay would only surface as a NaN
        # loss (or, worse, a model that never moves); no option of bdexp means anything at infinity
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return ok, float(v) if ok else v
    if tp is str:
        return isinstance(v, str), v
    if origin is Literal:
        return any(v == a and type(v) is type(a) or (isinstance(a, float) and v == a) for a in args), v
    if origin in (Union, types.UnionType):
        for a in args:
            if _is_none(a):
                if v is None:
                    return True, None
                continue
            ok, out = _convert(a, v)
            if ok:
                return True, out
        return False, v
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            return False, v
        if args and args[-1] is not Ellipsis and len(v) != len(args):  # tuple[float, float]: that many
            return False, v
        item = args[0] if args else Any
        out = []
        for x in v:
            ok, x = _convert(item, x)
            if not ok:
                return False, v
            out.append(x)
        return True, tuple(out)
    if origin is dict:
        if not isinstance(v, Mapping):
            return False, v
        item = args[1] if len(args) == 2 else Any
        out = {}
        for k, x in v.items():
            ok, x = _convert(item, x)
            if not ok:
                return False, v
            out[k] = x
        return True, out
    if isinstance(tp, type) and issubclass(tp, Options):  # a nested block of options
        if not isinstance(v, Mapping):
            return False, v
        return True, tp.parse(v)
    raise TypeError(f"options: unsupported field type {tp!r}")


def _numbers(v) -> list[float]:
    if isinstance(v, bool) or v is None:
        return []
    if isinstance(v, (int, float)):
        return [v]
    if isinstance(v, (list, tuple)):
        return [x for item in v for x in _numbers(item)]
    return []


def _plain(node) -> dict:
    if node is None:
        return {}
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


@dataclass(frozen=True)
class Options:
    """Base of every method's option dataclass (module docstring)."""

    # keys a config node carries that are not options: the registry's selector
    IGNORED: ClassVar[frozenset[str]] = frozenset({"name"})

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls) if f.init}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """field -> default, lists as lists (the form a YAML holds)."""
        out = {}
        for name, f in cls.fields().items():
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out[name] = value.as_dict() if isinstance(value, Options) else list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def problems(cls, node, where: str) -> list[str]:
        """Every problem of config node `node` (at dotted key `where`) against this declaration."""
        raw = _plain(node)
        hints = typing.get_type_hints(cls)
        fields = cls.fields()
        out = []
        unknown = sorted(k for k in raw if k not in fields and k not in cls.IGNORED)
        if unknown:
            out.append(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}")
        for key, value in raw.items():
            if key not in fields:
                continue
            nested, optional = _options_of(hints[key])
            if nested is not None:  # a block of options (or null, where the type allows it)
                if value is None and optional:
                    continue
                if not isinstance(value, Mapping):
                    out.append(f"{where}.{key}={show(value)} is not allowed: use a mapping"
                               + (" or null" if optional else ""))
                    continue
                out += nested.problems(value, f"{where}.{key}")
                continue
            ok, _ = _convert(hints[key], value)
            bounds = fields[key].metadata.get("bounds")
            allowed = _describe(hints[key]) + (f" {bounds.describe()}" if bounds and bounds.describe() else "")
            if not ok:
                out.append(f"{where}.{key}={show(value)} is not allowed: use {allowed}")
                continue
            if fields[key].metadata.get("nonempty") and isinstance(value, (list, tuple)) and not value:
                out.append(f"{where}.{key}=[] is not allowed: use a non-empty list")
                continue
            if bounds is not None and not all(bounds.ok(x) for x in _numbers(value)):
                out.append(f"{where}.{key}={show(value)} is not allowed: use {allowed}")
        return out

    @classmethod
    def parse(cls: type[O], node=None, where: str | None = None) -> O:
        """The options of config node `node` (a DictConfig, a mapping or None: missing keys take
        the declared defaults); ConfigError naming every bad key."""
        where = where or cls.__name__
        problems = cls.problems(node, where)
        if problems:
            raise ConfigError("; ".join(problems))
        raw = _plain(node)
        hints = typing.get_type_hints(cls)
        values = {k: _convert(hints[k], v)[1] for k, v in raw.items() if k in cls.fields()}
        return cls(**values)

    @classmethod
    def of(cls: type[O], value=None, where: str | None = None) -> O:
        """`value` as this class's options: an instance as is, a mapping or None parsed (so a
        Python caller may pass `{"criterion": "size"}` and get what the CLI would run)."""
        return value if isinstance(value, cls) else cls.parse(value, where)

    def replace(self: O, **changes) -> O:
        """A copy with some options changed (checked like a config node)."""
        return type(self).parse({**self.as_dict(), **changes}, type(self).__name__)

    def as_dict(self) -> dict[str, Any]:
        """field -> value, tuples as lists (what results.json and YAML hold)."""
        out = {}
        for name in self.fields():
            v = getattr(self, name)
            out[name] = v.as_dict() if isinstance(v, Options) else list(v) if isinstance(v, tuple) else v
        return out


def _options_of(tp) -> tuple[type | None, bool]:
    """(the Options class of a field typed `X` or `X | None`, whether None is allowed), or (None, _)."""
    if _is_options(tp):
        return tp, False
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if not _is_none(a)]
        if len(args) == 1 and _is_options(args[0]):
            return args[0], len(args) < len(typing.get_args(tp))
    return None, False


def _is_options(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, Options)


@dataclass(frozen=True)
class NoOptions(Options):
    """A method without options (its YAML holds only `name`)."""


def yaml_node(group: str, stem: str) -> dict:
    """conf/<group>/<stem>.yaml as a plain dict without its `defaults` list; a defense or analysis
    file keeps its keys under its own name (`ac: {name: ac, ...}`), which is unwrapped."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{stem}.yaml"), resolve=False)
    raw.pop("defaults", None)
    if group in ("defense", "analysis") and list(raw) == [stem]:
        raw = raw[stem]
    return raw

