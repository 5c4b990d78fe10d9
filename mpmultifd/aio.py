"""asyncio front end: await a migration, a save or a destination, and iterate events.

Agents are often asyncio programs (QEMU's own ``qemu.qmp`` is asyncio-native).
The functions here run the blocking call (:meth:`Source.migrate`,
:meth:`Source.save`, :meth:`Destination.wait`) in a thread of its own, so the
event loop stays free, and make task cancellation mean what an asyncio
program expects::

    import asyncio
    from mpmultifd import aio

    async def handover(src, address, qmp):
        async def stop():
            await qmp.execute("stop")           # a coroutine: awaited on this loop
        async def cont():
            await qmp.execute("cont")
        result = await asyncio.wait_for(aio.migrate(src, address, pause=stop, resume=cont), 600)
        ...

- Cancelling the awaiting task (``task.cancel()``, ``asyncio.wait_for``,
  ``asyncio.timeout``) cancels the migration and waits for its clean end
  (workers joined, ``resume`` run if ``pause`` had run) before the
  ``CancelledError`` propagates. A migration past its point of no return when
  the cancellation arrives completes; the task still ends cancelled, and
  ``src.status`` says ``completed``.
- ``pause``, ``resume`` and ``throttle`` may be plain functions (called in the
  migration's thread) or coroutine functions (awaited on the event loop).
- :func:`events` is an async iterator over the same events as
  :meth:`Source.events`, subscribed the moment it is created, so events of a
  migration started afterwards are not missed.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from .stats import TERMINAL_STATUSES

__all__ = ["migrate", "save", "wait", "events", "EventStream"]


def _to_sync(cb: Callable[..., Any] | None, loop: asyncio.AbstractEventLoop) -> Callable[..., Any] | None:
    """A callback the migration thread can call: coroutine functions run on ``loop``."""
    if cb is None or not inspect.iscoroutinefunction(cb):
        return cb

    def call(*args: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(cb(*args), loop).result()

    return call


async def _in_thread(fn: Callable[[], Any], cancel: Callable[[], None], name: str) -> Any:
    """Run blocking ``fn`` in a thread; on cancellation call ``cancel()`` and wait for ``fn`` to end."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def target() -> None:
        try:
            value = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            ok, value = False, exc
        else:
            ok = True
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=target, name=name, daemon=True).start()
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancel()
        while not fut.done():  # the clean end first, however often we are cancelled meanwhile
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                continue
            except BaseException:  # noqa: BLE001 - the cancellation is what the caller sees
                break
        if fut.done() and not fut.cancelled():
            fut.exception()  # retrieved: no "never retrieved" warning
        raise


async def migrate(
    src: Any,
    address: Any,
    pause: Callable[[], Any] | None = None,
    resume: Callable[[], Any] | None = None,
    *,
    throttle: Callable[[int], Any] | None = None,
    top_up: bool = False,
) -> Any:
    """``await`` :meth:`Source.migrate`; returns its :class:`MigrationResult` or raises its error."""
    loop = asyncio.get_running_loop()
    p, r, t = _to_sync(pause, loop), _to_sync(resume, loop), _to_sync(throttle, loop)
    return await _in_thread(
        lambda: src.migrate(address, pause=p, resume=r, throttle=t, top_up=top_up), src.cancel, "mpmultifd-aio-migrate"
    )


async def save(
    src: Any,
    path: str | os.PathLike[str],
    *,
    pause: Callable[[], Any] | None = None,
    resume: Callable[[], Any] | None = None,
    throttle: Callable[[int], Any] | None = None,
    direct: bool = False,
) -> Any:
    """``await`` :meth:`Source.save`; returns its :class:`SaveResult` or raises its error."""
    loop = asyncio.get_running_loop()
    p, r, t = _to_sync(pause, loop), _to_sync(resume, loop), _to_sync(throttle, loop)
    return await _in_thread(
        lambda: src.save(path, pause=p, resume=r, throttle=t, direct=direct), src.cancel, "mpmultifd-aio-save"
    )


async def wait(dst: Any) -> Any:
    """``await`` :meth:`Destination.wait`; cancelling the task cancels the destination's migration."""
    return await _in_thread(dst.wait, dst.cancel, "mpmultifd-aio-wait")


class _LoopQueue:
    """An event hub subscriber that hands events to an asyncio queue on its loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def put(self, event: dict[str, Any]) -> None:  # called from the migration's threads
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed
            pass


class EventStream:
    """Async iterator over a Source's (or Destination's) events; ends after the migration's
    terminal ``MIGRATION`` event (completed, failed, cancelled), or after ``timeout`` seconds
    without one. Use ``async with`` or :meth:`aclose` to stop early."""

    def __init__(self, job: Any, timeout: float | None = None) -> None:
        hub = getattr(job, "_events", None)
        if hub is None:
            raise TypeError(f"{type(job).__name__} has no events")
        self._hub = hub
        self._timeout = timeout
        self._sub = _LoopQueue(asyncio.get_running_loop())
        with hub._lock:
            hub._queues.append(self._sub)
        self._closed = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._closed:
            raise StopAsyncIteration
        try:
            get: Awaitable[dict[str, Any]] = self._sub.queue.get()
            ev = await (asyncio.wait_for(get, self._timeout) if self._timeout is not None else get)
        except asyncio.TimeoutError:
            await self.aclose()
            raise StopAsyncIteration from None
        if ev.get("event") == "MIGRATION" and ev.get("status") in TERMINAL_STATUSES:
            await self.aclose()  # this one is still delivered; the next call ends the iteration
        return ev

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            with self._hub._lock:
                if self._sub in self._hub._queues:
                    self._hub._queues.remove(self._sub)

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


def events(job: Any, *, timeout: float | None = None) -> EventStream:
    """Events of ``job`` (a Source or a Destination) as an async iterator, subscribed now.

    ``async for ev in aio.events(src)``.
    """
    return EventStream(job, timeout)
