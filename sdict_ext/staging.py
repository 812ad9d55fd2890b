"""Checkpoint staging for ``torch.distributed.checkpoint.async_save`` that barely stalls training.

:class:`PinnedStager` snapshots a state dict into host memory with batched copies into one
reusable host slab, so ``async_save`` blocks the trainer only for the bookkeeping of
``stage`` (recording an event and queueing a job); walking the state dict and copying run
behind the trainer (on a side CUDA stream, or in a background thread for CPU tensors).

The contract with the trainer
-----------------------------
``stage`` returns before the copy has finished. Until the staging completes (its Future
resolves, or :meth:`PinnedStager.synchronize_staging` returns), the trainer may run its
next forward and backward passes, but must not modify anything the state dict refers to:

* ``optimizer.step()`` must wait. Either call ``stager.synchronize_staging()`` before it,
  or install :meth:`PinnedStager.guard_optimizer` once, which makes every
  ``optimizer.step()`` wait for the staging in flight (and raise its failure).
* State that the forward pass mutates in place (BatchNorm running statistics, step
  counters kept in buffers, a KV cache registered as a buffer) is part of the state dict
  too: with such modules, synchronize before the next forward instead.
* On CUDA, the snapshot is ordered after the work already enqueued on the current stream
  when ``stage`` is called (an event recorded there); later kernels on that stream may run
  concurrently with the copy, which is why they must not write the staged tensors.

The staged state dict shares the stager's slab with every later staging of the same
layout: wait for a checkpoint's upload (``AsyncSaveResponse.upload_completion``) before
staging the next one, as with PyTorch's ``DefaultStager`` and its storage cache.

Failures reach every rank. Under ``torch.distributed`` (more than one rank), each
staging ends with a tiny all-gather of "did it fail here" on the stager's own gloo group
(made when the stager is constructed, so every rank must construct its stager, as with
``async_save`` itself). A staging that failed on any rank then fails on every rank,
naming the ranks, so no rank's upload starts a checkpoint the others will not write
(with a purely local failure, the other ranks' uploads would wait in the checkpoint's
collectives until their timeout). The exchange runs behind the trainer, in the staging
thread; ``all_ranks=False`` turns it off. Argument errors raised by ``stage`` itself
(a closed stager, a state dict that is not a dict) are the caller's and are not
exchanged. The exchange waits at most the group's timeout: the job's (the default
group's, ``init_process_group(timeout=...)``) unless the stager is given its own, so a
rank that never stages makes the others' staging fail after that long, not hang. The
group is destroyed by :meth:`PinnedStager.close`, or when an unclosed stager is
garbage-collected (each gloo group holds sockets and threads).
"""

from __future__ import annotations

import copy
import io
import pickle
import threading
import time
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import reduce_tensor as _torch_reduce_tensor
from torch.utils.hooks import RemovableHandle

from sdict_ext import ops
from sdict_ext.collectives.agreement import agree
from sdict_ext.collectives.buckets import buckets
from sdict_ext.host.memory import RangeTable, device_guard
from sdict_ext.tree import LEAF_DTENSOR, LEAF_SHARDED, Flat, flatten, format_path, leaf_kind
from sdict_ext.utils import create_cpu_state_dict

__all__ = ["PinnedStager", "StagingStats"]

#: Default cap on the bytes moved by one ``batched_copy_`` call: large enough that a
#: checkpoint takes a handful of calls, small enough to bound the per-call plan.
DEFAULT_BUCKET_BYTES = 1 << 30

# The snapshot policy of plain values: immutable ones are staged by reference, anything
# else is deep-copied at staging time.
_IMMUTABLE = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device)


def _devices_in(tree: Any) -> set[torch.device]:
    """The devices of a state dict's tensors (of the local shards for DTensor /
    ShardedTensor), for a layout's first staging, before its walk has run."""
    return {t.device for t in flatten(tree, type_check=False).locals}


def _snapshot(value: Any) -> Any:
    if isinstance(value, _IMMUTABLE):
        return value
    if isinstance(value, io.BytesIO):
        return io.BytesIO(value.getvalue())
    return copy.deepcopy(value)


# The DTensors a stager made (id -> weak reference; an entry leaves with its DTensor).
# Their local tensors are views of one slab, which PyTorch 2.13's own DTensor pickling
# cannot send to another process: DCP's PROCESS upload pickles the staged state dict, and
# the second DTensor on an already shared storage crashes in ``_share_fd_cpu_``.
_STAGED_DTENSORS: dict[int, weakref.ref] = {}


def _mark_staged(dtensor: DTensor) -> DTensor:
    key = id(dtensor)
    _STAGED_DTENSORS[key] = weakref.ref(dtensor, lambda _: _STAGED_DTENSORS.pop(key, None))
    return dtensor


def _rebuild_staged_dtensor(local: torch.Tensor, spec: Any) -> DTensor:
    """The receiving side of :func:`_reduce_dtensor`: the local shard, re-wrapped."""
    return DTensor(local, spec, requires_grad=False)


