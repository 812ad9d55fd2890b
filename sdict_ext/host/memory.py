"""Shared-memory segments populated in one pass, for ``create_cpu_state_dict``.

On a virtual machine a page fault costs microseconds (every fault exits to the
hypervisor), so faulting a large shared segment in page by page is slow, and
PyTorch's ``share_memory_()`` allocates a segment (``posix_fallocate``), then copies
the fresh tensor into it, faulting every page again. Here a segment is created empty
(``memfd_create`` + ``ftruncate``: no pages yet) and populated writable in one pass
per thread (``MADV_POPULATE_WRITE``, Linux 5.14+), which allocates and maps every page
in the kernel without a fault per page. Where shmem huge pages are enabled, the
segment asks for them first (``MADV_HUGEPAGE``): 512 times fewer pages.

Anything unavailable (another OS, an old kernel) degrades to what PyTorch does.

Two more duties of host memory that must be resident live here too:

* :func:`check_fits` refuses, before a single page is populated, a size that the
  machine or the process cannot hold (populating past it would wake the kernel's OOM
  killer, which on a shared host may kill another process);
* :func:`pin_storage` registers a storage with ``cudaHostRegister`` and unregisters it
  when the storage dies, after waiting for the asynchronous copies that read or wrote
  it (:func:`note_async_access`): unregistering, then freeing, memory that a copy
  engine is still using is an illegal address, or DMA into freed pages.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import os
import resource
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from itertools import chain
from operator import attrgetter
from typing import Any

import torch

__all__ = [
    "RangeTable",
    "check_fits",
    "device_guard",
    "fit_limits",
    "note_async_access",
    "pin_storage",
    "shared_storage",
]

_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# A huge page is 2 MiB: below a few of them, asking is pointless.
_MIN_HUGE_BYTES = 8 << 20
# Below this per thread, starting a thread costs more than it saves: populating a few
# MiB takes a small multiple of a thread start, and a 64 MB segment already gains
# from a second thread. (Measurements: BENCHMARKS.md.)
_MIN_BYTES_PER_THREAD = 8 << 20

_libc: ctypes.CDLL | None = None


def _madvise(ptr: int, nbytes: int, advice: int) -> int:
    """``madvise``; returns 0 or the errno (ENOSYS where there is no Linux libc)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return errno.ENOSYS
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.madvise.restype = ctypes.c_int
        _libc = lib
    # ctypes releases the GIL for the call, so populating threads run in parallel.
    if _libc.madvise(ptr, nbytes, advice) == 0:
        return 0
    return ctypes.get_errno()


