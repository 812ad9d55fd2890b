"""Distributed-checkpoint helpers: ``DistWrapper``, ``MetadataIndex`` lookups, file views.

Counterpart of ``torch.distributed.checkpoint.utils`` (``_DistWrapper``,
``find_tensor_shard``, ``find_state_dict_object``, ``_create_file_view``) with the same
signatures and results, minus the traps:

* ``DistWrapper``: every rank always enters the same collectives, whatever fails. In
  PyTorch a value or exception that cannot be pickled, an exception that cannot be
  unpickled, or a ``reduce_fun`` result of the wrong length makes one rank raise
  between two collectives while the others wait in the second one until the process
  group times out (30 minutes by default with gloo, 10 with NCCL) and then fail with an
  unrelated timeout error. Here each of those is shipped to every rank as a
  ``CheckpointException`` naming the rank it came from.
* ``find_tensor_shard`` checks a DTensor's offset (PyTorch returns the local shard
  whatever offset is asked for) and its errors list what is there.
* ``create_file_view`` keeps its own position and never reads outside its byte range
  (PyTorch's view inverts ``SEEK_END``, returns the underlying stream's position from
  ``seek`` and, once positioned past the end of the range, reads the rest of the file).
"""

from __future__ import annotations

import difflib
import io
import operator
import os
import pickle
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed._shard.sharded_tensor.shard import Shard
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import STATE_DICT_TYPE, MetadataIndex
from torch.distributed.tensor import DTensor

__all__ = [
    "DistWrapper",
    "create_file_view",
    "find_state_dict_object",
    "find_tensor_shard",
]

T = TypeVar("T")
R = TypeVar("R")

# What crosses the wire is always the pickled bytes of an "outcome": (_VALUE, value) or
# (_FAILURES, {rank: (exception, StackSummary)}). Pickling into bytes ourselves, before
# the collective, is what lets a rank whose value cannot be pickled still take part in
# the collective (sending its failure instead), and the explicit tag means a user value
# that happens to look like an (exception, traceback) pair is never mistaken for one,
# as PyTorch's structural check would.
_VALUE = 0
_FAILURES = 1
_Wrapped = tuple[BaseException, traceback.StackSummary]
_Outcome = tuple[int, Any]


def _summary(exc: BaseException) -> traceback.StackSummary:
    summary = traceback.extract_tb(exc.__traceback__)
    for frame in summary:
        # Python 3.13 keeps code objects in FrameSummary; they cannot be pickled.
        if hasattr(frame, "_code"):
            object.__setattr__(frame, "_code", None)
    return summary


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:
        return f"<{type(exc).__name__}: str() failed>"


def _wrap(exc: BaseException, cause: BaseException | None = None) -> _Wrapped:
    """Pair ``exc`` with its traceback (``cause``'s if given), ready to send.

    The exception is checked to survive a pickle round trip: one with a custom
    ``__init__`` (say ``MyError(path, code)``) pickles but raises ``TypeError`` when
    unpickled, which in PyTorch kills the coordinator between collectives. Such an
    exception is replaced by a ``RuntimeError`` carrying its type name and message.
    Only failures pay for the check, and exceptions are small.
    """
    summary = _summary(cause if cause is not None else exc)
    try:
        pickle.loads(pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL))
    except BaseException as err:
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
        exc = RuntimeError(
            f"{kind}: {_safe_str(exc)} [the original exception could not be sent to "
            f"other ranks: {type(err).__name__}: {_safe_str(err)}]"
        )
    return exc, summary


def _encode(outcome: _Outcome, rank: int) -> tuple[bytes, _Outcome]:
    """Pickle an outcome; return the bytes and the outcome they actually carry.

    A value that cannot be pickled turns into this rank's failure, so the rank still
    takes part in the collective and every receiver learns why.
    """
    try:
        return pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL), outcome
    except BaseException as err:
        tag, payload = outcome
        what = "failure" if tag == _FAILURES else f"{type(payload).__qualname__} value"
        failure = (
            _FAILURES,
            {
                rank: _wrap(
                    TypeError(
                        f"rank {rank} could not pickle its {what} to send it "
                        f"to other ranks: {_safe_str(err)}"
                    ),
                    err,
                )
            },
        )
        try:
            return pickle.dumps(failure, protocol=pickle.HIGHEST_PROTOCOL), failure
        except BaseException:
            # A traceback summary that itself fails to pickle: send the message alone.
            failure = (_FAILURES, {rank: (failure[1][rank][0], traceback.StackSummary())})
            return pickle.dumps(failure, protocol=pickle.HIGHEST_PROTOCOL), failure