def _reduce_dtensor(dtensor: DTensor) -> tuple[Any, ...]:
    """How ``multiprocessing`` pickles a DTensor: a staged one as its local shard and spec.

    The local shard goes through :func:`_reduce_tensor`, which sends a shared slab's
    storage once per pickle however many tensors on it follow (the pickler's memo),
    with each tensor's place in it: a slab's thousands of tensors cost one shared
    segment and one file descriptor, and the receiver maps the slab instead of copying
    it. Every other DTensor pickles as PyTorch pickles it.
    """
    ref = _STAGED_DTENSORS.get(id(dtensor))
    if ref is not None and ref() is dtensor:
        return _rebuild_staged_dtensor, (dtensor._local_tensor, dtensor._spec)
    return dtensor.__reduce_ex__(pickle.DEFAULT_PROTOCOL)


# Only multiprocessing's pickler (connections and queues: DCP's PROCESS upload) is
# changed; pickle.dumps, torch.save and copy.deepcopy keep PyTorch's DTensor reduction.
ForkingPickler.register(DTensor, _reduce_dtensor)


# Host slabs that stagers carved, by start address: what the tensor reduction below
# looks up (a staged tensor's storage is a slice of its slab, see _own_storage).
_slabs = RangeTable()


@dataclass(eq=False)
class _Slab:
    """A registered slab: its byte range, a weak reference to it, and how it is held.

    ``pinned`` and ``not shared`` together mean that sending a staged tensor to another
    process would have to move it into shared memory out of pinned memory, which the
    copies into it rely on (see :func:`_reduce_tensor`).
    """

    start: int
    end: int
    storage: weakref.ref
    pinned: bool
    shared: bool


def _register_slab(storage: torch.UntypedStorage, pinned: bool, shared: bool) -> _Slab:
    """Records ``storage`` as a slab, with how it is held, until it dies.

    The flags are the stager's; a test can register any CPU storage with the flags it
    needs (a pinned slab without a GPU).
    """
    start = storage.data_ptr()
    slab = _Slab(start, start + storage.nbytes(), weakref.ref(storage), pinned, shared)
    _slabs.add(start, slab)
    weakref.finalize(storage, _slabs.discard, start, slab)
    return slab


def _own_storage(view: torch.Tensor) -> torch.Tensor:
    """``view`` (a contiguous slab view) on a storage of its own: a slice of the slab's.

    A slice keeps the slab alive and adds no copy, and gives each staged tensor the
    ``untyped_storage()`` that DefaultStager's per-storage copies give it: consumers
    that tell tensors apart by storage (transformers' shared-tensor detection, DCP's
    "clone unless the storage is exactly the tensor" before writing) then treat the
    staged state dict as they treat PyTorch's.
    """
    lo = view.storage_offset() * view.element_size()
    piece = view.untyped_storage()[lo : lo + view.numel() * view.element_size()]
    return torch.empty(0, dtype=view.dtype).set_(piece, 0, view.shape, view.stride())


def _rebuild_slab_tensor(
    slab: torch.UntypedStorage, lo: int, nbytes: int, dtype: torch.dtype, offset: int,
    size: torch.Size, stride: tuple[int, ...],
) -> torch.Tensor:
    """The receiving side of :func:`_reduce_tensor`: the tensor on its slice of the slab."""
    return torch.empty(0, dtype=dtype).set_(slab[lo : lo + nbytes], offset, size, stride)


def _reduce_tensor(tensor: torch.Tensor) -> tuple[Any, ...]:
    """How ``multiprocessing`` pickles a tensor: a staged one by reference to its slab.

    A staged tensor's storage is a slice of its slab, which PyTorch's reduction would
    move into shared memory on its own (a copy and a file descriptor per tensor). In a
    shared slab, the slab storage goes instead (once per pickle, however many tensors
    follow: the pickler's memo), with each tensor's place in it. In a pinned slab that
    is not shared, the move would take the tensor out of pinned memory, under copies
    that write it as pinned: refused, before anything moves. Every other tensor (an
    unpinned, unshared slab's included, moved as PyTorch moves any tensor) goes
    through PyTorch's reduction.
    """
    if _slabs and tensor.layout == torch.strided and tensor.device.type == "cpu":
        storage = tensor.untyped_storage()
        slab = _slabs.at(storage.data_ptr())
        if slab is not None and (slab.shared or slab.pinned):
            if not slab.shared:
                raise RuntimeError(
                    "PinnedStager(pin_memory=True, share_memory=False): a staged tensor "
                    "cannot be sent to another process (DCP's "
                    "AsyncCheckpointerType.PROCESS upload): that would move it out of "
                    "the pinned slab into shared memory. Construct the stager with "
                    "share_memory=True for process-based uploads"
                )
            whole = slab.storage()
            if whole is not None:
                lo = storage.data_ptr() - slab.start
                return _rebuild_slab_tensor, (
                    whole, lo, storage.nbytes(), tensor.dtype, tensor.storage_offset(),
                    tensor.size(), tensor.stride(),
                )
    return _torch_reduce_tensor(tensor)


