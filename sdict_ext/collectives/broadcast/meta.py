"""The metadata of ``broadcast_state_dict``: what rank 0 announces before any tensor moves.

Rank 0 describes its full state dict in plain, cheaply pickled objects (keys, shapes as
tuples of ints, dtype indices, tie links; 0-dim tensors as raw bytes) and broadcasts it
asynchronously, so that it plans its own keys while the other ranks receive it. What
only the CPU routes need travels only with them: the needs row's length with the
point-to-point route, the source addresses and the probe with direct reads.
"""

from __future__ import annotations

import pickle
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from sdict_ext import ops
from sdict_ext.collectives.agreement import RankFailure
from sdict_ext.collectives.broadcast.direct import Source
from sdict_ext.host.copies import view_key
from sdict_ext.tree import LEAF_TENSOR, leaf_kind

__all__ = [
    "HEAD_BYTES", "Announced", "TensorInfo", "announce", "broadcast_bytes", "check_source",
    "exchange", "from_wire", "post_metadata_receive", "receive_metadata", "send_metadata",
    "to_wire", "wait_sent",
]

# A tensor rank 0 is about to send, as it travels: (position of its key, shape, index
# of its dtype in the dtype list, same, address), where ``same`` is the index (among
# the announced tensors) of an earlier key whose tensor is this very one (tied weights,
# or a loaded checkpoint's shared storage), or -1: a tensor travels once and fills all
# its keys; ``address`` is where its bytes start in rank 0's memory when a rank on its
# host may read them there (a contiguous CPU tensor, announced for direct reads only),
# else 0. Plain tuples of ints pickle and unpickle in C, far cheaper than objects.
TensorInfo = tuple[int, tuple[int, ...], int, int, int]
Announced = tuple[list[str], dict[int, Any], list[TensorInfo], list[torch.dtype]]


def announce(full_state_dict: dict[str, Any], addresses: bool = False) -> Announced:
    """Rank 0's metadata: the keys, the plain values and 0-dim tensors (by key
    position; they travel as objects), the tensors, and their dtypes; with
    ``addresses`` (direct reads), where each readable tensor lies in this process."""
    keys = list(full_state_dict)
    values = list(full_state_dict.values())
    objects: dict[int, Any] = {}
    tensors: list[TensorInfo] = []
    dtypes: list[torch.dtype] = []
    code_of: dict[torch.dtype, int] = {}
    # Ties: tensors starting at the same address are compared by their whole view.
    by_ptr: dict[int, tuple[int, torch.Tensor] | None] = {}
    by_view: dict[tuple[Any, ...], int] = {}
    for pos, (value, facts) in enumerate(zip(values, _describe(values))):
        if facts is None:
            facts = _facts_of(value, keys[pos])
            if facts is None:
                objects[pos] = value.cpu() if torch.is_tensor(value) else value
                continue
        shape, dtype, ptr, readable = facts
        code = code_of.get(dtype)
        if code is None:
            code = code_of[dtype] = len(dtypes)
            dtypes.append(dtype)
        same, addr = -1, 0
        if 0 not in shape:
            index = len(tensors)
            first = by_ptr.setdefault(ptr, (index, value))
            if first is not None and first[0] != index:
                by_view[view_key(first[1])] = first[0]
                by_ptr[ptr] = None  # from now on, by_view has this address's views
                first = None
            if first is None:
                same = by_view.setdefault(view_key(value), index)
                if same == index:
                    same = -1
            addr = ptr if readable and addresses else 0
        tensors.append((pos, shape, code, same, addr))
    return keys, objects, tensors, dtypes


