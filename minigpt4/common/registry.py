"""Name -> class lookup for the few places where a YAML string must pick a class.

Only used where configs name things (`arch`, projector types, dataset builders, image/text processors);
everything else is imported directly.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, Mapping, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def build(self, cfg: Mapping[str, Any] | Any) -> Any:
        """`{"name": NAME, **options}` -> `self.get(NAME)(**options)`, each option checked against the class's
        signature first. Raises ValueError starting with the offending key (`name: ...`, `<option>: ...`), which
        callers prefix with their section (`eval.vis_processor.`)."""
        if cfg is not None and not isinstance(cfg, Mapping):
            try:  # an omegaconf DictConfig (omegaconf is optional here: the registry is the ground floor)
                from omegaconf import DictConfig, OmegaConf

                if isinstance(cfg, DictConfig):
                    cfg = OmegaConf.to_container(cfg, resolve=True)
            except ImportError:
                pass
        if not isinstance(cfg, Mapping):
            raise ValueError(f"expected a mapping {{name: ..., <options>}} for the {self.kind}, got {cfg!r}")
        options = dict(cfg)
        name = options.pop("name", None)
        if name is None:
            raise ValueError(f"name: required; valid {self.kind} names: {', '.join(self.names())}")
        if name not in self:
            raise ValueError(f"name: unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        cls = self.get(name)
        valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        for key in options:
            if key not in valid:
                raise ValueError(f"{key}: unknown option for {self.kind} {name!r}; valid: {', '.join(valid)}")
        return cls(**options)