# After torch.multiprocessing's own registration (made when torch is imported), which
# this one delegates to for every tensor no stager made.
ForkingPickler.register(torch.Tensor, _reduce_tensor)


@dataclass
class StagingStats:
    """Counters and timings of a :class:`PinnedStager`, for logs and benchmarks.

    Attributes:
        stages: stagings completed successfully.
        allocations: host slabs allocated (the first staging, then one per layout change).
        staged_bytes: tensor bytes copied by the last staging.
        last_blocking_s: seconds the caller spent inside the last ``stage`` call: what
            ``async_save`` costs the trainer beyond its own planning.
        last_staging_s: seconds from entering the last ``stage`` call to its copy being
            complete in host memory.
    """

    stages: int = 0
    allocations: int = 0
    staged_bytes: int = 0
    last_blocking_s: float = 0.0
    last_staging_s: float = 0.0


def _local_path(flat: Flat, m: int) -> str:
    """The key path of local tensor ``m`` of ``flat`` (for errors)."""
    leaf, shard = flat.local_owners()[m]
    path = format_path(flat.paths[leaf])
    return f"{path} (local shard {shard})" if shard >= 0 else path


def _check_picklable(flat: Flat, snapshots: list[Any]) -> None:
    """Raises, naming the key path, if a plain value cannot go to another process.

    A process-based upload pickles the staged state dict in DCP's upload thread, where
    a failure surfaces late, on the failing rank only, with no key path, while the other
    ranks' checkpoint processes wait in the save's collectives. Checked at staging, it
    fails the staging (on every rank, with ``all_ranks``) before anything is copied or
    sent. Immutable values and BytesIO always pickle; other values are rare (snapshots
    of custom objects), so trying them costs nothing in the usual state dict. The plain
    pickler tries them: multiprocessing's would share any tensor inside and leave its
    descriptor waiting for a receiver that never comes.
    """
    for i, value in enumerate(snapshots):
        if isinstance(value, _IMMUTABLE) or type(value) is io.BytesIO:
            continue
        try:
            pickle.dumps(value)
        except Exception as exc:
            path = format_path(flat.paths[flat.plain_indices[i]])
            raise TypeError(
                f"PinnedStager(share_memory=True): cannot stage {path!r} for a process-based "
                f"upload: its {type(value).__name__} value cannot be pickled "
                f"({type(exc).__name__}: {exc}); make it picklable, or leave it out of the "
                "state dict"
            ) from exc


@dataclass
class _Bucket:
    dsts: list[torch.Tensor]
    indices: list[int]


@dataclass
class _CopyGroup:
    """Copies from one source device with one blocking mode, cut into buckets."""

    device: torch.device
    non_blocking: bool
    buckets: list[_Bucket]


@dataclass
class _ViewGroup:
    """Distinct source tensors that are views of one storage (as in FSDP's state dicts):
    staged as views of one staged storage, as DefaultStager stages them, and copied as
    the one byte range ``[lo, lo + span)`` of the source storage that they cover."""

    members: tuple[int, ...]  # indices into the flat view's locals
    leaves: tuple[int, ...]  # the members' leaf indices
    geometry: tuple[tuple[int, tuple[int, ...]], ...]  # (storage_offset, stride) each
    lo: int
    span: int

    def source(self, srcs: list[torch.Tensor]) -> torch.Tensor:
        first = srcs[self.members[0]]
        return torch.empty(0, dtype=torch.uint8, device=first.device).set_(
            first.untyped_storage(), self.lo, (self.span,)
        )


# Unbound C methods mapped over the tensors: no Python frame per tensor (the partition
# is checked on every staging).
_UNTYPED_STORAGE = torch.Tensor.untyped_storage
_STORAGE_PTR = torch.UntypedStorage.data_ptr


def _storage_partition(tensors: list[torch.Tensor]) -> list[int]:
    """For each tensor, the index of the first tensor on the same storage (itself if none):
    which tensors share storage, independent of where the storages are."""
    ptrs = list(map(_STORAGE_PTR, map(_UNTYPED_STORAGE, tensors)))
    if 0 in ptrs:  # no bytes (zero elements): shares nothing
        ptrs = [p or -i - 1 for i, p in enumerate(ptrs)]
    first: dict[int, int] = {}
    return list(map(first.setdefault, ptrs, range(len(ptrs))))


def _view_group(
    members: list[int], leaves: list[int], srcs: list[torch.Tensor]
) -> _ViewGroup | None:
    """The group of ``members`` (views of one storage), or None when one staged storage
    cannot hold them all (an offset between them that is not a whole element)."""
    starts, ends = [], []
    for m in members:
        t = srcs[m]
        start = t.storage_offset() * t.element_size()
        extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        starts.append(start)
        ends.append(start + extent * t.element_size())
    lo = min(starts)
    if any((s - lo) % srcs[m].element_size() for s, m in zip(starts, members)):
        return None
    return _ViewGroup(
        tuple(members),
        tuple(leaves),
        tuple((srcs[m].storage_offset(), srcs[m].stride()) for m in members),
        lo,
        max(ends) - lo,
    )


