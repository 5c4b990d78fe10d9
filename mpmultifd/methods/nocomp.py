"""The ``none`` method: raw pages, straight from shared RAM to the socket and back."""

from __future__ import annotations

import socket

import numpy as np

from ..wire import ENCODING_RAW, DataHeader
from .base import Method, MethodReceiver, MethodSender, PageBatch, PageSink, Prepared

__all__ = ["NoCompression"]


class _Sender(MethodSender):
    def send_prepare(self, batch: PageBatch) -> Prepared:
        # memoryview slices of the shared RAM, one per run of consecutive pages:
        # the kernel copies from the guest's pages, user space copies nothing
        return Prepared(ENCODING_RAW, batch.iovs(), len(batch.pages) * batch.page_size)


class _Receiver(MethodReceiver):
    def __init__(self, page_size: int, packet_pages: int) -> None:
        self.page_size = page_size
        self._bounce = np.empty((packet_pages, page_size), dtype=np.uint8)
        self._bounce_mv = self._bounce.data.cast("B")

    def recv(self, header: DataHeader, sock: socket.socket, sink: PageSink) -> None:
        # one contiguous read into a reusable buffer, then the pages go to their
        # places (see PageSink.store for why), or straight into a populated mapping
        pages = (header.normal_offsets // self.page_size).astype(np.intp)
        sink.recv_pages(header.block, pages, sock, self._bounce_mv)


class NoCompression(Method):
    """Raw pages (QEMU's ``none``): zero user-space copies on the sender."""

    name = "none"

    def sender(self, page_size: int, packet_pages: int) -> MethodSender:
        return _Sender()

    def receiver(self, page_size: int, packet_pages: int) -> MethodReceiver:
        return _Receiver(page_size, packet_pages)