def _decode(data: bytes, src: int, rank: int) -> _Outcome:
    """Unpickle what rank ``src`` sent; a payload that cannot be read is ``src``'s failure."""
    try:
        return pickle.loads(data)
    except BaseException as err:
        return (
            _FAILURES,
            {
                src: _wrap(
                    RuntimeError(
                        f"rank {rank} could not unpickle what rank {src} "
                        f"sent: {type(err).__name__}: {_safe_str(err)}"
                    ),
                    err,
                )
            },
        )


def _merge_failures(outcomes: Sequence[_Outcome]) -> dict[int, _Wrapped]:
    failures: dict[int, _Wrapped] = {}
    for tag, payload in outcomes:
        if tag == _FAILURES:
            failures.update(payload)
    return dict(sorted(failures.items()))


def _result(step: str, outcome: _Outcome) -> Any:
    tag, payload = outcome
    if tag == _FAILURES:
        raise CheckpointException(step, payload)
    return payload


class DistWrapper:
    """Object collectives and exception-safe map/reduce steps over a process group.

    Drop-in for ``torch.distributed.checkpoint.utils._DistWrapper`` (same constructor,
    attributes ``group``, ``use_dist``, ``coordinator_rank``, ``global_coordinator_rank``,
    ``rank``, ``is_coordinator`` and methods). With ``use_dist=False`` it is a single
    process of rank 0 and the collectives become local operations with no pickling.

    Guarantees beyond PyTorch's:

    * Whatever fails (a user function, pickling a value or an exception, unpickling a
      payload, a malformed ``reduce_fun`` result, bad ``scatter_object`` input), every
      rank still enters exactly the collectives the method always performs, so a
      failure never leaves another rank waiting. The failure reaches the ranks that
      depend on it as ``torch.distributed.checkpoint.api.CheckpointException`` whose
      ``failures`` maps each failed group rank to ``(exception, traceback summary)``.
    * Each method issues one collective on the group (two for the map/reduce steps that
      gather then redistribute), so each waits at most the group's timeout (set by
      ``init_process_group(timeout=...)`` / ``new_group(timeout=...)``). A peer that dies
      or never arrives makes the others raise the backend's error (``RuntimeError`` /
      ``DistBackendError``) within that timeout; those are not wrapped, because they are
      not a user function's failure and the ranks cannot agree on them.

    Values cross ranks by pickle, as in PyTorch; a value that pickles but cannot be
    unpickled is reported as its sender's failure on the ranks that tried to read it.

    Args:
        group: the process group, or ``None`` for the default group.
        use_dist: whether to communicate at all; ``False`` for a single process.
        coordinator_rank: the rank, within ``group``, that reduces and broadcasts.

    Raises:
        TypeError: ``coordinator_rank`` is not an integer.
        ValueError: ``coordinator_rank`` is outside ``[0, world size)``; ``use_dist`` is
            set but no process group is initialised; this process is not in ``group``.
    """

    def __init__(
        self, group: dist.ProcessGroup | None, use_dist: bool, coordinator_rank: int
    ) -> None:
        if isinstance(coordinator_rank, bool):
            raise TypeError("coordinator_rank must be an int, got a bool")
        try:
            coordinator_rank = operator.index(coordinator_rank)
        except TypeError:
            raise TypeError(
                f"coordinator_rank must be an int, got {type(coordinator_rank).__name__}"
            ) from None
        self.group = group
        self.use_dist = use_dist
        self.coordinator_rank = coordinator_rank
        if use_dist:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(
                    "DistWrapper(use_dist=True) needs an initialised default process group "
                    "(call torch.distributed.init_process_group first)"
                )
            self.rank = dist.get_rank(group)
            if self.rank < 0:
                raise ValueError(
                    f"global rank {dist.get_rank()} is not a member of the given process "
                    "group; only its members may create a DistWrapper on it"
                )
            self._world_size = dist.get_world_size(group)
        else:
            self.rank = 0
            self._world_size = 1
        if not 0 <= coordinator_rank < self._world_size:
            # PyTorch accepts it (and ignores it without distributed): no rank is then the
            # coordinator, and the first collective that needs one fails with a backend
            # error ("invalid root rank") after earlier steps have already run.
            raise ValueError(
                f"coordinator_rank must be in [0, {self._world_size}) for a group of "
                f"{self._world_size} rank(s), got {coordinator_rank}"
            )
        if use_dist:
            self.global_coordinator_rank = (
                coordinator_rank if group is None else dist.get_global_rank(group, coordinator_rank)
            )
        else:
            self.global_coordinator_rank = 0
        self.is_coordinator = self.rank == coordinator_rank

    def get_rank(self) -> int:
        """This process's rank within the group (0 without distributed)."""
        return self.rank

    def get_world_size(self) -> int:
        """The number of ranks in the group (1 without distributed)."""
        return self._world_size

    # -- transport: every rank calls each of these unconditionally -----------------

    def _gather(self, outcome: _Outcome) -> tuple[list[_Outcome] | None, _Outcome]:
        """Gather outcomes on the coordinator; also return what this rank really sent."""
        if not self.use_dist:
            return [outcome], outcome
        data, sent = _encode(outcome, self.rank)
        out: list[Any] | None = [None] * self._world_size if self.is_coordinator else None
        dist.gather_object(data, out, dst=self.global_coordinator_rank, group=self.group)
        if out is None:
            return None, sent
        return [_decode(d, src, self.rank) for src, d in enumerate(out)], sent

    def _all_gather(self, outcome: _Outcome) -> list[_Outcome]:
        if not self.use_dist:
            return [outcome]
        data, _ = _encode(outcome, self.rank)
        out: list[Any] = [None] * self._world_size
        dist.all_gather_object(out, data, group=self.group)
        # Every rank decodes every payload, its own included (as PyTorch's copies are),
        # so a payload that cannot be read fails identically on all ranks.
        return [_decode(d, src, self.rank) for src, d in enumerate(out)]

    def _broadcast(self, outcome: _Outcome | None) -> _Outcome:
        """Broadcast the coordinator's outcome; the coordinator keeps its own object."""
        if not self.use_dist:
            return outcome  # type: ignore[return-value]  # rank 0 is the coordinator
        data = None
        if self.is_coordinator:
            data, outcome = _encode(outcome, self.rank)  # type: ignore[arg-type]
        box = [data]
        dist.broadcast_object_list(box, src=self.global_coordinator_rank, group=self.group)
        if self.is_coordinator:
            return outcome  # type: ignore[return-value]
        return _decode(box[0], self.coordinator_rank, self.rank)

    def _scatter(self, outcomes: list[_Outcome] | None) -> _Outcome:
        """Scatter one outcome per rank from the coordinator."""
        if not self.use_dist:
            return outcomes[0]  # type: ignore[index]  # rank 0 is the coordinator
        payloads = None
        if outcomes is not None:  # only the coordinator has them
            payloads = []
            for outcome in outcomes:
                data, sent = _encode(outcome, self.rank)
                if sent is not outcome:
                    # One rank's item cannot be sent: every rank gets the failure, so
                    # none goes on to the next step while another stops here.
                    payloads = [data] * self._world_size
                    break
                payloads.append(data)
        box: list[Any] = [None]
        dist.scatter_object_list(box, payloads, src=self.global_coordinator_rank, group=self.group)
        return _decode(box[0], self.coordinator_rank, self.rank)

    def _run(self, fn: Callable[..., Any], *args: Any) -> _Outcome:
        try:
            return _VALUE, fn(*args)
        except BaseException as exc:
            return _FAILURES, {self.rank: _wrap(exc)}

    def _fail(self, exc: BaseException) -> _Outcome:
        return _FAILURES, {self.rank: _wrap(exc)}

    # -- plain object collectives ---------------------------------------------------

    def broadcast_object(self, object: T | None) -> T:
        """Return the coordinator's ``object`` on every rank (``broadcast_object_list``).

        The coordinator gets its own object back (not a copy), as in PyTorch.

        Raises:
            CheckpointException: on every rank, if the coordinator's object cannot be
                pickled (PyTorch raises on the coordinator only; the rest wait out the timeout).
        """
        outcome = (_VALUE, object) if self.is_coordinator else None
        return _result("broadcast_object", self._broadcast(outcome))

    def gather_object(self, object: T) -> list[T] | None:
        """Return every rank's ``object`` (in rank order) on the coordinator, ``None`` elsewhere.

        Raises:
            CheckpointException: on the coordinator if any rank's object could not be
                sent, and on each rank whose own object could not be.
        """
        gathered, sent = self._gather((_VALUE, object))
        if gathered is None:
            _result("gather_object", sent)
            return None
        failures = _merge_failures(gathered)
        if failures:
            raise CheckpointException("gather_object", failures)
        return [payload for _, payload in gathered]

    def all_gather_object(self, object: T) -> list[T]:
        """Return every rank's ``object`` (in rank order) on every rank.

        Raises:
            CheckpointException: on every rank if any rank's object could not be sent.
        """
        gathered = self._all_gather((_VALUE, object))
        failures = _merge_failures(gathered)
        if failures:
            raise CheckpointException("all_gather_object", failures)
        return [payload for _, payload in gathered]

    def scatter_object(self, object_list: list[T] | None) -> T:
        """Give rank ``i`` item ``i`` of the coordinator's ``object_list``.

        Only the coordinator's ``object_list`` is read; it must have one item per rank.

        Raises:
            CheckpointException: on every rank, if the coordinator's list is missing, has
                the wrong length, or holds an item that cannot be pickled (PyTorch raises
                on the coordinator alone and leaves the others waiting).
        """
        outcomes = None
        if self.is_coordinator:
            if object_list is None or len(object_list) != self._world_size:
                got = "None" if object_list is None else f"{len(object_list)} items"
                outcomes = [
                    self._fail(
                        ValueError(
                            f"scatter_object needs one item per rank ({self._world_size}) on the "
                            f"coordinator, got {got}"
                        )
                    )
                ] * self._world_size
            else:
                outcomes = [(_VALUE, item) for item in object_list]
        return _result("scatter_object", self._scatter(outcomes))

    # -- map/reduce steps -------------------------------------------------------------

    def reduce_scatter(
        self,
        step: str,
        map_fun: Callable[[], T],
        reduce_fun: Callable[[list[T]], list[R]],
    ) -> R:
        """Map on every rank, reduce on the coordinator, scatter one result per rank.

        ``map_fun()`` runs on every rank; the coordinator calls ``reduce_fun`` with the
        results in rank order and must return a sequence with one item per rank; rank
        ``i`` returns item ``i``.

        Raises:
            CheckpointException: on every rank, named ``step``, if ``map_fun`` failed on
                any rank (all failures are reported), or else ``reduce_fun`` failed or
                returned the wrong number of items (reported as the coordinator's).
        """
        gathered, _ = self._gather(self._run(map_fun))
        per_rank = None
        if gathered is not None:
            try:
                per_rank = self._reduce_for_scatter(gathered, reduce_fun)
            except BaseException as exc:  # a bug here must not strand the other ranks
                per_rank = [self._fail(exc)] * self._world_size
        return _result(step, self._scatter(per_rank))

    def _reduce_for_scatter(
        self, gathered: list[_Outcome], reduce_fun: Callable[[list[Any]], Any]
    ) -> list[_Outcome]:
        failures = _merge_failures(gathered)
        if failures:
            return [(_FAILURES, failures)] * self._world_size
        tag, results = self._run(reduce_fun, [payload for _, payload in gathered])
        if tag == _FAILURES:
            return [(tag, results)] * self._world_size
        if (
            not isinstance(results, Sequence)
            or isinstance(results, (str, bytes))
            or len(results) != self._world_size
        ):
            got = (
                f"{len(results)} items" if isinstance(results, Sequence) else type(results).__name__
            )
            return [
                self._fail(
                    ValueError(
                        f"reduce_fun must return a sequence with one item per rank "
                        f"({self._world_size}), got {got}"
                    )
                )
            ] * self._world_size
        return [(_VALUE, item) for item in results]

    def all_reduce(
        self,
        step: str,
        map_fun: Callable[[], T],
        reduce_fun: Callable[[list[T]], R],
    ) -> R:
        """Map on every rank, reduce on the coordinator, broadcast the result.

        Raises:
            CheckpointException: on every rank, named ``step``, if ``map_fun`` failed on
                any rank, or else ``reduce_fun`` failed or its result cannot be pickled.
        """
        gathered, _ = self._gather(self._run(map_fun))
        outcome = None
        if gathered is not None:
            try:
                failures = _merge_failures(gathered)
                if failures:
                    outcome = (_FAILURES, failures)
                else:
                    outcome = self._run(reduce_fun, [payload for _, payload in gathered])
            except BaseException as exc:  # a bug here must not strand the other ranks
                outcome = self._fail(exc)
        return _result(step, self._broadcast(outcome))

    def all_gather(self, step: str, map_fun: Callable[[], T]) -> list[T]:
        """Map on every rank and return all results, in rank order, on every rank.

        Raises:
            CheckpointException: on every rank, named ``step``, with every rank whose
                ``map_fun`` failed or whose result could not be sent.
        """
        gathered = self._all_gather(self._run(map_fun))
        failures = _merge_failures(gathered)
        if failures:
            raise CheckpointException(step, failures)
        return [payload for _, payload in gathered]

    def broadcast(self, step: str, map_fun: Callable[[], T]) -> T:
        """Run ``map_fun`` on the coordinator only and return its result on every rank.

        Raises:
            CheckpointException: on every rank, named ``step``, if ``map_fun`` failed or
                its result cannot be pickled.
        """
        outcome = self._run(map_fun) if self.is_coordinator else None
        return _result(step, self._broadcast(outcome))

    def barrier(self) -> None:
        """Wait for every rank of the group (no-op without distributed)."""
        if self.use_dist:
            dist.barrier(group=self.group)


