"""One registry mechanism for the loop's roles: a string key -> factory, filled by a decorator, read by
`make(key, **kwargs)` with a clear error naming the unknown key and the known ones."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from clvr.errors import ClvrError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """Factories of one role (generator, controller, verifier) by key."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def register(self, key: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            self[key] = factory
            return factory
        return deco

    def make(self, key: str, **kwargs) -> T:
        if key not in self:
            raise ClvrError(f"unknown {self.role} '{key}' (known: {', '.join(sorted(self))})")
        return self[key](**kwargs)
