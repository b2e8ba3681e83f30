"""One registry mechanism for everything pyrl looks up by name: policy losses, advantage
estimators, rewards and trainer tasks.

    ESTIMATORS = Registry("advantage estimator")

    @ESTIMATORS.register("grpo")
    def grpo(rewards, group_size, *, eps=1e-6): ...

    ESTIMATORS.get("grpo")        # the function; an unknown name raises ValueError listing the known ones
    ESTIMATORS.names()            # sorted names

A name is registered once: registering it again raises ``ValueError`` (pass ``replace=True`` to
override on purpose), so two plugins can never silently shadow each other. ``unregister`` removes
a name (tests and plugins that install something temporarily).
"""
from __future__ import annotations

from typing import Any, Dict, Generic, Iterator, List, Optional, TypeVar

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Names -> objects of one ``kind`` (a word used in error messages, e.g. ``"policy loss"``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str, obj: Optional[T] = None, *, replace: bool = False) -> Any:
        """``register(name, obj)`` adds ``obj``; ``@register(name)`` is the decorator form (returns
        the decorated object unchanged)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if not isinstance(replace, bool):
            raise TypeError(f"replace must be a bool, got {type(replace).__name__} {replace!r}")

        def add(item: T) -> T:
            if name in self._entries and not replace and self._entries[name] is not item:
                article = "an" if self.kind[:1] in "aeiou" else "a"
                raise ValueError(f"{article} {self.kind} named {name!r} is already registered; "
                                 f"pick another name or pass replace=True")
            self._entries[name] = item
            return item

        if obj is None:
            return add
        return add(obj)

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return what it named (``ValueError`` if it is not registered)."""
        self.get(name)
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; registered: "
                             f"{', '.join(repr(n) for n in self.names())}") from None

    def names(self) -> List[str]:
        return sorted(self._entries)

    def values(self) -> List[T]:
        """The registered objects, in registration order."""
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
