"""The direct-read route of ``broadcast_state_dict``: a rank on rank 0's host reads its
boxes straight out of rank 0's memory (Linux ``process_vm_readv``).

It rides on the point-to-point route (:mod:`.p2p`): the needs table is the same, and
a transfer a rank reads itself is marked by negative bytes in its row, so rank 0 sends
it no message. Chosen with ``route="direct"``, or under ``route="auto"`` on a CPU group
when ``SDICT_EXT_DIRECT_READ=1`` is set at the call (on rank 0 it announces its
tensors; on another rank it reads them).

Rank 0 announces its pid, the address of each contiguous source tensor, a 16-byte
random probe, and two sampled 8-byte windows of each of those tensors, taken from the
tensor itself at a position drawn per call. A rank that reads the probe back (same
host, same pid namespace, ptrace access) reads the sample windows at the announced
addresses; only the transfers whose windows match (the address is rank 0's tensor,
mapped, with those bytes) are marked as read by the rank itself; any other transfer
falls back to a message, and so does every transfer where the read is unavailable
(not Linux, no extension, another host, no permission: the probe fails). After the
agreement the rank reads each of its boxes straight into its own shards, every read
inside a tensor rank 0 announced for this call, many runs of bytes per system call.
That is one copy per byte, made by the receiver while rank 0 copies its own boxes,
where a message costs four (pack, socket in, socket out, unpack). Rank 0's tensors must
outlive the reads: one more agreement after them keeps rank 0 in the call, and raises
a refused read on every rank. Off by default: it needs ptrace access to rank 0 and
trusts rank 0's announced addresses as far as the samples can check them, and its
gain is on CPU ranks of one host only.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from sdict_ext import ops

__all__ = [
    "ENV_DIRECT_READ", "Source", "can_read", "direct_read_enabled", "direct_transfers",
    "read", "read_plan", "readable", "source_probe",
]

#: The setting that turns direct reads on under ``route="auto"`` (``1``); read at every
#: call, on every rank.
ENV_DIRECT_READ = "SDICT_EXT_DIRECT_READ"

# Bytes of sample windows per announced tensor (csrc: kSampleBytes).
_SAMPLE_BYTES = 16

# What rank 0 announces so that ranks can read its tensors: (pid, probe address, probe,
# sample seed, the sample windows of every tensor announced with an address, in order).
Source = tuple[int, int, bytes, int, bytes]


def direct_read_enabled() -> bool:
    """Whether ``route="auto"`` takes part in direct reads in this process:
    ``SDICT_EXT_DIRECT_READ=1`` in its environment now (rank 0 then announces its
    tensors; another rank reads them). Off by default: the messages route needs no
    access to another process."""
    return os.environ.get(ENV_DIRECT_READ, "0") == "1"


def _read_boxes(pid: int, addrs: list[int], full_shapes: list[tuple[int, ...]],
                starts: list[tuple[int, ...]], dsts: list[torch.Tensor]) -> int:
    """Box ``i`` (``dsts[i]``'s shape from index ``starts[i]``) of the C-contiguous tensor
    of ``full_shapes[i]`` at ``addrs[i]`` in process ``pid``, read into ``dsts[i]`` (see
    csrc/cpu/remote_read.cpp); every box is checked to lie in its tensor before any
    byte is read. Private: only this route's validated reads call it."""
    entry = ops.extension_entry("_read_process_boxes")
    if entry is None:
        raise ImportError("sdict_ext: the compiled extension has no direct reads")
    return entry(int(pid), addrs, full_shapes, starts, dsts)


def _read_samples(
    pid: int, addrs: list[int], nbytes: list[int], ids: list[int], seed: int
) -> tuple[bytes, list[bool]]:
    """The sample windows of each range ``[addrs[i], addrs[i] + nbytes[i])`` of process
    ``pid`` (``_SAMPLE_BYTES`` each, at a position drawn from ``(seed, ids[i])``), and
    whether each could be read."""
    entry = ops.extension_entry("_read_samples")
    if entry is None:
        return bytes(_SAMPLE_BYTES * len(addrs)), [False] * len(addrs)
    return entry(int(pid), addrs, nbytes, ids, seed)


def _announced(tensors: list[Any]) -> list[int]:
    """Positions (in ``tensors``, rank 0's TensorInfo list) of the tensors announced with
    an address, in order: the i-th of them owns sample window i."""
    return [i for i, t in enumerate(tensors) if t[4] != 0]


def source_probe(full_state_dict: dict[str, Any], keys: list[str],
                 tensors: list[Any]) -> tuple[torch.Tensor | None, Source | None]:
    """Rank 0's probe: 16 random bytes in a tensor it keeps alive during the call, their
    address and value, and sample windows of every tensor announced with an address,
    taken from the tensor itself (its ``data_ptr``, not the announced address) at
    positions drawn from a per-call seed. A rank that reads exactly the probe's bytes at
    that address in that pid is on rank 0's host, in its pid namespace, and allowed to
    read its memory; it then reads only tensors whose samples it finds at the announced
    address. ``(None, None)`` when rank 0 cannot sample its own tensors, or the build
    has no direct read (not Linux): every tensor then travels as a message."""
    if not ops.direct_read_available():
        return None, None
    nonce = os.urandom(16)
    seed = int.from_bytes(os.urandom(8), "little")
    probe = torch.tensor(list(nonce), dtype=torch.uint8)
    values = [full_state_dict[keys[tensors[i][0]]] for i in _announced(tensors)]
    samples, ok = _read_samples(
        os.getpid(), [v.data_ptr() for v in values],
        [v.numel() * v.element_size() for v in values], list(range(len(values))), seed,
    )
    if not all(ok):
        return None, None
    return probe, (os.getpid(), probe.data_ptr(), nonce, seed, samples)


def can_read(source: Source | None, opted_in: bool) -> bool:
    """Whether this rank reads rank 0's memory directly: it takes part (``opted_in``:
    ``route="direct"``, or ``"auto"`` with :func:`direct_read_enabled`), rank 0
    announced a source, and the probe reads back (see :func:`source_probe`); False,
    never an error, when it cannot (another host, no permission, no extension)."""
    if not opted_in or source is None or not ops.direct_read_available():
        return False
    pid, addr, nonce = source[:3]
    got = torch.zeros(len(nonce), dtype=torch.uint8)
    try:
        _read_boxes(pid, [addr], [(len(nonce),)], [(0,)], [got])
    except (RuntimeError, ImportError):
        return False
    return got.numpy().tobytes() == nonce


def direct_transfers(
    source: Source, tensors: list[Any], src_of: list[int],
    specs: list[tuple[tuple[int, ...], torch.dtype]], candidates: list[bool],
) -> list[bool]:
    """Which transfers this rank reads directly: of the ``candidates`` (it needs a box and
    its destinations can take a read), those rank 0 announced with an address whose two
    sample windows this rank reads back at that address exactly as rank 0 sampled them
    from its tensor. A window that differs (an address off by a page) or that cannot be
    read (not mapped) leaves the transfer to a message: a read that cannot be validated
    is never made."""
    pid, _, _, seed, samples = source
    window = {i: k for k, i in enumerate(_announced(tensors))}
    picked = [j for j, ok in enumerate(candidates) if ok and src_of[j] in window]
    nbytes = [math.prod(specs[j][0]) * specs[j][1].itemsize for j in picked]
    got, readable_now = _read_samples(
        pid, [tensors[src_of[j]][4] for j in picked], nbytes, [window[src_of[j]] for j in picked],
        seed,
    )
    direct = [False] * len(candidates)
    for k, j in enumerate(picked):
        w = window[src_of[j]] * _SAMPLE_BYTES
        mine = got[k * _SAMPLE_BYTES:(k + 1) * _SAMPLE_BYTES]
        direct[j] = readable_now[k] and mine == samples[w:w + _SAMPLE_BYTES]
    return direct


def readable(dests: list[Any]) -> bool:
    """Whether every destination of a transfer can take its box by a direct read (a
    contiguous CPU tensor of its own, staged otherwise)."""
    for d in dests:  # (a plain loop: this runs once per transfer on the hot path)
        t = d.unpack_into
        if not t.is_contiguous() or not t.is_cpu:
            return False
    return bool(dests)


def read_plan(pid: int, js: list[int], addrs: list[int], shapes: list[tuple[int, ...]],
              slot_dests: list[list[Any]]) -> Any:
    """The direct reads of transfers ``js`` (validated by :func:`direct_transfers`):
    each destination's own box of its source tensor at ``addrs[j]`` in process ``pid``,
    which the read checks to lie in that tensor of ``shapes[j]``."""
    picked = [(addrs[j], shapes[j], d) for j in js for d in slot_dests[j]]
    return (pid, [a for a, _, _ in picked], [s for _, s, _ in picked],
            [d.box_start for _, _, d in picked], [d.unpack_into for _, _, d in picked])


def read(reads: Any) -> BaseException | None:
    """Makes the reads of :func:`read_plan`; a refused read is returned, not raised, so
    that the caller still receives its messages and reports it to every rank."""
    if not reads or not reads[1]:
        return None
    try:
        _read_boxes(*reads)
    except RuntimeError as exc:
        return exc
    return None
