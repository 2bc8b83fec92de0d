"""What one import-time patch of fairseq is: its target, the fairseq it was written against, the check that
this fairseq still needs it, and how it is applied."""

import functools
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

#: The fairseq every patch was written against and tested on.
WRITTEN_FOR = "ve-fairseq 0.12.3 (a build of fairseq's main branch, before its torch 2.6 fix)"

#: Attribute set on every function / property a patch installs, so that it is never applied twice.
MARK = "__dphubert_patched__"


def marked(obj: object) -> bool:
    """Whether ``obj`` (a function, or a property's getter) was installed by a patch."""
    return getattr(getattr(obj, "fget", obj), MARK, False)


def mark(fn: Callable) -> Callable:
    setattr(fn, MARK, True)
    return fn


@dataclass(frozen=True)
class Patch:
    """``needed()``: the guard, a cheap check that the fairseq in use still misbehaves (read before applying;
    a fairseq that already behaves leaves the patch unapplied). ``applied()``: whether the patch is in place.
    ``apply()``: put it in place."""

    name: str
    target: str
    written_for: str
    needed: Callable[[], bool]
    applied: Callable[[], bool]
    apply: Callable[[], None]


def function_patch(
    name: str,
    module: ModuleType,
    attr: str,
    needed: Callable[[], bool],
    wrapper_for: Callable[[Callable], Callable],
) -> Patch:
    """A patch that replaces the module-level function ``module.attr`` by ``wrapper_for(original)`` (given the
    original's name and docstring, and marked so it is applied once)."""

    def applied() -> bool:
        return marked(getattr(module, attr))

    def apply() -> None:
        original = getattr(module, attr)
        setattr(module, attr, mark(functools.wraps(original)(wrapper_for(original))))

    return Patch(name, f"{module.__name__}.{attr}", WRITTEN_FOR, needed, applied, apply)