# -- MetadataIndex lookups ---------------------------------------------------------------


def _offsets(offsets: Sequence[int]) -> str:
    return str(tuple(offsets))


def _list_offsets(all_offsets: list[Sequence[int]], limit: int = 8) -> str:
    if not all_offsets:
        return "none (this rank holds no shard of it)"
    shown = ", ".join(_offsets(o) for o in all_offsets[:limit])
    more = len(all_offsets) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def _find_local_shard(tensor: ShardedTensor, index: MetadataIndex) -> Shard:
    if index.offset is None:
        raise ValueError(
            f"{index.fqn!r} is a ShardedTensor: looking up one of its shards needs "
            "MetadataIndex.offset"
        )
    shards = tensor.local_shards()
    # The index hint, when right, saves the linear search over many local shards.
    if index.index is not None and 0 <= index.index < len(shards):
        hinted = shards[index.index]
        if torch.Size(hinted.metadata.shard_offsets) == index.offset:
            return hinted
    for shard in shards:
        if torch.Size(shard.metadata.shard_offsets) == index.offset:
            return shard
    raise ValueError(
        f"Could not find shard at offset {_offsets(index.offset)} of ShardedTensor "
        f"{index.fqn!r}; this rank's shards start at "
        f"{_list_offsets([s.metadata.shard_offsets for s in shards])}"
    )


