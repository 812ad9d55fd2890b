"""The measurement core: what one benchmark row is, and how it is measured.

Every suite builds its inputs once per case, then hands each implementation (PyTorch's
function, sdict_ext's, or a hardware bound) to :meth:`Ctx.measure`, which

1. runs it ``warmup`` times untimed (first-touch page faults, lazy imports, caches),
2. times up to ``repeat`` runs, stopping early once the case's time budget is spent
   (at least :data:`MIN_REPEATS` runs), so one slow baseline cannot stall the run,
3. runs it once more as a *probe*, untimed, to read the peak extra host memory (RSS
   high-water mark above the pre-call RSS), the peak extra device memory and the
   collectives issued. The probe is separate because counting collectives intercepts
   every op in Python, which would distort the timings.

On several ranks, every timed run starts together (one small all-reduce that also
carries the "stop early" decision, so ranks never disagree on the repeat count) and the
time of a run is the slowest rank's, i.e. the wall time of the distributed operation.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import os
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from bench.ranks import note_running

__all__ = [
    "MIN_REPEATS",
    "ROLES",
    "ROLE_BOUND",
    "ROLE_CASE",
    "ROLE_SDICT",
    "ROLE_TORCH",
    "ROLE_VARIANT",
    "CaseSpec",
    "CollectiveCounter",
    "Ctx",
    "DistInfo",
    "HostMemory",
    "Row",
    "load_sdict",
    "summarize",
]

#: Fewest timed runs kept even when a single run exceeds the time budget: the median
#: and spread of fewer samples would say nothing.
MIN_REPEATS = 3

ROLE_SDICT = "sdict_ext"
ROLE_TORCH = "torch"
ROLE_BOUND = "bound"
#: A row standing for a whole case that did not run (no device, setup failed).
ROLE_CASE = "case"
#: sdict_ext with a tuning knob forced (e.g. every copy on one CUDA route), measured to
#: choose the default: shown and plotted, never in the PyTorch / sdict_ext ratio.
ROLE_VARIANT = "variant"
ROLES = (ROLE_SDICT, ROLE_TORCH, ROLE_BOUND, ROLE_CASE, ROLE_VARIANT)


@dataclass
class CaseSpec:
    """One benchmark case: a workload that every implementation runs on the same inputs.

    Specs are plain data (they are pickled to spawned ranks, which rebuild the inputs
    from ``params`` by calling the suite's ``run``).

    Attributes:
        suite: suite name (``bench.suites.<suite>`` holds ``run(spec, ctx)``).
        name: human-readable case name, unique within the suite.
        multi_rank: runs on every rank of a process group rather than in this process.
        bound: name of the limits row family this case is compared with (``memcpy``,
            ``d2h``, ``h2d``, ``d2d``, ``broadcast``, ``all_gather``), or a family of
            its own that the case measures itself (its ``bound`` rows), or None.
        params: workload parameters (JSON-able); the suite's ``run`` reads them.
        plot: for sweep cases, ``{"group", "xlabel", "x"}``: a line in the --plot figure.
        min_world_size: fewest ranks a multi-rank case needs (a layout over 4 ranks);
            spawned runs start a group of ``max(--world-size, min_world_size)`` ranks
            for it, torchrun runs with fewer ranks skip it.
    """

    suite: str
    name: str
    multi_rank: bool = False
    bound: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    plot: dict[str, Any] | None = None
    min_world_size: int | None = None


@dataclass
class Row:
    """The result of one implementation on one case (one line of the table / JSON).

    ``bound_gbps``, ``pct_of_bound`` and ``ratio_torch_over_sdict`` are filled in by the
    report once every case (the limits included) has run.
    """

    suite: str
    case: str
    impl: str
    role: str
    status: str  # "ok" | "skipped" | "error"
    reason: str | None
    device: str
    world_size: int
    bytes: int
    tensors: int
    bound: str | None
    params: dict[str, Any]
    plot: dict[str, Any] | None
    warmup: int = 0
    repeats: int = 0
    times_s: dict[str, float] | None = None
    gbps: float | None = None
    host_peak_bytes: int | None = None
    device_peak_bytes: int | None = None
    collectives: int | None = None
    collective_ops: dict[str, int] | None = None
    extra: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Counters a suite attaches after measuring (JSON-able), e.g. the bytes each rank
    #: sent: lists hold one value per rank. Keys ending in ``_bytes`` print as MB.
    info: dict[str, Any] = field(default_factory=dict)
    verified: bool | None = None
    bound_gbps: float | None = None
    pct_of_bound: float | None = None
    ratio_torch_over_sdict: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, p10/p90 (linear interpolation), min, max and mean of ``samples``."""
    if not samples:
        raise ValueError("summarize: no samples")
    xs = sorted(samples)

    def quantile(q: float) -> float:
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {
        "median": quantile(0.5),
        "p10": quantile(0.1),
        "p90": quantile(0.9),
        "min": xs[0],
        "max": xs[-1],
        "mean": sum(xs) / len(xs),
    }


def load_sdict(module: str, name: str) -> tuple[Callable[..., Any] | None, str | None]:
    """Looks up ``sdict_ext.<module>.<name>`` without failing when it is not there yet.

    The suites run against a package whose modules land one by one, so a missing module
    or function turns into a "skipped" row instead of a crash, and the case starts being
    measured as soon as the function exists.

    Returns:
        ``(function, None)``, or ``(None, reason)``.
    """
    qualname = f"sdict_ext.{module}.{name}"
    try:
        mod = importlib.import_module(f"sdict_ext.{module}")
    except ModuleNotFoundError as exc:
        if exc.name in (f"sdict_ext.{module}", "sdict_ext"):
            return None, f"{qualname} not implemented"
        return None, f"sdict_ext.{module} failed to import: {exc}"
    except Exception as exc:  # a half-written module must not stop the benchmark
        return None, f"sdict_ext.{module} failed to import: {type(exc).__name__}: {exc}"
    fn = getattr(mod, name, None)
    if fn is None:
        return None, f"{qualname} not implemented"
    return fn, None


class HostMemory:
    """Peak extra resident host memory of a call, from the kernel's own accounting.

    Linux keeps a per-process RSS high-water mark (``VmHWM``) that ``clear_refs`` value
    5 resets to the current RSS. Freed heap memory that glibc keeps would hide a call's
    allocations (they would reuse already-resident pages), so the heap is trimmed first.
    Pinned and shared-memory slabs are resident too, so they count, unlike with
    allocator statistics or tracemalloc (which sees no tensor memory at all).
    """

    def __init__(self) -> None:
        self.available = False
        self._libc = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._read("VmHWM")
            self.available = True
        except (OSError, ValueError):
            return
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None

    @staticmethod
    def _read(key: str) -> int:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        if match is None:
            raise ValueError(f"/proc/self/status has no {key}")
        return int(match.group(1)) * 1024

    def start(self) -> int:
        """Trims the heap, resets the high-water mark, and returns the RSS baseline."""
        if self._libc is not None:
            self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self._read("VmRSS")

    def peak_since(self, baseline: int) -> int:
        return max(0, self._read("VmHWM") - baseline)


# Ops of the c10d namespaces that are bookkeeping, not a message on the wire.
_NOT_COLLECTIVES = frozenset({"wait_tensor", "_wrap_tensor_autograd"})


class CollectiveCounter(TorchDispatchMode):
    """Counts the collectives issued while active, by op name.

    Wrapping the ``torch.distributed`` Python functions would miss the functional
    collectives that DTensor and FSDP2 issue (``_c10d_functional.*``), which never pass
    through them. Every collective, eager or functional, is a dispatcher op of the
    ``c10d`` or ``_c10d_functional`` namespace, so a dispatch mode sees them all. An
    object collective (``broadcast_object_list``) counts as the tensor collectives it is
    made of, which is what goes over the wire.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            name = func._opname
            if name not in _NOT_COLLECTIVES:
                key = f"{func.namespace}.{name}"
                self.ops[key] = self.ops.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


@dataclass
class DistInfo:
    """The process group a multi-rank case runs on."""

    rank: int
    world_size: int
    device: torch.device  # device of the harness's own small collectives


class Ctx:
    """Measures the implementations of one case and collects their rows.

    Args:
        spec: the case.
        device: ``torch.device`` the case's tensors live on.
        repeat: most timed runs per implementation.
        warmup: untimed runs before timing.
        budget_s: time after which no further timed run starts (see :data:`MIN_REPEATS`).
        dist_info: set when the case runs on every rank of the default process group.
        host_memory: the shared :class:`HostMemory` reader.
    """

    def __init__(
        self,
        spec: CaseSpec,
        device: torch.device,
        repeat: int,
        warmup: int,
        budget_s: float,
        dist_info: DistInfo | None,
        host_memory: HostMemory,
    ) -> None:
        self.spec = spec
        self.device = device
        self.repeat = repeat
        self.warmup = warmup
        self.budget_s = budget_s
        self.dist = dist_info
        self.host_memory = host_memory
        self.rows: list[Row] = []

    @property
    def world_size(self) -> int:
        return self.dist.world_size if self.dist else 1

    @property
    def rank(self) -> int:
        return self.dist.rank if self.dist else 0

    def _row(self, impl: str, role: str, nbytes: int, tensors: int, **fields: Any) -> Row:
        if role not in ROLES:
            raise ValueError(f"{self.spec.name}: role must be one of {ROLES}, got {role!r}")
        row = Row(
            suite=self.spec.suite,
            case=self.spec.name,
            impl=impl,
            role=role,
            device=str(self.device),
            world_size=self.world_size,
            bytes=int(nbytes),
            tensors=int(tensors),
            bound=self.spec.bound,
            params=dict(self.spec.params),
            plot=self.spec.plot,
            **fields,
        )
        self.rows.append(row)
        return row

    def skip(self, impl: str, role: str, reason: str, nbytes: int = 0, tensors: int = 0) -> Row:
        """Records an implementation that cannot run here, and why."""
        return self._row(impl, role, nbytes, tensors, status="skipped", reason=reason)

    def measure(
        self,
        impl: str,
        role: str,
        fn: Callable[..., Any] | None,
        *,
        nbytes: int,
        tensors: int,
        setup: Callable[[], tuple] | None = None,
        missing: str | None = None,
        verify: Callable[[], bool] | None = None,
        reports_times: bool = False,
    ) -> Row:
        """Times ``fn(*setup())`` and records a row.

        Args:
            impl: implementation label shown in the table.
            role: ``"sdict_ext"``, ``"torch"`` or ``"bound"``.
            fn: the call to measure; None (with ``missing``) records a skipped row.
            nbytes: payload bytes per call, for GB/s.
            tensors: tensors per call.
            setup: untimed, called before every run; returns ``fn``'s arguments (e.g. a
                fresh shallow copy of a dict that ``fn`` mutates).
            missing: why ``fn`` is None.
            verify: called once after the probe; whether the result is right (e.g.
                bit-equal to PyTorch's on the same inputs).
            reports_times: ``fn`` returns a dict of named durations in seconds (e.g. the
                trainer's blocking time inside a staging call), summarised into ``extra``.
        """
        if fn is None:
            return self.skip(impl, role, missing or "not available", nbytes, tensors)
        note_running(f"{self.spec.suite}: {self.spec.name}: {impl} ({role})")
        try:
            return self._measure_or_error(
                impl, role, fn, nbytes, tensors, setup, verify, reports_times
            )
        finally:
            note_running(f"{self.spec.suite}: {self.spec.name}: between implementations")

    def _measure_or_error(
        self, impl, role, fn, nbytes, tensors, setup, verify, reports_times
    ) -> Row:
        if self.dist is None:
            # Alone, a failing implementation is just an error row: the other
            # implementations of the case still run. On several ranks the caller owns
            # failures, because the group may be left mid-collective.
            try:
                return self._measure(impl, role, fn, nbytes, tensors, setup, verify, reports_times)
            except Exception as exc:
                return self._row(
                    impl, role, nbytes, tensors, status="error",
                    reason=_describe_error(exc),
                )
        return self._measure(impl, role, fn, nbytes, tensors, setup, verify, reports_times)

    def sync(self) -> None:
        """Waits for the device work of this case (a no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _keep_going(self, stop: bool) -> bool:
        """On several ranks: a start line for the next run, and a shared stop decision."""
        if self.dist is None:
            return not stop
        flag = torch.tensor([1.0 if stop else 0.0], device=self.dist.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def _run_once(
        self, fn: Callable[..., Any], setup: Callable[[], tuple] | None
    ) -> tuple[float, Any]:
        args = setup() if setup is not None else ()
        self.sync()
        t0 = time.perf_counter()
        out = fn(*args)
        self.sync()
        return time.perf_counter() - t0, out

    def _measure(self, impl, role, fn, nbytes, tensors, setup, verify, reports_times) -> Row:
        for _ in range(self.warmup):
            self._keep_going(False)
            self._run_once(fn, setup)

        times: list[float] = []
        extras: dict[str, list[float]] = {}
        started = time.perf_counter()
        while True:
            over = len(times) >= self.repeat or (
                len(times) >= MIN_REPEATS and time.perf_counter() - started > self.budget_s
            )
            if not self._keep_going(over):
                break
            elapsed, out = self._run_once(fn, setup)
            times.append(elapsed)
            if reports_times:
                for key, value in out.items():
                    extras.setdefault(key, []).append(float(value))
            del out

        host_peak, device_peak, counter = self._probe(fn, setup)
        verified = bool(verify()) if verify is not None else None

        collectives = counter.total
        if self.dist is not None:
            times, extras = self._slowest_rank(times, extras)
            wrong = 0 if verified in (None, True) else 1
            maxed = self._max_over_ranks([host_peak or 0, device_peak or 0, collectives, wrong])
            host_peak = maxed[0] if host_peak is not None else None
            device_peak = maxed[1] if device_peak is not None else None
            collectives = maxed[2]
            if verified is not None:
                verified = maxed[3] == 0
        stats = summarize(times)
        return self._row(
            impl, role, nbytes, tensors,
            status="ok", reason=None,
            warmup=self.warmup, repeats=len(times), times_s=stats,
            gbps=(nbytes / stats["median"] / 1e9) if nbytes and stats["median"] > 0 else None,
            host_peak_bytes=host_peak, device_peak_bytes=device_peak,
            collectives=collectives, collective_ops=dict(sorted(counter.ops.items())),
            extra={k: summarize(v) for k, v in extras.items()}, verified=verified,
        )

    def _probe(self, fn, setup) -> tuple[int | None, int | None, CollectiveCounter]:
        self._keep_going(False)
        args = setup() if setup is not None else ()
        gc.collect()
        cuda = self.device.type == "cuda"
        if cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            device_base = torch.cuda.memory_allocated(self.device)
        host_base = self.host_memory.start() if self.host_memory.available else None
        counter = CollectiveCounter()
        if self.dist is not None:
            with counter:
                fn(*args)
                self.sync()
        else:
            # Without a process group no collective can be issued, so the probe skips
            # the counter (it would slow the run down for nothing).
            fn(*args)
            self.sync()
        host_peak = self.host_memory.peak_since(host_base) if host_base is not None else None
        device_peak = None
        if cuda:
            device_peak = max(0, torch.cuda.max_memory_allocated(self.device) - device_base)
        del args
        return host_peak, device_peak, counter

    def _max_over_ranks(self, values: list[int]) -> list[int]:
        t = torch.tensor(values, dtype=torch.float64, device=self.dist.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def _slowest_rank(
        self, times: list[float], extras: dict[str, list[float]]
    ) -> tuple[list[float], dict[str, list[float]]]:
        keys = sorted(extras)
        flat = list(times) + [v for k in keys for v in extras[k]]
        t = torch.tensor(flat, dtype=torch.float64, device=self.dist.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        merged = t.tolist()
        n = len(times)
        out_extras = {k: merged[n + i * n : n + (i + 1) * n] for i, k in enumerate(keys)}
        return merged[:n], out_extras


def _describe_error(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {os.path.basename(last[0].filename)}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}".replace("\n", " ")[:500]
