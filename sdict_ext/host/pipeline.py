"""Double-buffered host buckets between host memory and one device.

The CPU kernels (``pack``, ``unpack``, ``gather_concat_into``) read and write host
memory; the collectives of an accelerator run on device buffers. Moving tensors
between the two one by one (``.to(device)``, ``.cpu()``) costs one synchronous copy
through pageable memory per tensor. A :class:`HostPipeline` moves whole buckets
instead: a CPU kernel fills (or reads) a host bucket, and the bucket crosses to (or
from) the device in ONE asynchronous copy on the pipeline's own stream. With two
buckets, the CPU kernel works on bucket ``k`` while bucket ``k - 1`` is in flight.

Its two users:

* broadcast from a CPU source: ``pack`` into :meth:`HostPipeline.bucket`, then
  :meth:`HostPipeline.upload` into the device wire buffer; the broadcast, enqueued
  after it on the current stream, waits for the copy;
* gather with ``cpu_offload``: :meth:`HostPipeline.download` the gathered device
  bucket, :meth:`HostPipeline.wait` for it, then rebuild the final CPU tensors from
  the host bucket with the CPU kernels.

The device is a parameter: on the CPU the buckets are plain memory and every copy is
a synchronous ``copy_``, so the CPU tests drive exactly the code accelerator users
run, copy for copy.

Ordering rules (why each event exists):

* a copy on the pipeline's stream first waits for the work already enqueued on the
  current stream: that work produced the device source of a download, or still reads
  the device destination of an upload (the previous broadcast of that wire buffer);
* the current stream then waits for the copy, so what the caller enqueues next (the
  broadcast of the uploaded bytes, or a kernel that overwrites the downloaded source)
  is ordered after it;
* the host waits for a bucket's previous copy before it is handed out again
  (:meth:`HostPipeline.bucket`, :meth:`HostPipeline.download`), so a CPU kernel never
  refills a bucket that a copy engine still reads, and a download never lands in a
  bucket the host is reading.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["HostPipeline"]


class HostPipeline:
    """Two host buckets, each with its own transfer state, for one device.

    Transfer ``k`` uses bucket ``k % 2``. The buckets are allocated on first use and
    grow to the largest size asked for; pinned when the device is an accelerator (an
    asynchronous copy needs page-locked memory, and pinning once per bucket rather
    than per tensor is the point), plain on the CPU.

    Args:
        device: the device that buffers are uploaded to and downloaded from.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._accelerated = self.device.type != "cpu"
        self._hosts: list[torch.Tensor | None] = [None, None]
        # The event recorded after each bucket's last copy; None once the host has
        # waited for it (or on the CPU, where copies are synchronous).
        self._pending: list[Any] = [None, None]
        if self._accelerated:
            self._module = torch.get_device_module(self.device)
            self._stream = self._module.Stream(device=self.device)

    def bucket(self, k: int, nbytes: int) -> torch.Tensor:
        """The host bucket of transfer ``k``, free to fill: ``nbytes`` uint8 bytes.

        Waits for the bucket's previous copy first, so the caller (a ``pack`` into it)
        never overwrites bytes that an upload is still reading.
        """
        if nbytes < 0:
            raise ValueError(f"HostPipeline.bucket: nbytes must be >= 0, got {nbytes}")
        slot = k % 2
        self._settle(slot)
        host = self._hosts[slot]
        if host is None or host.numel() < nbytes:
            # Grown, not kept at an upper bound: a call's buckets are as large as its
            # largest slice, which the caller knows only slice by slice.
            host = self._hosts[slot] = torch.empty(
                nbytes, dtype=torch.uint8, pin_memory=self._accelerated
            )
        return host[:nbytes]

    def reserve(self, nbytes: int, buckets: int = 2) -> None:
        """Allocates the first ``buckets`` buckets at ``nbytes`` now (pinned on an
        accelerator), where a caller knows its largest transfer before it starts:
        while planning, before the agreement, so that a pinned allocation that fails
        (out of page-locked memory) raises on every rank instead of on one rank in the
        middle of the transfers, where the others would wait for it."""
        if nbytes < 0 or buckets not in (0, 1, 2):
            raise ValueError(
                f"HostPipeline.reserve: nbytes must be >= 0 and buckets 0, 1 or 2; got "
                f"{nbytes} and {buckets}"
            )
        for slot in range(buckets):
            host = self._hosts[slot]
            if host is None or host.numel() < nbytes:
                self._settle(slot)
                self._hosts[slot] = torch.empty(
                    nbytes, dtype=torch.uint8, pin_memory=self._accelerated
                )

    def upload(self, k: int, dst: torch.Tensor) -> None:
        """Copies the first ``dst.numel()`` bytes of bucket ``k`` into ``dst``.

        One copy, asynchronous on an accelerator; work enqueued afterwards on the
        current stream (the broadcast of ``dst``) runs after it. Fill the bucket
        through :meth:`bucket` first.

        Args:
            k: the transfer number; its bucket is ``k % 2``.
            dst: a contiguous 1-D uint8 buffer on the pipeline's device.
        """
        host = self._filled(k, dst, "upload", "dst")
        self._copy(k % 2, dst, host)

    def download(self, k: int, src: torch.Tensor) -> torch.Tensor:
        """Starts copying ``src`` into bucket ``k``; returns that host bucket.

        One copy, asynchronous on an accelerator, after the work already enqueued
        on the current stream (which produced ``src``); work enqueued afterwards on
        the current stream may overwrite ``src``. Read the returned bucket only after
        :meth:`wait`.

        Args:
            k: the transfer number; its bucket is ``k % 2``.
            src: a contiguous 1-D uint8 buffer on the pipeline's device.
        """
        self._check(src, "download", "src")
        host = self.bucket(k, src.numel())
        self._copy(k % 2, host, src)
        return host

    def wait(self, k: int) -> None:
        """Blocks until bucket ``k``'s last copy is done (a no-op on the CPU)."""
        self._settle(k % 2)

    def _check(self, buf: torch.Tensor, op: str, name: str) -> None:
        if (
            buf.dtype != torch.uint8
            or buf.dim() != 1
            or not buf.is_contiguous()
            or buf.device != self.device
        ):
            raise ValueError(
                f"HostPipeline.{op}: {name} must be a contiguous 1-D uint8 tensor on "
                f"{self.device}; got {buf.dtype} of shape {tuple(buf.shape)} on "
                f"{buf.device}"
            )

    def _filled(self, k: int, dst: torch.Tensor, op: str, name: str) -> torch.Tensor:
        self._check(dst, op, name)
        host = self._hosts[k % 2]
        have = 0 if host is None else host.numel()
        if dst.numel() > have:
            raise ValueError(
                f"HostPipeline.{op}: {name} has {dst.numel()} bytes but bucket {k % 2} "
                f"holds {have}; fill it through bucket({k}, {dst.numel()}) first"
            )
        return host[: dst.numel()]

    def _copy(self, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        if not self._accelerated:
            dst.copy_(src)
            return
        current = self._module.current_stream(self.device)
        self._stream.wait_stream(current)
        with self._module.stream(self._stream):
            dst.copy_(src, non_blocking=True)
        done = self._stream.record_event()
        current.wait_event(done)
        self._pending[slot] = done

    def _settle(self, slot: int) -> None:
        done = self._pending[slot]
        if done is not None:
            done.synchronize()
            self._pending[slot] = None