def find_tensor_shard(tensor: torch.Tensor, index: MetadataIndex) -> torch.Tensor:
    """Return the local tensor data that ``index`` names in ``tensor``.

    * ``ShardedTensor``: the local shard starting at ``index.offset`` (``index.index`` is
      tried first as a hint).
    * ``DTensor`` and other checkpointable tensors (``__get_tensor_shard__``): their
      local shard. For a DTensor, ``index.offset`` (when given) must be where one of this
      rank's chunks starts; PyTorch returns the local shard whatever offset is asked.
    * A regular tensor: the tensor itself, for no offset or the all-zero offset.

    Raises:
        ValueError: no local shard starts at ``index.offset``, or a ShardedTensor is
            looked up without an offset, or a regular tensor with a non-zero offset.
    """
    get_shard = getattr(tensor, "__get_tensor_shard__", None)
    if get_shard is not None:
        if (
            isinstance(tensor, DTensor)
            and index.offset is not None
            # A local tensor with its own lookup (LocalShardsWrapper) checks offsets itself.
            and not hasattr(tensor._local_tensor, "__get_tensor_shard__")
        ):
            starts = [chunk.offsets for chunk in tensor.__create_chunk_list__()]
            if all(torch.Size(start) != index.offset for start in starts):
                raise ValueError(
                    f"Could not find shard at offset {_offsets(index.offset)} of DTensor "
                    f"{index.fqn!r}; this rank's shard starts at {_list_offsets(starts)}"
                )
        return get_shard(index)
    if isinstance(tensor, ShardedTensor):
        return _find_local_shard(tensor, index).tensor
    if index.offset is not None and any(index.offset):
        raise ValueError(
            f"{index.fqn!r} is a regular tensor, not a sharded one: the only valid offset "
            f"is {_offsets([0] * tensor.dim())}, got {_offsets(index.offset)}"
        )
    if index.offset is not None and len(index.offset) != tensor.dim():
        raise ValueError(
            f"offset {_offsets(index.offset)} for {index.fqn!r} has {len(index.offset)} "
            f"dimension(s) but the tensor has {tensor.dim()}"
        )
    return tensor


