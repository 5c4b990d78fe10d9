"""Payload methods: how a batch of pages becomes bytes on the wire and back.

A method pairs a sender side, ``send_prepare(batch) -> Prepared`` (the IOVs
that follow the packet header), with a receiver side, ``recv(header, sock,
sink)`` (read the payload and put the pages in place). Zero-page detection runs
before ``send_prepare`` in the channel worker, so a method only sees the
normal pages.

Methods are found by name through the ``mpmultifd.methods`` entry-point group,
so a separate package can add one (an accelerator, say) without touching
mpmultifd::

    [project.entry-points."mpmultifd.methods"]
    mycodec = "mypkg.codec:MyCodec"

:func:`register` adds one at run time (tests, embedded use).
"""

from __future__ import annotations

from importlib import metadata

from ..errors import ConfigError
from .base import Method, MethodReceiver, MethodSender, PageBatch, PageSink, Prepared, is_one_run, page_runs

__all__ = [
    "PageBatch",
    "Prepared",
    "PageSink",
    "Method",
    "MethodSender",
    "MethodReceiver",
    "register",
    "get_method",
    "available_methods",
    "page_runs",
    "is_one_run",
]

ENTRY_POINT_GROUP = "mpmultifd.methods"


_REGISTRY: dict[str, type[Method]] = {}
_ENTRY_POINTS_LOADED = False


def register(name: str, method: type[Method]) -> None:
    """Make ``method`` available under ``name`` in this process (and its forked children)."""
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise TypeError(f"{method!r} is not a Method subclass")
    _REGISTRY[name] = method


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    for ep in eps:
        if ep.name in _REGISTRY:
            continue
        try:
            cls = ep.load()
        except Exception:  # a broken plugin must not break the others
            continue
        if isinstance(cls, type) and issubclass(cls, Method):
            _REGISTRY[ep.name] = cls


def _builtins() -> None:
    from .compress import Auto, Lz4, Zlib, Zstd
    from .nocomp import NoCompression

    for cls in (NoCompression, Lz4, Zstd, Zlib, Auto):
        _REGISTRY.setdefault(cls.name, cls)


def available_methods() -> list[str]:
    """Names of every method this process can use."""
    _builtins()
    _load_entry_points()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name``; :class:`ConfigError` names the ones that exist."""
    _builtins()
    if name not in _REGISTRY:
        _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"compression: no method named {name!r} here; available: {', '.join(available_methods())}"
        ) from None
