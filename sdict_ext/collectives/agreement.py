"""The one agreement: before any bulk collective, every rank learns whether every other
rank's plan succeeded and matches its own.

Every collective path of the package (gather, distribute, broadcast and its routes, the
state-dict loads, the stager) calls :func:`agree` before its first bulk collective, so no
rank is ever left waiting in a collective that another rank will never enter, and a
failure on one rank surfaces on every rank. The happy path costs one tiny collective:
an ``all_reduce(MAX)`` of three integers, or, when the ranks must also learn each
other's small plan rows (``share``), one ``all_gather`` of those rows. Only when
something is wrong does one ``all_gather_object`` collect the error texts.
"""

from __future__ import annotations

import hashlib
import traceback
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "RankFailure",
    "agree",
    "digest",
    "status_device",
]


class RankFailure(RuntimeError):
    """Raised on the ranks that did not fail themselves when another rank's plan failed.

    Attributes:
        failures: group rank -> the failing rank's error text.
    """

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures


def status_device(group: dist.ProcessGroup) -> torch.device:
    """The device a small control tensor must live on for collectives on ``group``."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def digest(items: Sequence[Any]) -> int:
    """A 56-bit digest of ``repr(items)``, identical on every rank for equal plans.

    Python's ``hash`` of strings differs between processes, so a real hash is used;
    56 bits keep both the digest and its negation inside int64.
    """
    h = hashlib.blake2b(repr(items).encode(), digest_size=7)
    return int.from_bytes(h.digest(), "little")


# torch 2.13 deprecates all_gather_into_tensor for all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _error_text(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()


def agree(
    group: dist.ProcessGroup,
    error: BaseException | str | None,
    *,
    what: str,
    plan_digest: int = 0,
    share: Sequence[int] | None = None,
    share_len: int | None = None,
    blame: Callable[[dict[int, str]], BaseException] | None = None,
    everyone_blamed: bool = False,
    lost: Callable[[BaseException], BaseException] | None = None,
) -> torch.Tensor | None:
    """Makes every rank of ``group`` raise if any rank failed or the plans differ.

    Args:
        group: every rank of it must call this, with the same ``share_len``.
        error: this rank's failure (an exception, or a message), or None.
        what: the calling function's name, for messages.
        plan_digest: :func:`digest` of what this rank is about to send and expect;
            ranks whose digests differ all raise :class:`RankFailure`.
        share: this rank's row of small integers that every rank must learn (a
            route's plan, flags); ``None`` on a rank that failed building it.
        share_len: the length every rank's row has. Given (even ``0``), the
            happy path is one ``all_gather`` and the table of every rank's row is
            returned; a row of another length is this rank's failure.
        blame: builds the exception raised where this rank did not fail, from
            {group rank: error text}; default :class:`RankFailure`.
        everyone_blamed: the failing ranks raise ``blame``'s exception too, instead of
            re-raising their own (every rank then raises the same message).
        lost: builds the exception raised when the agreement's own collective fails
            (a dead peer, the group's timeout) on a rank that did not fail itself.

    Returns:
        ``None``, or with ``share_len`` a CPU int64 tensor ``(world, share_len)``.

    Raises:
        this rank's ``error`` (a message becomes a ``RuntimeError``), ``blame``'s
        exception, :class:`RankFailure` when the plans differ, or ``lost``'s.
    """
    text = error if isinstance(error, str) else None
    if isinstance(error, str):
        error = RuntimeError(error)
    if share_len is not None and error is None and (share is None or len(share) != share_len):
        error = RuntimeError(
            f"{what}: internal error: a plan row of "
            f"{None if share is None else len(share)} entries where {share_len} were agreed"
        )
    failed = 1 if error is not None else 0
    device = status_device(group)
    try:
        if share_len is None:
            flags = torch.tensor([failed, plan_digest, -plan_digest], dtype=torch.int64,
                                 device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
            any_failed, high, neg_low = flags.tolist()
            same = high == -neg_low
            table = None
        else:
            row = array("q", [failed, plan_digest])
            row.extend([0] * share_len if failed or share is None else share)
            mine = torch.frombuffer(row, dtype=torch.int64).to(device)
            world = dist.get_world_size(group)
            gathered = torch.empty(world * (share_len + 2), dtype=torch.int64, device=device)
            _all_gather_single(gathered, mine, group=group)
            full = gathered.view(world, share_len + 2).cpu()
            any_failed = int(full[:, 0].max())
            same = bool((full[:, 1] == plan_digest).all())
            table = full[:, 2:]
    except Exception as exc:
        if error is not None:
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(f"{what}: the exchange with the other ranks failed too: {exc}")
            raise error from None
        if lost is not None:
            raise lost(exc) from exc
        raise
    if not any_failed and same:
        return table
    if text is None and error is not None:
        text = _error_text(error)
    reports: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(reports, (text, plan_digest), group=group)
    failures = {r: t for r, (t, _) in enumerate(reports) if t is not None}
    if not failures:
        groups: dict[int, list[int]] = {}
        for r, (_, d) in enumerate(reports):
            groups.setdefault(d, []).append(r)
        failures = {
            ranks[0]: f"ranks {ranks} see a different state dict (keys, shapes, dtypes or "
            "placements) than the other ranks"
            for ranks in groups.values()
        }
        raise RankFailure(
            f"{what}: the ranks disagree on the state dict; every rank must pass the same "
            f"keys, shapes, dtypes and placements: rank groups {sorted(groups.values())}",
            failures,
        )
    if error is not None and not everyone_blamed:
        raise error
    if blame is not None:
        raise blame(failures)
    lines = "; ".join(f"rank {r}: {t}" for r, t in sorted(failures.items()))
    raise RankFailure(f"{what} failed on another rank, so no rank proceeded: {lines}", failures)