def _plan_views(flat: Flat, partition: list[int], first: dict[int, int]) -> tuple[_ViewGroup, ...]:
    """The view groups of a flat view: distinct tensor / DTensor leaves on one storage.

    A leaf repeated (one object twice) is an alias, not a group member; ShardedTensor
    shards and zero-element tensors are staged on their own.
    """
    if partition == list(range(len(partition))):  # the usual case: nothing shared
        return ()
    # local index -> leaf index (-1: a ShardedTensor's shard)
    leaf_of = [i if shard < 0 else -1 for i, shard in flat.local_owners()]
    by_root: dict[int, list[int]] = {}
    for m, root in enumerate(partition):
        i = leaf_of[m]
        if i >= 0 and first[id(flat.leaves[i])] == i and flat.locals[m].numel():
            by_root.setdefault(root, []).append(m)
    views = []
    for members in by_root.values():
        if len(members) > 1:
            group = _view_group(members, [leaf_of[m] for m in members], flat.locals)
            if group is not None:
                views.append(group)
    return tuple(views)


@dataclass
class _Layout:
    """Everything cached for one state-dict layout: the slab and the copy plan.

    Keyed on the layout signature of the tree's flat view (:attr:`Flat.signature`);
    ``out_leaves`` holds the staged tensor leaf at each tensor leaf's index of that
    view (None at the plain values, snapshotted per staging).
    """

    sig: Any
    out_leaves: list[Any]
    groups: list[_CopyGroup]
    cuda_devices: frozenset[torch.device]
    nbytes: int
    # (leaf, earlier leaf) pairs that are one tensor object (tied weights): staged once,
    # both places get the staged tensor. The layout holds only while they still are.
    aliases: tuple[tuple[int, int], ...] = ()
    # Which source tensors share a storage (see _storage_partition), and the groups of
    # distinct views among them; the layout holds only while both stay as they were.
    partition: list[int] | None = None
    views: tuple[_ViewGroup, ...] = ()

    def fits(self, flat: Flat) -> bool:
        leaves = flat.leaves
        if flat.signature != self.sig or not all(leaves[i] is leaves[j] for i, j in self.aliases):
            return False
        srcs = flat.locals
        try:
            partition = _storage_partition(srcs)
        except (RuntimeError, NotImplementedError):
            return False  # a tensor without storage: re-planning names it
        return partition == self.partition and all(
            all((srcs[m].storage_offset(), srcs[m].stride()) == g
                for m, g in zip(group.members, group.geometry))
            for group in self.views
        )

    def sources(self, flat: Flat) -> list[torch.Tensor]:
        """What the copy plan reads: the tensors, then each view group's byte range."""
        if not self.views:
            return flat.locals
        return flat.locals + [group.source(flat.locals) for group in self.views]

    def staged(self, flat: Flat, snapshots: list[Any]) -> Any:
        """The staged state dict: ``flat``'s structure around the staged tensors and
        ``snapshots`` (one per plain value)."""
        leaves = self.out_leaves.copy()
        for i, value in zip(flat.plain_indices, snapshots):
            leaves[i] = value
        return flat.rebuild(leaves)


def _job_timeout() -> timedelta:
    """The default group's collective timeout: what ``init_process_group`` was given."""
    group = dist.distributed_c10d._get_default_group()
    for device_type in group._device_types:
        options = getattr(group._get_backend(torch.device(device_type)), "options", None)
        timeout = getattr(options, "_timeout", None)
        if isinstance(timeout, timedelta):
            return timeout
    return dist.default_pg_timeout


def _destroy_group(group: dist.ProcessGroup) -> None:
    # Also a finalizer, maybe run at exit after the default group was destroyed, which
    # destroyed this one with it ("Invalid process group specified").
    if dist.is_initialized():
        try:
            dist.destroy_process_group(group)
        except ValueError:
            pass


