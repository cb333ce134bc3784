"""A small name -> factory registry, one per package (attacks, models, datasets, ...).

Every package imports all of its modules in its ``__init__`` so that adding a method is one new
file plus one new YAML; the YAML's ``name`` key selects the factory registered here, and the
method's options (a `bdexp.options.Options` dataclass) are registered with it, so the config
check at compose time and the method read the same declaration.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Generic, TypeVar

from bdexp.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._options: dict[str, type] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, options: type | None = None, **meta: Any) -> Callable[[T], T]:
        """Register `name`; `options`: its Options dataclass; `meta`: what the pipeline and the
        report need to know about it (e.g. a defense's `kind`)."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            declared = options if options is not None else getattr(obj, "Options", None)
            if declared is not None:
                self._options[name] = declared
            self._meta[name] = dict(meta)
            return obj

        return add

    def unregister(self, name: str) -> None:
        """Remove `name` (tests that register a throwaway method)."""
        self._items.pop(name, None)
        self._options.pop(name, None)
        self._meta.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._items:
            allowed = ", ".join(sorted(self._items))
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {allowed}")
        return self._items[name]

    def options(self, name: str) -> type | None:
        """The Options dataclass `name` declares (None: not declared)."""
        self.get(name)
        return self._options.get(name)

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta.get(name, {})

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def import_submodules(package_name: str, package_path: list[str]) -> None:
    """Import every module of a package so their ``@REGISTRY.register`` decorators run."""
    for info in pkgutil.iter_modules(package_path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")