def find_state_dict_object(state_dict: STATE_DICT_TYPE, index: MetadataIndex) -> Any:
    """Return the object ``index`` names in ``state_dict``: a tensor shard or the value.

    Raises:
        ValueError: ``index.fqn`` is not in ``state_dict`` (the message suggests close
            keys), or the offset does not match (see ``find_tensor_shard``), or an
            offset is given for a value that is not a tensor.
    """
    try:
        obj = state_dict[index.fqn]
    except KeyError:
        close = difflib.get_close_matches(
            index.fqn, [k for k in state_dict if isinstance(k, str)], n=3
        )
        hint = f"; close matches: {', '.join(map(repr, close))}" if close else ""
        raise ValueError(
            f"Could not find FQN: {index.fqn!r} in a state dict of {len(state_dict)} entries{hint}"
        ) from None
    if isinstance(obj, torch.Tensor):
        return find_tensor_shard(obj, index)
    if index.offset is not None:
        raise ValueError(
            f"{index.fqn!r} is a {type(obj).__name__}, not a tensor: it cannot be looked "
            f"up by offset {_offsets(index.offset)}"
        )
    return obj


# -- file views --------------------------------------------------------------------------


class _FileView(io.RawIOBase):
    """Read-only window ``[offset, offset + length)`` over a seekable binary stream.

    The view keeps its own position and seeks the stream before each read, so several
    views over one stream (DCP opens a file once and reads many items from it) do not
    disturb one another, and it never reads outside its window. Closing the view leaves
    the stream open: the caller owns it.
    """

    def __init__(self, stream: io.IOBase, offset: int, length: int) -> None:
        super().__init__()
        self._stream = stream
        self._start = offset
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any, /) -> int:
        # RawIOBase would raise a bare NotImplementedError; say what is wrong instead.
        raise io.UnsupportedOperation("a file view is read-only")

    def tell(self) -> int:
        self._checkClosed()  # type: ignore[attr-defined]
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int:
        self._checkClosed()  # type: ignore[attr-defined]
        offset = operator.index(offset)
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._length + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        # Past the end is allowed, as for files; reads there return nothing.
        self._pos = pos
        return pos

    def _available(self, size: int | None) -> int:
        remaining = max(0, self._length - self._pos)
        if size is None or size < 0:
            return remaining
        return min(size, remaining)

    def read(self, size: int | None = -1, /) -> bytes:
        self._checkClosed()  # type: ignore[attr-defined]
        n = self._available(size)
        if n == 0:
            return b""
        self._stream.seek(self._start + self._pos)
        data = self._stream.read(n)
        if data is None:  # a non-blocking stream with nothing ready
            return None  # type: ignore[return-value]
        self._pos += len(data)
        return bytes(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any, /) -> int:
        self._checkClosed()  # type: ignore[attr-defined]
        target = memoryview(buffer).cast("B")
        n = self._available(len(target))
        if n == 0:
            return 0
        self._stream.seek(self._start + self._pos)
        readinto = getattr(self._stream, "readinto", None)
        if readinto is not None:
            got = readinto(target[:n])
            if got is None:
                return None  # type: ignore[return-value]
        else:
            data = self._stream.read(n)
            got = len(data)
            target[:got] = data
        self._pos += got
        return got


