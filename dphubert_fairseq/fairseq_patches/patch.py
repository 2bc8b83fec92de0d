"""What one import-time patch of fairseq is: its target, the fairseq it was written against, the check that
this fairseq still needs it, and how it is applied."""

from dataclasses import dataclass
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
