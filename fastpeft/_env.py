"""Reading fastpeft's environment variables on the per-call path.

``os.environ.get`` of an unset variable costs ~0.8 us (a failed lookup raises and catches ``KeyError`` inside
``Mapping.get``), and the dispatch reads ``FASTPEFT_BACKEND`` and ``FASTPEFT_ROUTE`` on every fused call, so at
decode sizes those two reads were a visible share of a layer's cost. On POSIX ``os.environ`` keeps its values in a
plain dict of bytes, which ``os.environ[...] = ...`` and ``del os.environ[...]`` update; reading that dict sees every
change made through ``os.environ`` at a dict lookup's cost. Elsewhere (Windows keeps str keys, upper-cased), or if
that detail of CPython ever changes, the public ``os.environ.get`` is used.
"""

from __future__ import annotations

import os
from typing import Optional

from . import guards

_DATA = getattr(os.environ, "_data", None)
_FAST = (os.name == "posix" and isinstance(_DATA, dict)
         and all(isinstance(key, bytes) for key in list(_DATA)[:8]))


# name -> its bytes key, and raw bytes -> decoded value: encoding the name and decoding the value cost more than the
# lookup itself, and the dispatch reads the same few variables, mostly unset or at one value, on every call.
_KEYS: dict[str, bytes] = {}
_DECODED: dict[bytes, str] = {}


def read(name: str) -> Optional[str]:
    """The value of environment variable ``name`` as ``os.environ.get(name)`` gives it (None when unset)."""
    if _FAST:
        key = _KEYS.get(name)
        if key is None:
            key = _KEYS[name] = name.encode()
        raw = _DATA.get(key)
        if raw is None:
            return None
        value = _DECODED.get(raw)
        if value is None:
            value = os.fsdecode(raw)
            if len(_DECODED) < 64:  # a bounded memo: values set in a loop are decoded per read instead
                _DECODED[raw] = value
        return value
    return os.environ.get(name)


def raw(name: bytes):
    """The value of environment variable ``name`` in a form only for comparing with an earlier ``raw(name)``
    (bytes on POSIX; None when unset): one dict lookup, no decoding."""
    if _FAST:
        return _DATA.get(name)
    return os.environ.get(name.decode())


def raw_guard(name: bytes) -> Optional[tuple]:
    """A guard (``fastpeft.guards``) that ``raw(name)`` stays what it is now, or None where ``raw`` does not read a
    dict."""
    return guards.item_is(_DATA, name) if _FAST else None