class PinnedStager(AsyncStager):
    """An ``AsyncStager`` that stages into one reusable host slab with batched copies.

    Drop-in for ``torch.distributed.checkpoint.staging.DefaultStager``::

        stager = PinnedStager()
        stager.guard_optimizer(optimizer)   # optimizer.step() waits for staging
        ...
        response = dcp.async_save(state_dict, checkpoint_id=path, async_stager=stager)
        ...                                 # forward / backward overlap the copy
        optimizer.step()                    # waits here if the copy is still running
        ...
        response.upload_completion.result() # before the next async_save
        stager.close()

    The first staging of a layout (keys, nesting, shapes, dtypes, devices, DTensor specs,
    ShardedTensor metadata) allocates one host slab with ``create_cpu_state_dict``
    (pinned and/or shared as configured) and plans the copies; every later staging of
    the same layout reuses both, so it allocates nothing and pins nothing. A changed
    layout is detected on the next ``stage``, re-allocated, and the old slab is dropped.

    Copies are ``sdict_ext.ops.batched_copy_`` calls, one per source device (and bucket):
    for CUDA sources, enqueued on a side stream behind an event recorded on the caller's
    current stream; for CPU sources, run in the stager's background thread. With
    ``async_staging`` the whole staging (walking the state dict included) runs in that
    thread and ``stage`` returns a ``Future`` at once; ``async_save`` then returns an
    ``AsyncSaveResponse`` whose ``staging_completion`` resolves when the copy is done.

    Ties and views are staged as ``DefaultStager`` stages them: one tensor object under
    several keys comes back as one staged object; distinct tensors on one storage (FSDP's
    views of a flat parameter) come back as views of one staged storage, copied once as
    the byte range they cover; every other tensor has a storage of its own (a slice of
    the slab: ``untyped_storage()`` tells staged tensors apart as it tells the sources).

    DTensor and ShardedTensor leaves are staged as their local shards inside a DTensor /
    ShardedTensor with the same metadata, so DCP writes a sharded checkpoint.

    See the module docstring for what the trainer may do while a staging is in flight.

    Args:
        pin_memory: pin the slab so CUDA copies run asynchronously at full bandwidth.
            Ignored, with a warning, when CUDA is unavailable (as ``DefaultStager`` does).
        share_memory: put the slab in shared memory, for
            ``AsyncCheckpointerType.PROCESS`` uploads: DCP's checkpoint process then
            maps the slab (one descriptor per upload, whatever the number of tensors)
            instead of receiving a copy, and each staging first checks that its plain
            values can be pickled (an error naming the key path, before anything is
            copied). Without it a PROCESS upload of an unpinned slab still
            works (PyTorch moves each staged tensor into shared memory: a copy and a
            descriptor per tensor, as with DefaultStager); with ``pin_memory`` it
            raises, naming ``share_memory=True``, before anything is moved.
        async_staging: stage in a background thread and return a ``Future``; otherwise
            ``stage`` returns the staged state dict once the copy is complete.
        bucket_bytes: bytes per ``batched_copy_`` call: a source device's tensors are
            cut into ``ceil(total / bucket_bytes)`` runs of nearly equal bytes (the
            package's one bucketing, :func:`sdict_ext.collectives.buckets.buckets`), a
            run exceeding it by at most one tensor; sweep it to measure the
            granularity's effect.
        all_ranks: make a staging that fails on any rank fail on every rank (see the
            module docstring). ``None`` (the default): on when ``torch.distributed`` is
            initialized with more than one rank, which makes the constructor a
            collective over the default group.
        timeout: how long that exchange waits for the other ranks before the staging
            fails. ``None`` (the default): the default group's timeout, as given to
            ``init_process_group``.
    """

    _synchronize_after_execute: bool = False

    def __init__(
        self,
        pin_memory: bool = True,
        share_memory: bool = False,
        async_staging: bool = True,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        all_ranks: bool | None = None,
        timeout: timedelta | None = None,
    ) -> None:
        if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes <= 0:
            raise ValueError(
                f"PinnedStager: bucket_bytes must be a positive int, got {bucket_bytes!r}"
            )
        distributed = dist.is_available() and dist.is_initialized()
        if all_ranks is None:
            all_ranks = distributed and dist.get_world_size() > 1
        elif all_ranks and not distributed:
            raise ValueError(
                "PinnedStager: all_ranks=True needs torch.distributed to be initialized"
            )
        if timeout is not None and (not isinstance(timeout, timedelta) or timeout <= timedelta(0)):
            raise ValueError(f"PinnedStager: timeout must be a positive timedelta, got {timeout!r}")
        # Its own gloo group: the exchange runs in the staging thread, and must neither
        # interleave with the trainer's collectives nor need a device. One per stager
        # (a shared one would let two stagers' exchanges cross), destroyed with it.
        self._failure_group = None
        self._timeout = timeout
        if all_ranks:
            self._timeout = timeout if timeout is not None else _job_timeout()
            self._failure_group = dist.new_group(backend="gloo", timeout=self._timeout)
            self._destroy_group = weakref.finalize(self, _destroy_group, self._failure_group)
        if pin_memory and not torch.cuda.is_available():
            warnings.warn(
                "PinnedStager: ignoring pin_memory=True because CUDA is not available",
                stacklevel=2,
            )
            pin_memory = False
        self._pin_memory = pin_memory
        self._share_memory = share_memory
        self._async_staging = async_staging
        self._bucket_bytes = bucket_bytes
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="PinnedStager")
            if async_staging
            else None
        )
        self._layout: _Layout | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pending: list[Future] = []
        self._hooks: list[RemovableHandle] = []
        self._stats = StagingStats()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def stats(self) -> StagingStats:
        """A copy of the counters and timings (see :class:`StagingStats`)."""
        with self._lock:
            return replace(self._stats)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def stage(self, state_dict: dict[str, Any]) -> Future[dict[str, Any]] | dict[str, Any]:
        """Starts copying ``state_dict`` into the host slab.

        Args:
            state_dict: the state dict to snapshot (dicts, lists and tuples of tensors,
                DTensors, ShardedTensors and plain values).

        Returns:
            With ``async_staging``, a ``Future`` of the staged state dict (its exception
            is the staging's failure); otherwise the staged state dict.

        Raises:
            RuntimeError: the stager is closed.
            TypeError: ``state_dict`` is not a dict.
        """
        start = time.perf_counter()
        self._check_open("stage")
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"PinnedStager.stage: state_dict must be a dict, got {type(state_dict).__name__}"
            )
        events = self._record_events(state_dict)
        device = self._caller_device()
        if self._executor is None:
            staged = self._stage_on(device, state_dict, events, start)
            self._set_blocking(start)
            return staged
        future = self._executor.submit(self._stage_on, device, state_dict, events, start)
        self._pending.append(future)
        self._set_blocking(start)
        return future

    def synchronize_staging(self) -> None:
        """Waits until every staging started so far is complete.

        After it returns, the trainer may modify the staged state (``optimizer.step()``).

        Raises:
            RuntimeError: the stager is closed.
            Exception: the first failure among those stagings, raised here once (it also
                stays in that staging's ``Future``).
        """
        self._check_open("synchronize_staging")
        pending, self._pending = self._pending, []
        failure: BaseException | None = None
        for future in pending:
            exc = future.exception()
            if exc is not None and failure is None:
                failure = exc
        if failure is not None:
            raise failure

    def guard_optimizer(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Makes ``optimizer.step()`` wait for the staging in flight before it runs.

        Installs a step pre-hook that calls :meth:`synchronize_staging`, so a staging
        failure is raised from ``optimizer.step()``. :meth:`close` removes the hook.

        Args:
            optimizer: the optimizer whose steps modify the staged parameters and state.

        Returns:
            The hook's handle; ``handle.remove()`` uninstalls it.
        """
        self._check_open("guard_optimizer")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "PinnedStager.guard_optimizer: expected a torch.optim.Optimizer, "
                f"got {type(optimizer).__name__}"
            )
        # A weak reference, so an optimizer that outlives the stager does not keep its
        # slab alive.
        stager_ref = weakref.ref(self)

        def wait_for_staging(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            stager = stager_ref()
            if stager is not None and not stager.closed:
                stager.synchronize_staging()

        handle = optimizer.register_step_pre_hook(wait_for_staging)
        self._hooks.append(handle)
        return handle

    def close(self) -> None:
        """Waits for stagings in flight, then frees the slab and stops the thread.

        Failures of those stagings stay in their futures (``close`` does not raise them).
        The slab is unpinned (``cudaHostUnregister``) and freed as soon as no staged
        state dict returned earlier is still referenced (DCP drops its reference when the
        upload completes). Calling ``close`` again does nothing; any other use raises.
        """
        if self._closed:
            return
        self._closed = True
        for future in self._pending:
            future.exception()
        self._pending = []
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._layout = None
        self._streams = {}
        if self._failure_group is not None:
            self._failure_group = None
            self._destroy_group()

    def __enter__(self) -> PinnedStager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"PinnedStager.{what}: the stager is closed")

    def _set_blocking(self, start: float) -> None:
        with self._lock:
            self._stats.last_blocking_s = time.perf_counter() - start

    def _record_events(self, state_dict: Any) -> dict[torch.device, torch.cuda.Event]:
        """Marks "now" on the caller's current stream of every CUDA device in play."""
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return {}
        devices = {torch.device("cuda", torch.cuda.current_device())}
        layout = self._layout
        if layout is not None:
            devices |= layout.cuda_devices
        elif torch.cuda.device_count() > 1:
            # A first staging has no layout yet: find the devices now, so tensors off
            # the current device are also copied as of this call (a later
            # synchronize of their device would let post-stage writes in).
            devices |= {d for d in _devices_in(state_dict) if d.type == "cuda"}
        events = {}
        for device in devices:
            if device not in self._streams:
                # Created on the caller's thread, as DefaultStager does, so the side
                # stream is never confused with the trainer's stream.
                self._streams[device] = torch.cuda.Stream(device)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events[device] = event
        return events

    @staticmethod
    def _caller_device() -> int | None:
        """The calling thread's CUDA device (None while CUDA is not initialized)."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.current_device()
        return None

    # The worker thread starts on device 0: the first staging's cudaHostRegister, and the
    # slab's finalizer with it, would create a context there whatever the rank's device.
    # A class attribute, so a test can watch which device the staging runs under.
    _device_guard = staticmethod(device_guard)

    def _stage_on(
        self,
        device: int | None,
        state_dict: dict[str, Any],
        events: dict[torch.device, torch.cuda.Event],
        start: float,
    ) -> dict[str, Any]:
        """Stages under the caller's CUDA device (see ``_device_guard``)."""
        with self._device_guard(device):
            return self._stage_everywhere(state_dict, events, start)

    @torch.no_grad()
    def _stage_everywhere(
        self,
        state_dict: dict[str, Any],
        events: dict[torch.device, torch.cuda.Event],
        start: float,
    ) -> dict[str, Any]:
        """Stages here, then (under ``all_ranks``) learns whether every rank succeeded."""
        group = self._failure_group
        if group is None:
            return self._stage(state_dict, events, start)
        try:
            staged, error = self._stage(state_dict, events, start), None
        except Exception as exc:
            staged, error = None, exc
        agree(
            group, error, what="PinnedStager",
            blame=lambda failures: RuntimeError(
                f"PinnedStager.stage: staging failed on rank(s) "
                f"{[dist.get_global_rank(group, r) for r in sorted(failures)]} (this rank's "
                "copy succeeded); failing here too, so that no rank writes a checkpoint the "
                "others will not"
            ),
            lost=lambda _: RuntimeError(
                "PinnedStager.stage: the other ranks did not report their staging within "
                f"the stager's timeout ({self._timeout}): every rank must stage (call "
                "async_save) with its stager, and a rank may have died"
            ),
        )
        return staged

    def _stage(
        self,
        state_dict: dict[str, Any],
        events: dict[torch.device, torch.cuda.Event],
        start: float,
    ) -> dict[str, Any]:
        flat = flatten(state_dict, type_check=False)
        layout = self._layout
        if layout is None or not layout.fits(flat):
            layout = self._build_layout(flat)
        snapshots = [_snapshot(flat.leaves[i]) for i in flat.plain_indices]
        if self._share_memory:
            _check_picklable(flat, snapshots)
        staged = layout.staged(flat, snapshots)
        self._copy(layout, layout.sources(flat), events)
        with self._lock:
            self._stats.stages += 1
            self._stats.staged_bytes = layout.nbytes
            self._stats.last_staging_s = time.perf_counter() - start
        return staged

    def _build_layout(self, flat: Flat) -> _Layout:
        """Validates the sources, allocates the slab and plans the copies for a new layout."""
        srcs = flat.locals
        leaves = flat.leaves
        for i, src in enumerate(srcs):
            if src.device.type not in ("cpu", "cuda") or src.layout != torch.strided:
                raise ValueError(
                    f"PinnedStager: cannot stage {_local_path(flat, i)!r}: a {src.layout} "
                    f"tensor on {src.device}; only strided CPU and CUDA tensors can be staged"
                )
        # Drop the old slab before allocating the new one, so peak host memory stays at
        # one slab (earlier staged state dicts still referenced elsewhere keep theirs).
        self._layout = None
        tensor_leaves = flat.tensor_indices()
        first: dict[int, int] = {}
        aliases = tuple(
            (i, j) for i in tensor_leaves if (j := first.setdefault(id(leaves[i]), i)) != i
        )
        partition = _storage_partition(srcs)
        views = _plan_views(flat, partition, first)
        grouped = {i for group in views for i in group.leaves}
        # Only the tensor leaves go to the allocator, flat and in visiting order, each
        # object once: plain values need no slab (and would be deep-copied). DTensors go
        # as their local tensors, re-wrapped below with the source's spec, so a 0-dim
        # DTensor gets slab memory too instead of coming back as the source itself.
        # A view group goes as its byte range, whose views are made below.
        spans = {f"g{k}": torch.zeros((), dtype=torch.uint8).expand(group.span)
                 for k, group in enumerate(views)}
        template = create_cpu_state_dict(
            {
                **{
                    str(i): leaves[i]._local_tensor if flat.kinds[i] == LEAF_DTENSOR else leaves[i]
                    for i in tensor_leaves
                    if first[id(leaves[i])] == i and i not in grouped
                },
                **spans,
            },
            pin_memory=self._pin_memory,
            share_memory=self._share_memory,
        )
        carved_spans = [template.pop(key) for key in spans]
        self._register_slab([template, carved_spans])
        # The copies write each range through its own storage, as the tensors of a view
        # group see it: should PyTorch move that storage into shared memory (pickling
        # an unshared slab for a process), the copies follow it there.
        span_dsts = list(map(_own_storage, carved_spans))
        out_leaves: list[Any] = [None] * len(leaves)
        for group, span in zip(views, span_dsts):
            storage = span.untyped_storage()
            for m, i, (offset, stride) in zip(group.members, group.leaves, group.geometry):
                src = srcs[m]
                start = (offset * src.element_size() - group.lo) // src.element_size()
                staged = torch.empty(0, dtype=src.dtype).set_(storage, start, src.shape, stride)
                out_leaves[i] = self._wrap(leaves[i], staged, carved=False)
        for key, staged in template.items():
            i = int(key)
            out_leaves[i] = self._wrap(leaves[i], staged)
        for i, j in aliases:
            out_leaves[i] = out_leaves[j]
        dsts = flatten(out_leaves, type_check=False).locals
        if len(dsts) != len(srcs):
            raise RuntimeError(
                f"PinnedStager: create_cpu_state_dict returned {len(dsts)} tensors for "
                f"{len(srcs)} source tensors"
            )
        groups: dict[tuple[torch.device, bool], list[int]] = {}
        nbytes = 0
        # Group members are copied as their group's byte range (the entries after the
        # tensors), each once.
        copied: set[int] = {id(dsts[m]) for group in views for m in group.members}
        for i, (dst, src) in enumerate(zip(dsts + span_dsts, srcs + [
            group.source(srcs) for group in views
        ])):
            if dst.shape != src.shape or dst.dtype != src.dtype or dst.device.type != "cpu":
                where = _local_path(flat, i) if i < len(srcs) else f"view group {i - len(srcs)}"
                raise RuntimeError(
                    f"PinnedStager: create_cpu_state_dict returned a {dst.dtype} "
                    f"{tuple(dst.shape)} tensor on {dst.device} for {where!r}, a "
                    f"{src.dtype} {tuple(src.shape)} tensor"
                )
            if src.numel() == 0 or id(dst) in copied:
                continue
            copied.add(id(dst))
            # Pageable destinations make a "non-blocking" device copy synchronous anyway;
            # they are copied in blocking mode, still off the trainer's thread.
            non_blocking = src.device.type == "cuda" and dst.is_pinned()
            groups.setdefault((src.device, non_blocking), []).append(i)
            nbytes += src.numel() * src.element_size()
        # Each group's copies cut by the package's one bucketing.
        targets = dsts + span_dsts
        plan = []
        for (device, non_blocking), indices in groups.items():
            costs = [targets[i].numel() * targets[i].element_size() for i in indices]
            runs = [[indices[k] for k in run] for run in buckets(costs, self._bucket_bytes)]
            plan.append(_CopyGroup(
                device, non_blocking, [_Bucket([targets[i] for i in run], run) for run in runs]
            ))
        layout = _Layout(
            sig=flat.signature,
            out_leaves=out_leaves,
            groups=plan,
            cuda_devices=frozenset(d for d, _ in groups if d.type == "cuda"),
            nbytes=nbytes,
            aliases=aliases,
            partition=partition,
            views=views,
        )
        self._layout = layout
        with self._lock:
            self._stats.allocations += 1
        return layout

    def _register_slab(self, carved: Any) -> None:
        """Registers the slab that ``carved`` (create_cpu_state_dict's tensors) lie in."""
        for tensor in flatten(carved, type_check=False).locals:
            if tensor.numel():
                _register_slab(tensor.untyped_storage(), self._pin_memory, self._share_memory)
                return

    @staticmethod
    def _wrap(leaf: Any, staged: Any, carved: bool = True) -> Any:
        """The staged leaf for source ``leaf`` from its tensor (or ShardedTensor); a
        ``carved`` one (a plain slab view) is first put on a storage of its own."""
        kind = leaf_kind(leaf)
        if kind == LEAF_SHARDED:
            for shard in staged.local_shards():
                if shard.tensor.numel():
                    shard.tensor = _own_storage(shard.tensor)
            return staged
        if carved and staged.numel():
            staged = _own_storage(staged)
        if kind == LEAF_DTENSOR:
            return _mark_staged(DTensor(staged, leaf._spec, requires_grad=False))
        return staged

    def _copy(
        self,
        layout: _Layout,
        srcs: list[torch.Tensor],
        events: dict[torch.device, torch.cuda.Event],
    ) -> None:
        """Runs the layout's copy plan; returns once every byte is in host memory."""
        used_streams: list[torch.cuda.Stream] = []
        try:
            for group in layout.groups:
                if group.device.type != "cuda":
                    for bucket in group.buckets:
                        ops.batched_copy_(bucket.dsts, [srcs[i] for i in bucket.indices])
                    continue
                stream = self._side_stream(group.device, events)
                used_streams.append(stream)
                with torch.cuda.stream(stream):
                    for bucket in group.buckets:
                        ops.batched_copy_(
                            bucket.dsts,
                            [srcs[i] for i in bucket.indices],
                            non_blocking=group.non_blocking,
                        )
        finally:
            # Also after a failure between buckets: the copies already enqueued write
            # into the slab, which must not be reused or freed under them.
            for stream in used_streams:
                stream.synchronize()

    def _side_stream(
        self, device: torch.device, events: dict[torch.device, torch.cuda.Event]
    ) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        event = events.get(device)
        if event is None:
            # No event was recorded for this device (a changed layout that brought
            # tensors onto another device): wait for everything queued on it instead.
            torch.cuda.synchronize(device)
        else:
            stream.wait_event(event)
        return stream