def create_file_view(file: io.IOBase, offset: int, length: int) -> io.IOBase:
    """Return a read-only, seekable view of bytes ``[offset, offset + length)`` of ``file``.

    Counterpart of ``torch.distributed.checkpoint.utils._create_file_view``, usable by
    ``torch.load``. Positions are relative to the view: ``seek``/``tell`` report them,
    ``SEEK_END`` counts from the end of the range (a negative offset goes back), and
    reads stop at the end of the range. Seeking before the start raises ``ValueError``.

    Args:
        file: a readable, seekable binary stream; it stays open when the view closes.
        offset: where the range starts in ``file``.
        length: how many bytes the range holds.

    Raises:
        TypeError: ``offset`` or ``length`` is not an integer.
        ValueError: ``offset`` or ``length`` is negative, or ``file`` is closed or not
            seekable.
    """
    offset = operator.index(offset)
    length = operator.index(length)
    if offset < 0 or length < 0:
        raise ValueError(f"offset and length must be >= 0, got offset={offset}, length={length}")
    if getattr(file, "closed", False):
        raise ValueError("cannot create a view of a closed stream")
    seekable = getattr(file, "seekable", None)
    if seekable is None or not seekable():
        raise ValueError("create_file_view needs a seekable stream")
    return _FileView(file, offset, length)
