"""Guards: the conditions a settled call was made under, as data that C++ reads (``fastpeft._C.SettledGemv``,
``fastpeft._C.guards_hold``) without running Python per check.

A guard is a tuple ``(kind, container, key, expected)``; :func:`holds` is what each kind means, and the C++ reader
(``csrc/cpu/settled_gemv.cpp``) gives the same answers (tests hold the two together). A lookup that fails reads as
``None`` (item kinds) or fails the guard (attribute kinds): a guard never raises.
"""

from __future__ import annotations

ITEM_IS = 0  # container[key] is expected (a dict's missing key reads None)
ITEM_EQUAL = 1  # container[key] == expected
ITEM_FALSY = 2  # not container[key]
ATTR_IS = 3  # getattr(container, key) is expected
ATTR_FALSY = 4  # not getattr(container, key)
LENGTH_IS = 5  # len(container) == expected
LACKS = 6  # key not in container
NOT_DROPPING = 7  # not (container["training"] and container["p"] > 0): a dropout module's __dict__, drawing nothing
ATTR_EQUAL = 8  # getattr(container, key) == expected

_MISSING = object()


def _item(container, key):
    try:
        return container[key]
    except Exception:
        return None


def holds(guard: tuple) -> bool:
    """Whether ``guard`` holds now (the meaning of each kind; the C++ reader agrees)."""
    kind, container, key, expected = guard
    try:
        if kind == ITEM_IS:
            return _item(container, key) is expected
        if kind == ITEM_EQUAL:
            value = _item(container, key)
            return value is expected or bool(value == expected)  # (an object equals itself, as in C++)
        if kind == ITEM_FALSY:
            return not _item(container, key)
        if kind == ATTR_IS:
            return getattr(container, key, _MISSING) is expected
        if kind == ATTR_FALSY:
            value = getattr(container, key, _MISSING)
            return value is not _MISSING and not value
        if kind == ATTR_EQUAL:
            value = getattr(container, key, _MISSING)
            return value is not _MISSING and (value is expected or bool(value == expected))
        if kind == LENGTH_IS:
            return len(container) == expected
        if kind == LACKS:
            return key not in container
        if kind == NOT_DROPPING:
            return not _item(container, "training") or not _item(container, "p") > 0
    except Exception:
        return False
    return False


def item_is(container, key) -> tuple:
    """A guard that ``container[key]`` stays the object it is now."""
    return (ITEM_IS, container, key, _item(container, key))


def attribute_falsy(obj, name: str) -> tuple:
    """A guard that ``obj.name`` stays falsy: a lookup in ``obj.__dict__`` where the attribute lives there (a
    missing entry then reads None: the class's default must be falsy too), else by ``getattr``."""
    own = getattr(obj, "__dict__", None)
    if own is not None and name in own and not getattr(type(obj), name, None):
        return (ITEM_FALSY, own, name, None)
    return (ATTR_FALSY, obj, name, None)


def attribute_equal(obj, name: str, expected) -> tuple:
    """A guard that ``obj.name == expected`` (a value of its own: a copy of a list the object may change in place),
    by ``obj.__dict__`` where the attribute lives there (a missing entry reads None), else by ``getattr``."""
    own = getattr(obj, "__dict__", None)
    if own is not None and name in own:
        return (ITEM_EQUAL, own, name, expected)
    return (ATTR_EQUAL, obj, name, expected)