def check_source(full_state_dict: dict[str, Any]) -> None:
    """Raises what ``broadcast_state_dict`` would raise on rank 0 about its full state
    dict (a value that is no plain tensor or cannot be sent, a value that cannot be
    pickled), for a caller that must check several inputs before loading any of them
    (``set_state_dict``: the model's is loaded after the optimizers')."""
    keys, objects, _, _ = announce(full_state_dict)
    # Tensors pickle (0-dim ones travel so); only other values can fail.
    plain = {pos: v for pos, v in objects.items() if not torch.is_tensor(v)}
    try:
        pickle.dumps(plain, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 (whatever the value's pickling raises)
        raise _unpicklable(exc, keys, plain) from exc


def _unpicklable(exc: BaseException, keys: list[str], objects: dict[int, Any]) -> ValueError:
    """The error for metadata that cannot be pickled, naming the first value that cannot."""
    for pos, value in objects.items():
        try:
            pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as value_exc:  # noqa: BLE001
            return ValueError(
                f"broadcast_state_dict: full_state_dict[{keys[pos]!r}] (a "
                f"{type(value).__name__}) cannot be pickled to reach the other ranks: "
                f"{type(value_exc).__name__}: {value_exc}"
            )
    return ValueError(
        f"broadcast_state_dict: the full state dict's non-tensor values must be "
        f"picklable to reach the other ranks: {type(exc).__name__}: {exc}"
    )


def _describe(values: list[Any]) -> list[Any]:
    """(shape, dtype, address, readable in place) of each plain CPU / CUDA tensor of at
    least one dim, in one C++ call; None for the others (and for all of them without
    the extension)."""
    made = ops.extension_entry("describe_tensors")
    return made(values) if made is not None else [None] * len(values)


def _facts_of(value: Any, key: str) -> tuple[Any, ...] | None:
    """:func:`_describe`'s facts of one value it left out, in Python; None for what
    travels as an object (a non-tensor, a 0-dim tensor). Raises for a tensor that is
    no plain tensor (a DTensor, a ShardedTensor) or that cannot be sent (see
    :func:`_unsendable`): found here, the error reaches every rank with the metadata,
    before any rank receives a byte (found while sending, it would leave the others
    waiting in a receive, half written)."""
    if not torch.is_tensor(value):
        return None
    if type(value) is not torch.Tensor and leaf_kind(value) != LEAF_TENSOR:
        raise ValueError(
            f"broadcast_state_dict: full_state_dict[{key!r}] is a "
            f"{type(value).__name__}; the full state dict must hold plain tensors"
        )
    problem = _unsendable(value)
    if problem is not None:
        raise ValueError(
            f"broadcast_state_dict: full_state_dict[{key!r}] is {problem}; the full state "
            "dict must hold dense tensors with data (materialise or convert it first)"
        )
    if value.dim() == 0:
        return None
    shape = tuple(value.shape)
    readable = (
        value.is_cpu and value.is_contiguous() and not value.is_conj() and not value.is_neg()
    )
    return shape, value.dtype, value.data_ptr(), readable


def _unsendable(value: torch.Tensor) -> str | None:
    """What makes a source tensor impossible to pack and send, or None: no data (meta),
    no strided bytes (sparse, mkldnn, nested) or no dtype a receiver can allocate
    (quantized). A 0-dim tensor travels pickled, so only its data matters."""
    if value.is_meta:
        return "a meta tensor (it has no data)"
    if value.dim() == 0:
        return None
    if value.is_nested:
        return "a nested tensor"
    if value.layout != torch.strided:
        return f"a {value.layout} tensor"
    if value.is_quantized:
        return f"a quantized tensor ({value.dtype})"
    return None


class _Scalar(NamedTuple):
    """A 0-dim tensor on the wire: element ``index`` of the raw ``dtype`` array."""

    dtype: torch.dtype
    index: int


# Dtypes whose 0-dim tensors round-trip through raw bytes (sub-byte and quantized
# dtypes have no element copy to rebuild them with).
_RAW_DTYPES = frozenset(
    {
        torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
        torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.bfloat16,
        torch.float32, torch.float64, torch.complex64, torch.complex128,
    }
)


def _is_raw_scalar(value: Any) -> bool:
    # Only what its raw bytes fully describe; anything else (a Parameter, a tensor
    # that requires grad, a conjugate / negative view, an exotic dtype) is pickled
    # with the rest of the metadata, as PyTorch sends every 0-dim tensor.
    return (
        type(value) is torch.Tensor
        and value.dim() == 0
        and value.dtype in _RAW_DTYPES
        and value.layout == torch.strided
        and not value.requires_grad
        and not value.is_conj()
        and not value.is_neg()
    )


def to_wire(
    keys: list[str],
    objects: dict[int, Any],
    tensors: list[TensorInfo],
    dtypes: list[torch.dtype],
    source: Source | None,
    row_len: int | None,
) -> tuple[Any, ...]:
    """The metadata as cheaply pickled objects: plain 0-dim tensors become raw bytes,
    one byte string per dtype (pickling a tensor, as ``broadcast_object_list`` does for
    every optimizer ``step``, goes through torch's storage serialisation, far slower
    per tensor on each side). ``source`` lets ranks on this host read the tensors
    directly (:func:`.direct.source_probe`); ``row_len`` is the needs row's length of
    the point-to-point route (None on the collective route)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    wire_objects: dict[int, Any] = {}
    for pos, value in objects.items():
        if _is_raw_scalar(value):
            same = by_dtype.setdefault(value.dtype, [])
            wire_objects[pos] = _Scalar(value.dtype, len(same))
            same.append(value)
        else:
            wire_objects[pos] = value
    blobs = {
        dtype: torch.stack(values).view(torch.uint8).numpy().tobytes()
        for dtype, values in by_dtype.items()
    }
    # Last: the needs row's length, which every rank must know even if decoding fails.
    return keys, wire_objects, blobs, tensors, dtypes, source, row_len


def from_wire(wire: tuple[Any, ...]) -> Announced:
    keys, wire_objects, blobs, tensors, dtypes, _, _ = wire
    arrays = {
        dtype: torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(dtype)
        for dtype, blob in blobs.items()
    }
    # clone(): each tensor owns its storage, as an unpickled one does.
    objects = {
        pos: arrays[v.dtype][v.index].clone() if isinstance(v, _Scalar) else v
        for pos, v in wire_objects.items()
    }
    return keys, objects, tensors, dtypes


#: The metadata's first broadcast: its length and up to this many bytes less 8 (a
#: state dict of some thousands of tensors); the rest, if any, follows in a second one. A size
#: known in advance lets the other ranks post their receive before they pre-plan.
HEAD_BYTES = 256 << 10


def broadcast_bytes(part: torch.Tensor, group: dist.ProcessGroup, async_op: bool) -> Any:
    """Every broadcast of the metadata's bytes goes through here, from the group's rank
    0: one place that says which broadcasts carry metadata rather than tensor data
    (the tests wrap it to count only the tensors' collectives)."""
    return dist.broadcast(part, group=group, group_src=0, async_op=async_op)


def send_metadata(
    wire: Any, error: BaseException | None, group: dist.ProcessGroup, device: torch.device
) -> tuple[tuple[list[Any], list[torch.Tensor]], BaseException | None]:
    """Rank 0: broadcasts ``(wire, error text or None)`` pickled, asynchronously, so
    that rank 0 plans its own keys while the others take it; ``broadcast_object_list``
    would wait for every rank. A value that cannot be pickled becomes the error sent
    instead, so the other ranks raise too. Returns what to wait for (and keep alive)
    before the next exchange, and the error (``error``, or the pickling one)."""
    try:
        data = pickle.dumps(
            (wire, None if error is None else f"{type(error).__name__}: {error}"),
            protocol=pickle.HIGHEST_PROTOCOL,
        )
    except Exception as exc:  # noqa: BLE001 (an unpicklable value of the state dict)
        if error is None:
            error = _unpicklable(exc, wire[0], wire[1])
        data = pickle.dumps((None, f"{type(error).__name__}: {error}"))
    fits = HEAD_BYTES - 8
    head = bytearray(HEAD_BYTES)
    head[:8] = len(data).to_bytes(8, "little")
    head[8:8 + min(len(data), fits)] = data[:fits]
    parts = [torch.frombuffer(head, dtype=torch.uint8).to(device)]
    if len(data) > fits:
        parts.append(torch.frombuffer(bytearray(data[fits:]), dtype=torch.uint8).to(device))
    works = [broadcast_bytes(part, group, async_op=True) for part in parts]
    return (works, parts), error


def wait_sent(in_flight: tuple[list[Any], list[torch.Tensor]]) -> None:
    """Waits for :func:`send_metadata`'s broadcasts (its buffers live until then)."""
    for work in in_flight[0]:
        work.wait()


def post_metadata_receive(group: dist.ProcessGroup, device: torch.device) -> Any:
    """The other ranks: the receive of the metadata's first part, posted at once so
    that it lands while this rank pre-plans; :func:`receive_metadata` finishes it."""
    head = torch.empty(HEAD_BYTES, dtype=torch.uint8, device=device)
    return broadcast_bytes(head, group, async_op=True), head


def receive_metadata(posted: Any, group: dist.ProcessGroup, device: torch.device) -> Any:
    """The other ranks' side of :func:`send_metadata`."""
    work, head = posted
    work.wait()
    raw = head.cpu().numpy().tobytes()
    size = int.from_bytes(raw[:8], "little")
    data = raw[8:8 + size]
    if size > len(data):
        rest = torch.empty(size - len(data), dtype=torch.uint8, device=device)
        broadcast_bytes(rest, group, async_op=False)
        data += rest.cpu().numpy().tobytes()
    return pickle.loads(data)


def exchange(
    group: dist.ProcessGroup,
    device: torch.device,
    is_src: bool,
    wire: Any,
    error: BaseException | None,
    meanwhile: Any,
) -> tuple[Any, Any, Any]:
    """Rank 0 sends its metadata (``wire``, or its ``error``); the other ranks post the
    receive, run ``meanwhile()`` while it lands, and take it. Every rank raises if rank
    0 failed (rank 0 its own error, the others :class:`RankFailure` with its text).

    Returns:
        ``(wire, in_flight, early)``: the metadata; on rank 0 what to pass to
        :func:`wait_sent` once it has planned its own keys (None elsewhere); on the
        other ranks ``meanwhile()``'s result (None on rank 0).
    """
    if is_src:
        in_flight, error = send_metadata(wire, error, group, device)
        if error is not None:
            wait_sent(in_flight)
            raise error
        return wire, in_flight, None
    posted = post_metadata_receive(group, device)
    early = meanwhile()
    wire, src_error = receive_metadata(posted, group, device)
    if src_error is not None:
        raise RankFailure(
            f"broadcast_state_dict failed on the source rank: {src_error}", {0: src_error}
        )
    return wire, None, early