def _populate(ptr: int, nbytes: int) -> int:
    """Allocates and maps every page of ``[ptr, ptr + nbytes)`` writable, on up to
    ``torch.get_num_threads()`` threads; returns 0 or the first errno."""
    threads = max(1, min(torch.get_num_threads(), nbytes // _MIN_BYTES_PER_THREAD))
    if threads == 1:
        return _madvise(ptr, nbytes, _MADV_POPULATE_WRITE)
    step = -(-nbytes // threads // _PAGE) * _PAGE
    errors = [0] * threads

    def run(k: int) -> None:
        lo = k * step
        errors[k] = _madvise(ptr + lo, min(step, nbytes - lo), _MADV_POPULATE_WRITE)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(1, threads)]
    for w in workers:
        w.start()
    run(0)
    for w in workers:
        w.join()
    return next((e for e in errors if e), 0)


def shared_storage(nbytes: int, pinned: bool = False) -> torch.UntypedStorage:
    """A new shared-memory storage of ``nbytes``, every page already allocated and mapped.

    The storage is what PyTorch's ``share_memory_()`` makes under the current
    ``torch.multiprocessing`` sharing strategy: with ``file_descriptor`` (Linux's
    default) a segment held by an open file descriptor (here a ``memfd``, which
    ``/dev/shm``'s size limit does not apply to), which ``torch.multiprocessing`` sends
    by passing the descriptor; with ``file_system`` a named segment from PyTorch's own
    shared-memory manager. Either way ``is_shared()`` is true and sharing it again
    copies nothing. Populating allocates every page now, so a full system fails here
    with an error (as PyTorch's ``posix_fallocate`` does) rather than with ``SIGBUS``
    at a later first write.

    Args:
        nbytes: the segment's size.
        pinned: the caller will pin it (then swap cannot hold it), for the size check.

    Raises:
        RuntimeError: the pages cannot be allocated (out of memory / shared memory), or
            ``nbytes`` exceeds what the machine or the process can hold
            (:func:`check_fits`; checked before anything is allocated).
    """
    fd_strategy = torch.multiprocessing.get_sharing_strategy() == "file_descriptor"
    memfd = fd_strategy and hasattr(os, "memfd_create")
    # PyTorch's own segments are files in /dev/shm (shm_open); a memfd is on no
    # filesystem with a size of its own.
    check_fits(
        nbytes,
        "create_cpu_state_dict(share_memory=True): shared memory",
        fit_limits(pinned=pinned, shared=True, shm_dir=None if memfd else "/dev/shm"),
    )
    if memfd:
        fd = os.memfd_create("sdict_ext", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            # Maps the descriptor (and keeps a duplicate of it), as a storage received
            # through torch.multiprocessing is made.
            storage = torch.UntypedStorage._new_shared_fd_cpu(fd, nbytes)
        finally:
            os.close(fd)
        fresh = True
    else:
        storage = torch.UntypedStorage._new_shared(nbytes)
        fresh = False
    ptr = storage.data_ptr()
    if nbytes >= _MIN_HUGE_BYTES:
        # Honoured where shmem huge pages are enabled ("advise" in
        # /sys/kernel/mm/transparent_hugepage/shmem_enabled); harmless elsewhere.
        _madvise(ptr, nbytes, _MADV_HUGEPAGE)
    err = _populate(ptr, nbytes)
    # EFAULT: a page could not be provided (what a write would get SIGBUS for).
    if err in (errno.ENOMEM, errno.EFAULT, errno.ENOSPC):
        raise RuntimeError(
            f"create_cpu_state_dict(share_memory=True): cannot allocate {nbytes} bytes of "
            f"shared memory ({os.strerror(err)}); free memory or use share_memory=False"
        )
    if err and fresh:
        # No MADV_POPULATE_WRITE (before Linux 5.14): first-touch every page now, on
        # torch's threads, so the pages exist before the caller relies on them.
        torch.empty(0, dtype=torch.uint8).set_(storage).zero_()
    return storage


# ---------------------------------------------------------------- will it fit?

_GIB = float(1 << 30)


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _kib_field(text: str | None, name: str) -> int | None:
    """A ``Name:  N kB`` field of /proc/meminfo or /proc/self/status, in bytes."""
    if text is None:
        return None
    prefix = name + ":"
    for line in text.splitlines():
        if line.startswith(prefix):
            return int(line.split()[1]) * 1024
    return None


def fit_limits(
    *,
    pinned: bool,
    shared: bool,
    shm_dir: str | None = None,
    read: Callable[[str], str | None] = _read_text,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    statvfs: Callable[[str], Any] = os.statvfs,
) -> list[tuple[str, int]]:
    """What a new, fully populated host allocation may take: ``(limit, bytes left)`` pairs.

    Args:
        pinned: the pages will be pinned, so swap cannot hold them.
        shared: a shared mapping, which ``RLIMIT_DATA`` does not count.
        shm_dir: the filesystem the segment is a file on (``/dev/shm``), or None (a
            ``memfd``, or private memory), where no filesystem's size applies.
        read: reads a /proc file's text (None when unreadable); a parameter for tests,
            as are ``getrlimit`` and ``statvfs``.

    Returns:
        Every limit that applies and could be read; an unreadable one is left out
        (another OS), so the check never refuses on a guess.
    """
    limits: list[tuple[str, int]] = []
    meminfo = read("/proc/meminfo")
    available = _kib_field(meminfo, "MemAvailable")
    if available is not None:
        if pinned:
            limits.append(("MemAvailable in /proc/meminfo", available))
        else:
            swap = _kib_field(meminfo, "SwapFree") or 0
            limits.append(("MemAvailable + SwapFree in /proc/meminfo", available + swap))
    status = None
    for name, which, field, applies in (
        ("RLIMIT_AS", resource.RLIMIT_AS, "VmSize", True),
        ("RLIMIT_DATA", resource.RLIMIT_DATA, "VmData", not shared),
    ):
        soft = getrlimit(which)[0]
        if not applies or soft == resource.RLIM_INFINITY or soft < 0:
            continue
        status = read("/proc/self/status") if status is None else status
        used = _kib_field(status, field) or 0
        limits.append(
            (f"{name} ({soft} bytes) less this process's {field} ({used} bytes)",
             max(0, soft - used))
        )
    if shm_dir is not None:
        try:
            fs = statvfs(shm_dir)
        except OSError:
            pass
        else:
            limits.append((f"the free space of {shm_dir}", fs.f_bavail * fs.f_frsize))
    return limits


def check_fits(nbytes: int, what: str, limits: Sequence[tuple[str, int]]) -> None:
    """Raises before anything is allocated when ``nbytes`` exceeds one of ``limits``.

    Populating (or pinning) more than the machine can hold does not fail: the kernel's
    OOM killer ends a process, maybe another user's. PyTorch's allocator refuses such
    a size at once ("can't allocate memory"); this makes ours refuse too.

    Args:
        nbytes: the size about to be allocated and populated.
        what: the call and kind of memory, for the message.
        limits: :func:`fit_limits`'s answer.

    Raises:
        RuntimeError: naming the size and the limit it exceeds.
    """
    for name, left in limits:
        if nbytes > left:
            raise RuntimeError(
                f"{what}: cannot allocate {nbytes} bytes ({nbytes / _GIB:.1f} GiB): that "
                f"exceeds {name}, {left} bytes ({left / _GIB:.1f} GiB) available; nothing "
                "was allocated. Free memory, raise the limit, or allocate less"
            )


# ---------------------------------------------------------------- pinned ranges


class _Pinned:
    """A ``cudaHostRegister``-ed range and the asynchronous copies that may still use it."""

    __slots__ = ("ptr", "end", "device", "events")

    def __init__(self, ptr: int, nbytes: int, device: int | None) -> None:
        self.ptr = ptr
        self.end = ptr + nbytes
        self.device = device
        # (device, stream) -> the last event recorded there after a copy that used the
        # range: a later event on one stream implies the earlier ones.
        self.events: dict[tuple[int, int], Any] = {}


class RangeTable:
    """Host byte ranges by start address (each record has ``.end``), thread-safe.

    Shared by the pinned ranges here and the stager's slab registry, which both look a
    pointer up among the live slabs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_start: dict[int, Any] = {}
        self._starts: list[int] = []  # sorted

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __contains__(self, start: int) -> bool:
        return start in self._by_start

    def __getitem__(self, start: int) -> Any:
        return self._by_start[start]

    def add(self, start: int, record: Any) -> None:
        with self._lock:
            self._by_start[start] = record
            bisect.insort(self._starts, start)

    def discard(self, start: int, record: Any) -> None:
        """Removes ``record`` (not a newer record at the same start)."""
        with self._lock:
            if self._by_start.get(start) is record:
                del self._by_start[start]
                self._starts.remove(start)

    def at(self, ptr: int) -> Any:
        """The record whose range holds ``ptr``, or None."""
        with self._lock:
            k = bisect.bisect_right(self._starts, ptr) - 1
            if k < 0:
                return None
            record = self._by_start[self._starts[k]]
        return record if ptr < record.end else None

    def overlapping(self, lo: int, hi: int) -> list[Any]:
        """The records whose ranges meet ``[lo, hi]``."""
        with self._lock:
            below = self._starts[: bisect.bisect_right(self._starts, hi)]
            return [r for r in map(self._by_start.__getitem__, below) if r.end > lo]


_pinned_lock = threading.Lock()  # guards the records' events
_pinned = RangeTable()


def device_guard(device: int | None) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)``, or nothing for None (no CUDA device in play).

    Entering it in a fresh thread creates no context on device 0: torch restores the
    previous device on exit only where that device already has a context.
    """
    return contextlib.nullcontext() if device is None else torch.cuda.device(device)


def _cuda_register(ptr: int, nbytes: int) -> int:
    # cudaHostRegisterPortable | cudaHostRegisterMapped (1 | 2): pinned for every CUDA
    # context, as PyTorch registers it, and mapped, so batched_copy_'s kernel can write
    # small tensors straight into it (unmapped, each would be a copy-engine command).
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 3))


def _cuda_unregister(ptr: int) -> int:
    return int(torch.cuda.cudart().cudaHostUnregister(ptr))


def pin_storage(
    storage: torch.UntypedStorage,
    device: int | None,
    *,
    register: Callable[[int, int], int] = _cuda_register,
    unregister: Callable[[int], int] = _cuda_unregister,
    device_guard: Callable[[int | None], contextlib.AbstractContextManager] = device_guard,
) -> None:
    """Pins ``storage`` (one ``cudaHostRegister``) until it dies.

    Both the registration and the finalizer run under ``device_guard(device)``: a
    CUDA call creates a context on whichever device is current in its thread, and in
    a fresh thread (a stager's worker, the one garbage collection happens to run in)
    that is device 0, which on an 8-GPU node would cost every rank about 0.5 GB of
    GPU 0. The finalizer first waits for every asynchronous copy recorded against the
    range (:func:`note_async_access`), then unregisters; the memory is freed after.

    Args:
        storage: the host storage to pin (its whole byte range).
        device: the CUDA device index to run the CUDA calls under (None: the current).
        register: ``(ptr, nbytes) -> cudaError``; ``unregister``: ``ptr -> cudaError``;
            ``device_guard``: a context manager factory like :func:`device_guard`.
            Parameters so that tests can watch the order of events without a GPU.

    Raises:
        RuntimeError: the registration failed.
    """
    ptr, nbytes = storage.data_ptr(), storage.nbytes()
    with device_guard(device):
        err = register(ptr, nbytes)
    if err != 0:
        raise RuntimeError(
            f"create_cpu_state_dict: cudaHostRegister of {nbytes} bytes failed with "
            f"cudaError {err}"
        )
    pinned = _Pinned(ptr, nbytes, device)
    _pinned.add(ptr, pinned)
    # The storage object is preserved while any view of it lives, so this fires exactly
    # when the last tensor on it is gone, and the range can be registered again later.
    weakref.finalize(storage, _release, pinned, unregister, device_guard)


def _release(
    pinned: _Pinned,
    unregister: Callable[[int], int],
    device_guard: Callable[[int | None], contextlib.AbstractContextManager],
) -> None:
    _pinned.discard(pinned.ptr, pinned)
    with _pinned_lock:
        events = list(pinned.events.values())
        pinned.events.clear()
    # Runs from a finalizer, where a raise is swallowed: warnings at least surface.
    try:
        with device_guard(pinned.device):
            for event in events:
                event.synchronize()
            err = unregister(pinned.ptr)
    except Exception as exc:  # noqa: BLE001 - nothing above this frame can catch it
        warnings.warn(f"unpinning a host slab failed: {exc}", stacklevel=1)
        return
    if err != 0:
        warnings.warn(f"cudaHostUnregister failed with cudaError {err}", stacklevel=1)


def _record_on_current_stream(device: torch.device | None) -> list[tuple[Any, Any]]:
    if device is None:
        return []
    stream = torch.cuda.current_stream(device)
    event = torch.cuda.Event()
    event.record(stream)
    return [((stream.device_index, stream.stream_id), event)]


_DATA_PTR = torch.Tensor.data_ptr
_IS_CUDA = attrgetter("is_cuda")


def _cuda_device(tensor_lists: Sequence[Sequence[torch.Tensor]]) -> torch.device | None:
    """The CUDA device of a batched copy (one per call): mostly the first tensor's."""
    for tensors in tensor_lists:
        if tensors and tensors[0].is_cuda:
            return tensors[0].device
    first = next(filter(_IS_CUDA, chain.from_iterable(tensor_lists)), None)
    return None if first is None else first.device


def note_async_access(
    *tensor_lists: Sequence[torch.Tensor],
    record: Callable[[torch.device | None], list[tuple[Any, Any]]] = _record_on_current_stream,
) -> None:
    """Records, against every pinned range these tensors lie in, the copies just enqueued.

    Call it after enqueueing asynchronous copies between these tensors (one
    ``batched_copy_`` call: on the current stream of its one CUDA device): an event is
    recorded on that stream, and the range's finalizer waits for it before
    unregistering. ``record_event``, PyTorch's way for its own pinned blocks, does
    nothing for ``cudaHostRegister`` memory.

    The ranges are found from the lowest and highest address in each list (two
    C-level passes, no Python work per tensor), so a range between them counts as used
    too: at worst a finalizer waits for a copy it did not need to, never the other way.

    Args:
        tensor_lists: the destinations and sources of the copies.
        record: ``device -> [(stream key, event)]`` (a parameter for tests).
    """
    if not _pinned:
        return
    hit: list[_Pinned] = []
    for tensors in tensor_lists:
        if tensors:
            ptrs = list(map(_DATA_PTR, tensors))
            hit += _pinned.overlapping(min(ptrs), max(ptrs))
    if not hit:
        return
    marks = record(_cuda_device(tensor_lists))
    with _pinned_lock:
        for pinned in hit:
            pinned.events.update(marks)
