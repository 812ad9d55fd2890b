"""Shared-memory segments populated in one pass, for ``create_cpu_state_dict``.

On a virtual machine a page fault costs microseconds: on the 2-core KVM dev machine,
faulting an already allocated 1 GiB shared segment into a process took ~700 ms, and
PyTorch's ``share_memory_()`` allocates a segment (``posix_fallocate``), then copies
the fresh tensor into it, faulting every page again. Here a segment is created empty
(``memfd_create`` + ``ftruncate``: no pages yet) and populated writable in one pass
per thread (``MADV_POPULATE_WRITE``, Linux 5.14+), which allocates and maps every page
in the kernel without a fault per page. Where shmem huge pages are enabled, the
segment asks for them first (``MADV_HUGEPAGE``): 512 times fewer pages.

Anything unavailable (another OS, an old kernel) degrades to what PyTorch does.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import threading

import torch

__all__ = ["shared_storage"]

_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# A huge page is 2 MiB: below a few of them, asking is pointless.
_MIN_HUGE_BYTES = 8 << 20
# Below this per thread, starting a thread (~0.1 ms) costs more than it saves: 8 MiB
# take ~6 ms to populate on the 2-core dev VM. (At 64 MiB, the bench's 64 MB shared
# create ran on one thread: 48 ms, against 26 ms on two; 2026-12-03 10:38.)
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


def shared_storage(nbytes: int) -> torch.UntypedStorage:
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

    Raises:
        RuntimeError: the pages cannot be allocated (out of memory / shared memory).
    """
    fd_strategy = torch.multiprocessing.get_sharing_strategy() == "file_descriptor"
    if fd_strategy and hasattr(os, "memfd_create"):
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
