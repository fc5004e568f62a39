"""One name -> factory registry per kind (losses, models, datasets, methods), so recipes can name things."""
from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A dict of named factories that fails with the list of choices on an unknown name."""

    def __init__(self, kind: str, provider: str | None = None):
        self.kind = kind
        self.provider = provider  # the module whose import registers the entries (imported on first look-up)
        self._items: dict[str, Callable[..., T]] = {}

    def _load(self) -> None:
        if self.provider is not None:
            provider, self.provider = self.provider, None
            importlib.import_module(provider)

    def register(self, name: str, factory: Callable[..., T] | None = None):
        def add(f):
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' is already registered")
            self._items[name] = f
            return f

        return add(factory) if factory is not None else add

    def get(self, name: str) -> Callable[..., T]:
        self._load()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UnknownNameError(f"unknown {self.kind} '{name}'.{hint} Choices: {', '.join(sorted(self._items))}")
        return self._items[name]

    def build(self, name: str, *args, **kwargs) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items


# a lower layer (recipe validation) can look losses, models and datasets up by name without importing them
LOSSES: Registry = Registry("loss", provider="kdkit.losses")
MODELS: Registry = Registry("model", provider="kdkit.models")
DATASETS: Registry = Registry("dataset", provider="kdkit.data")
