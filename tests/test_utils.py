"""Single-process specs for ``sdict_ext.utils``, each compared with PyTorch's own function.

The collective functions (gather / broadcast / distribute) and DTensor leaves are
covered in ``tests/test_utils_dist.py``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import resource
import warnings
import weakref
from collections import OrderedDict

import pytest
import torch
from torch.distributed import _state_dict_utils as ref

from sdict_ext import tree as _traverse
from sdict_ext import utils
from sdict_ext.collectives.boxes import box_of
from sdict_ext.collectives.buckets import buckets, buckets_with_solos
from sdict_ext.host import memory as _hostmem


def _nested() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "model": OrderedDict(
            w=torch.randn(4, 3, generator=g),
            b=torch.arange(5, dtype=torch.int32),
            half=torch.randn(2, 2, generator=g).to(torch.bfloat16),
        ),
        "optim": {
            "state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(3, generator=g)}},
            "param_groups": [{"lr": 0.1, "params": [0], "betas": (0.9, 0.99)}],
        },
        "strided": torch.randn(3, 4, generator=g).t(),
        "empty": torch.empty(0, 3),
        "misc": [None, "s", b"raw", 3, 2.5, True, io.BytesIO(b"x")],
        "empty_dict": {},
        "empty_list": [],
    }


def _same(a, b) -> bool:
    """Deep equality with bit-exact tensors (and same dtype / shape)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, io.BytesIO):
        return isinstance(b, io.BytesIO) and a.getvalue() == b.getvalue()
    if isinstance(a, dict):
        return type(b) is type(a) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(b) is type(a) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


# ---------------------------------------------------------------- traversal


def test_traverse_visits_the_same_paths_and_values_as_pytorch():
    sd = _nested()
    ours, theirs = [], []
    utils.traverse_state_dict(sd, lambda p, v: ours.append((p, v)))
    ref._traverse_state_dict(sd, lambda p, v: theirs.append((p, v)))
    assert [p for p, _ in ours] == [p for p, _ in theirs]
    assert all(a is b for (_, a), (_, b) in zip(ours, theirs))
    assert ("optim", "state", "0", "step") in [p for p, _ in ours]


def test_flatten_and_unflatten_match_pytorch():
    sd = _nested()
    flat, mapping = utils.flatten_state_dict(sd)
    ref_flat, ref_mapping = ref._flatten_state_dict(sd)
    assert mapping == ref_mapping
    assert list(flat) == list(ref_flat) and all(flat[k] is ref_flat[k] for k in flat)
    assert _same(utils.unflatten_state_dict(flat, mapping),
                 ref._unflatten_state_dict(ref_flat, ref_mapping))
    # Sparse list indices are padded with None, as PyTorch does.
    sparse = {"a.2": 5, "b.x": 1}
    sparse_map = {"a.2": ("a", 2), "b.x": ("b", "x")}
    assert utils.unflatten_state_dict(sparse, sparse_map) == {"a": [None, None, 5], "b": {"x": 1}}
    assert utils.unflatten_state_dict(sparse, sparse_map) == ref._unflatten_state_dict(
        sparse, sparse_map
    )


def test_flatten_rejects_duplicated_keys_like_pytorch():
    sd = {"a.b": 1, "a": {"b": 2}}
    with pytest.raises(ValueError, match="duplicated flatten key a.b"):
        utils.flatten_state_dict(sd)
    with pytest.raises(ValueError, match="duplicated flatten key a.b"):
        ref._flatten_state_dict(sd)


def test_internal_flat_view_rebuilds_the_structure_with_new_leaves():
    sd = _nested()
    flat = _traverse.flatten(sd)
    assert flat.paths[0] == ("model", "w") and flat.kinds[0] == _traverse.LEAF_TENSOR
    assert flat.tensor_indices() == [
        i for i, v in enumerate(flat.leaves) if isinstance(v, torch.Tensor)
    ]
    rebuilt = flat.rebuild(flat.leaves)
    # Containers are rebuilt as PyTorch's iteration rebuilds them: OrderedDict -> dict.
    assert type(rebuilt["model"]) is dict and rebuilt["model"]["w"] is sd["model"]["w"]
    assert rebuilt["optim"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert rebuilt["empty_dict"] == {} and rebuilt["empty_list"] == []


# ---------------------------------------------------------------- iterate


def test_iterate_applies_functions_like_pytorch():
    sd = _nested()

    def double(t, pg, device, companion):
        return t * 2

    ours = utils.iterate_state_dict(sd, double, double, double)
    theirs = ref._iterate_state_dict(sd, double, double, double)
    assert _same(ours, theirs)
    assert torch.equal(ours["model"]["w"], sd["model"]["w"] * 2)


def test_iterate_type_check_rejects_unknown_leaves_and_deep_copies_them_when_off():
    sd = {"a": torch.ones(2), "weird": {"s": {1, 2}}}
    ident = ref._identity_func
    with pytest.raises(ValueError, match=r"Unexpected value type .*'weird.s'"):
        utils.iterate_state_dict(sd, ident, ident, ident)
    with pytest.raises(ValueError, match="Unexpected value type"):
        ref._iterate_state_dict(sd, ident, ident, ident)
    out = utils.iterate_state_dict(sd, ident, ident, ident, type_check=False)
    assert out["weird"]["s"] == {1, 2} and out["weird"]["s"] is not sd["weird"]["s"]


def test_iterate_with_companion_copies_into_it_like_pytorch():
    sd = _nested()
    ours_dst = utils.create_cpu_state_dict(sd)
    theirs_dst = ref._create_cpu_state_dict(sd)
    ident = ref._identity_func
    ours = utils.iterate_state_dict(sd, ident, ident, ident, companion_obj=ours_dst)
    theirs = ref._iterate_state_dict(sd, ident, ident, ident, companion_obj=theirs_dst)
    assert _same(ours, theirs) and _same(ours_dst, theirs_dst)
    assert ours["model"]["w"] is ours_dst["model"]["w"]


# ---------------------------------------------------------------- copy


def test_copy_matches_pytorch_and_returns_the_destination_tensors():
    sd = _nested()
    ours_dst = utils.create_cpu_state_dict(sd)
    theirs_dst = ref._create_cpu_state_dict(sd)
    ours = utils.copy_state_dict(sd, ours_dst)
    theirs = ref._copy_state_dict(sd, theirs_dst)
    assert _same(ours, theirs)
    assert _same(ours_dst, theirs_dst)
    assert ours["strided"] is ours_dst["strided"]
    assert ours["misc"][1] == "s" and ours is not ours_dst


def test_copy_writes_a_tied_destination_once():
    shared = torch.zeros(3)
    src = {"a": torch.full((3,), 1.0), "b": torch.full((3,), 2.0)}
    out = utils.copy_state_dict(src, {"a": shared, "b": shared})
    # Copying pair by pair leaves the last source behind; so does the batched copy.
    assert torch.equal(shared, torch.full((3,), 2.0))
    assert out["a"] is shared and out["b"] is shared


def test_copy_dict_vs_list_raises_companion_mismatch_with_the_key_path():
    src = {"model": {"layers": {"0": torch.ones(2)}}}
    dst = {"model": {"layers": [torch.zeros(2)]}}
    with pytest.raises(utils.CompanionMismatch, match="'model.layers'"):
        utils.copy_state_dict(src, dst)
    # PyTorch's defect: AttributeError instead of CompanionMismatch.
    with pytest.raises(AttributeError):
        ref._copy_state_dict(src, dst)
    # Ours is a PyTorch CompanionMismatch too, so existing handlers keep working.
    assert issubclass(utils.CompanionMismatch, ref.CompanionMismatch)


def test_copy_checks_every_dtype_and_shape_before_writing_anything():
    src = {"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(2, dtype=torch.float64)}
    dst = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(2)}
    with pytest.raises(utils.CompanionMismatch, match="'c': dtypes differ"):
        utils.copy_state_dict(src, dst)
    assert torch.equal(dst["a"], torch.zeros(2)) and torch.equal(dst["b"], torch.zeros(3))
    dst["c"] = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(utils.CompanionMismatch, match="'c': shapes differ"):
        utils.copy_state_dict(src, dst)
    assert torch.equal(dst["a"], torch.zeros(2))
    # PyTorch casts silently.
    cast_dst = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(2)}
    ref._copy_state_dict(src, cast_dst)
    assert cast_dst["c"].dtype == torch.float32


def test_copy_of_flat_dicts_in_any_key_order_and_with_other_values_matches_pytorch():
    from collections import OrderedDict

    src = OrderedDict((f"k{i}", torch.arange(i + 1, dtype=torch.float32)) for i in range(5))
    cases = [
        ({k: torch.zeros_like(v) for k, v in src.items()}, src),  # same order: one C++ pass
        ({k: torch.zeros_like(src[k]) for k in reversed(src)}, src),  # other order
        ({**{k: torch.zeros_like(v) for k, v in src.items()}, "step": 3}, {**src, "step": 3}),
    ]
    for dst, source in cases:
        theirs_dst = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in dst.items()}
        ours = utils.copy_state_dict(source, dst)
        theirs = ref._copy_state_dict(source, theirs_dst)
        assert list(ours) == list(theirs) and type(ours) is dict
        assert _same(ours, theirs)
        assert all(ours[k] is dst[k] for k in src)


def test_copy_rejects_missing_keys_and_none_destinations():
    with pytest.raises(utils.CompanionMismatch, match="missing in the companion: \\['b'\\]"):
        utils.copy_state_dict({"a": torch.ones(1), "b": torch.ones(1)}, {"a": torch.zeros(1)})
    with pytest.raises(utils.CompanionMismatch, match="'a': the destination has None"):
        utils.copy_state_dict({"a": torch.ones(1)}, {"a": None})


# ---------------------------------------------------------------- create_cpu_state_dict


def _slab_ptrs(sd) -> set[int]:
    ptrs = set()
    utils.traverse_state_dict(
        sd,
        lambda p, v: ptrs.add(v.untyped_storage().data_ptr())
        if isinstance(v, torch.Tensor) and v.numel()
        else None,
    )
    return ptrs


def test_create_cpu_matches_pytorch_shapes_dtypes_and_values_it_defines():
    sd = _nested()
    ours = utils.create_cpu_state_dict(sd)
    theirs = ref._create_cpu_state_dict(sd)
    ours_flat, _ = utils.flatten_state_dict(ours)
    theirs_flat, _ = utils.flatten_state_dict(theirs)
    assert list(ours_flat) == list(theirs_flat)
    for key, value in ours_flat.items():
        other = theirs_flat[key]
        if isinstance(value, torch.Tensor):
            assert (value.shape, value.dtype, value.device) == (other.shape, other.dtype,
                                                                 other.device), key
            assert value.is_contiguous()
        elif isinstance(value, io.BytesIO):
            assert value.getvalue() == other.getvalue()
        else:
            assert value == other, key
    # 0-dim tensors are zero and zero-element ones plain, as in PyTorch.
    assert torch.equal(ours["optim"]["state"][0]["step"], torch.tensor(0.0))
    assert ours["empty"].shape == (0, 3)


def test_create_cpu_carves_every_tensor_out_of_one_slab():
    sd = _nested()
    ours = utils.create_cpu_state_dict(sd)
    assert len(_slab_ptrs(ours)) == 1
    assert len(_slab_ptrs(ref._create_cpu_state_dict(sd))) > 1
    ptrs = [t.data_ptr() for t in utils.flatten_state_dict(ours)[0].values()
            if isinstance(t, torch.Tensor) and t.numel()]
    assert all(p % 16 == 0 for p in ptrs)


def test_create_cpu_share_memory_uses_one_shared_segment():
    sd = {f"t{i}": torch.randn(3) for i in range(50)}
    ours = utils.create_cpu_state_dict(sd, share_memory=True)
    assert all(t.is_shared() for t in ours.values())
    assert len({t.untyped_storage()._share_filename_cpu_()[1] for t in ours.values()}) == 1


def _fill_in_child(queue, done) -> None:
    # Runs in a spawned process: writes into the tensors it received.
    tensors = queue.get(timeout=60)
    for i, t in enumerate(tensors):
        t.fill_(i + 1)
    done.put(True)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb * 1024


@pytest.mark.skipif(not hasattr(__import__("os"), "memfd_create"), reason="Linux only")
@pytest.mark.parametrize("strategy", ["file_descriptor", "file_system"])
def test_create_cpu_share_memory_shares_with_another_process_like_pytorch(strategy):
    import torch.multiprocessing as tmp

    before = tmp.get_sharing_strategy()
    tmp.set_sharing_strategy(strategy)
    try:
        sd = {"a": torch.randn(1000, 3), "b": torch.zeros(7, dtype=torch.bfloat16),
              "c": torch.arange(5)}
        ours = utils.create_cpu_state_dict(sd, share_memory=True)
        theirs = ref._create_cpu_state_dict(sd, share_memory=True)
        for result in (ours, theirs):
            assert all(t.is_shared() for t in result.values())
            assert {k: (t.shape, t.dtype) for k, t in result.items()} == {
                k: (t.shape, t.dtype) for k, t in sd.items()
            }
        # Sharing copies nothing: the storage already is the segment that travels.
        storage = ours["a"].untyped_storage()
        ptr = storage.data_ptr()
        if strategy == "file_descriptor":
            fd, size = storage._share_fd_cpu_()
            assert fd >= 0 and size == storage.nbytes()
        else:
            assert storage._share_filename_cpu_()[2] == storage.nbytes()
        assert storage.data_ptr() == ptr
        ctx = tmp.get_context("spawn")
        for result in (ours, theirs):
            queue, done = ctx.Queue(), ctx.Queue()
            child = ctx.Process(target=_fill_in_child, args=(queue, done))
            child.start()
            try:
                queue.put(list(result.values()))
                assert done.get(timeout=120)
            finally:
                child.join(timeout=60)
                if child.is_alive():
                    child.kill()
            # The child's writes are visible here: the memory really is shared.
            for i, t in enumerate(result.values()):
                assert torch.equal(t, torch.full_like(t, i + 1)), (strategy, i)
    finally:
        tmp.set_sharing_strategy(before)


def test_create_cpu_share_memory_populates_the_segment_once():
    # Every page is allocated and mapped when the call returns (as after PyTorch's
    # copy into the segment), so the first copy into it does not fault page by page.
    sd = {f"t{i}": torch.empty(1 << 20) for i in range(16)}  # 64 MiB
    start = _rss_bytes()
    ours = utils.create_cpu_state_dict(sd, share_memory=True)
    assert _rss_bytes() - start >= 60 << 20
    assert len({t.untyped_storage().data_ptr() for t in ours.values()}) == 1


def test_create_cpu_share_memory_without_populate_or_out_of_memory(monkeypatch):
    import errno

    import sdict_ext.host.memory as _hostmem

    sd = {"a": torch.randn(3, 4)}
    # An old kernel (no MADV_POPULATE_WRITE): the pages are touched instead.
    monkeypatch.setattr(_hostmem, "_madvise", lambda ptr, n, advice: errno.EINVAL)
    ours = utils.create_cpu_state_dict(sd, share_memory=True)
    assert ours["a"].is_shared() and ours["a"].shape == (3, 4)
    # No memory for the pages: a clear error now, not SIGBUS at the first write.
    monkeypatch.setattr(_hostmem, "_madvise", lambda ptr, n, advice: errno.ENOMEM)
    with pytest.raises(RuntimeError, match="cannot allocate .* shared memory"):
        utils.create_cpu_state_dict(sd, share_memory=True)


def test_create_cpu_slab_is_freed_when_the_last_tensor_dies():
    sd = {"a": torch.randn(4), "b": torch.randn(2, 2)}
    ours = utils.create_cpu_state_dict(sd, share_memory=True)
    storage_ref = weakref.ref(ours["a"].untyped_storage())
    a = ours.pop("a")
    del ours
    gc.collect()
    assert storage_ref() is not None  # "a" still holds the slab
    del a
    gc.collect()
    assert storage_ref() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="behaviour without an accelerator")
def test_create_cpu_pin_memory_without_accelerator_warns_and_returns_pageable_tensors():
    sd = {"a": torch.randn(4)}
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ours = utils.create_cpu_state_dict(sd, pin_memory=True)
    assert ours["a"].shape == (4,) and not ours["a"].is_pinned()
    with pytest.raises(RuntimeError):  # PyTorch raises here
        ref._create_cpu_state_dict(sd, pin_memory=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_create_cpu_pin_and_share_registers_once_and_unregisters_on_free():
    sd = {f"t{i}": torch.randn(8, device="cuda") for i in range(10)}
    for _ in range(2):
        ours = utils.create_cpu_state_dict(sd, pin_memory=True, share_memory=True)
        assert all(t.is_pinned() and t.is_shared() for t in ours.values())
        utils.copy_state_dict(sd, ours)
        assert all(torch.equal(ours[k], sd[k].cpu()) for k in sd)
        slab = ours["t0"].untyped_storage().data_ptr()
        pinned = _hostmem._pinned[slab]  # one slab, registered once, still alive
        assert pinned.device == torch.cuda.current_device()
        del ours
        gc.collect()
        assert slab not in _hostmem._pinned  # unregistered as the last view died


class _Log:
    """What the injected CUDA stand-ins did, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    @contextlib.contextmanager
    def device_guard(self, device):
        self.calls.append(("enter device", device))
        yield
        self.calls.append(("leave device", device))

    def register(self, ptr: int, nbytes: int) -> int:
        self.calls.append(("register", ptr, nbytes))
        return 0

    def unregister(self, ptr: int) -> int:
        self.calls.append(("unregister", ptr))
        return 0

    def event(self, name: str):
        log = self

        class Event:
            def synchronize(self) -> None:
                log.calls.append(("wait for", name))

        return Event()


def test_pinned_slab_waits_for_its_copies_then_unregisters_under_its_device():
    log = _Log()
    slab = torch.empty(256, dtype=torch.uint8)
    ptr = slab.data_ptr()
    _hostmem.pin_storage(
        slab.untyped_storage(), 1,
        register=log.register, unregister=log.unregister, device_guard=log.device_guard,
    )
    assert log.calls == [("enter device", 1), ("register", ptr, 256), ("leave device", 1)]
    view = slab[16:48].view(torch.float32)
    outside = torch.empty(8)
    recorded: list = []

    def record(name: str, key: tuple):
        def marks(device):
            recorded.append(device)
            return [(key, log.event(name))]
        return marks

    # Copies on one stream: the later event stands for both. Another stream's stays.
    _hostmem.note_async_access([view], [outside], record=record("first", ("dev1", "side")))
    _hostmem.note_async_access([outside], [view], record=record("second", ("dev1", "side")))
    _hostmem.note_async_access([view], record=record("other stream", ("dev1", "main")))
    _hostmem.note_async_access([outside], record=record("not the slab", ("dev1", "side")))
    assert recorded == [None, None, None]  # CPU tensors only; not called for a copy elsewhere
    del log.calls[:]
    del slab, view
    gc.collect()
    assert log.calls[0] == ("enter device", 1) and log.calls[-1] == ("leave device", 1)
    assert sorted(log.calls[1:3]) == [("wait for", "other stream"), ("wait for", "second")]
    assert log.calls[3:-1] == [("unregister", ptr)]  # after every wait
    assert ptr not in _hostmem._pinned


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_slab_dropped_during_a_non_blocking_copy_waits_for_it():
    # record_event does nothing for cudaHostRegister memory: dropping the destination
    # right after copy_state_dict(non_blocking=True) unregistered and freed pages that
    # the copy engine was still writing.
    sd = {f"t{i}": torch.randn(1 << 22, device="cuda") for i in range(8)}  # 128 MiB
    for share in (False, True):
        dst = utils.create_cpu_state_dict(sd, pin_memory=True, share_memory=share)
        slab = dst["t0"].untyped_storage().data_ptr()
        torch.cuda._sleep(1 << 26)  # keeps the stream busy, so the copy is in flight
        utils.copy_state_dict(sd, dst, non_blocking=True)
        assert _hostmem._pinned[slab].events  # the copy was recorded against the slab
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # a failed unregister warns
            del dst
            gc.collect()
        assert [str(w.message) for w in caught] == []
        assert slab not in _hostmem._pinned
        torch.cuda.synchronize()  # no illegal address, no sticky error
    out = utils.create_cpu_state_dict(sd, pin_memory=True)
    utils.copy_state_dict(sd, out, non_blocking=True)
    torch.cuda.synchronize()
    assert all(torch.equal(out[k], sd[k].cpu()) for k in sd)


def _limits_reader(meminfo: str, status: str):
    return {"/proc/meminfo": meminfo, "/proc/self/status": status}.get


def test_fit_limits_read_available_memory_swap_rlimits_and_shm_space():
    read = _limits_reader(
        "MemTotal: 100 kB\nMemAvailable:   40 kB\nSwapFree: 8 kB\n",
        "Name: python\nVmSize:   300 kB\nVmData:  100 kB\n",
    )
    rlimits = {
        resource.RLIMIT_AS: (1024 * 1024, resource.RLIM_INFINITY),
        resource.RLIMIT_DATA: (200 * 1024, resource.RLIM_INFINITY),
    }

    class Fs:
        f_bavail, f_frsize = 3, 4096

    def limits(**kwargs):
        return dict(_hostmem.fit_limits(
            read=read, getrlimit=rlimits.__getitem__, statvfs=lambda path: Fs, **kwargs
        ))

    assert limits(pinned=True, shared=False) == {
        "MemAvailable in /proc/meminfo": 40 * 1024,
        "RLIMIT_AS (1048576 bytes) less this process's VmSize (307200 bytes)": 724 * 1024,
        "RLIMIT_DATA (204800 bytes) less this process's VmData (102400 bytes)": 100 * 1024,
    }
    # Swap can hold shared pages; RLIMIT_DATA does not count a shared mapping; a
    # segment that is a file in /dev/shm is bounded by its free space.
    assert limits(pinned=False, shared=True, shm_dir="/dev/shm") == {
        "MemAvailable + SwapFree in /proc/meminfo": 48 * 1024,
        "RLIMIT_AS (1048576 bytes) less this process's VmSize (307200 bytes)": 724 * 1024,
        "the free space of /dev/shm": 3 * 4096,
    }
    # Nothing readable (another OS), no limits set: nothing to refuse on.
    assert _hostmem.fit_limits(
        pinned=True, shared=True, read=lambda path: None,
        getrlimit=lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY),
    ) == []


def test_check_fits_names_the_size_and_the_limit():
    _hostmem.check_fits(100, "f()", [("a limit", 100)])
    with pytest.raises(RuntimeError, match=r"^f\(\): cannot allocate 101 bytes \(0.0 GiB\): "
                       r"that exceeds a limit, 100 bytes .* nothing was allocated"):
        _hostmem.check_fits(101, "f()", [("no limit", 1 << 40), ("a limit", 100)])


def test_create_cpu_share_memory_refuses_a_slab_larger_than_memory_before_allocating():
    # A 1 TiB template that costs one byte: share_memory=True populated pages until the
    # OOM killer struck. The memory-hungry part must not even start.
    huge = torch.zeros(1, dtype=torch.uint8).expand(1 << 40)
    rss = _rss_bytes()
    with pytest.raises(RuntimeError, match=r"create_cpu_state_dict\(share_memory=True\): "
                       r"shared memory: cannot allocate 1099511627\d+ bytes \(1024.0 GiB\): "
                       r"that exceeds MemAvailable"):
        utils.create_cpu_state_dict({"m": {"huge": huge, "b": torch.ones(3)}}, share_memory=True)
    assert _rss_bytes() - rss < 64 << 20


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_create_cpu_pin_memory_refuses_a_slab_larger_than_memory_before_pinning():
    huge = torch.zeros(1, dtype=torch.uint8).expand(1 << 40)
    for share in (False, True):
        with pytest.raises(RuntimeError, match=r"cannot allocate 1099511627\d+ bytes "
                           r"\(1024.0 GiB\): that exceeds MemAvailable in /proc/meminfo"):
            utils.create_cpu_state_dict({"huge": huge}, pin_memory=True, share_memory=share)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_create_cpu_state_dict_raises_for_a_sparse_tensor_naming_its_key():
    # PyTorch raises too ("Cannot access data pointer"); we returned a dense tensor.
    for sd, key, layout in (
        ({"m": {"w": torch.ones(2), "s": torch.eye(3).to_sparse()}}, "m.s", "torch.sparse_coo"),
        ({"opt": [torch.ones(2), torch.eye(3).to_sparse_csr()]}, "opt.1", "torch.sparse_csr"),
    ):
        with pytest.raises(RuntimeError):
            ref._create_cpu_state_dict(sd)
        for kwargs in ({}, {"share_memory": True}):
            with pytest.raises(RuntimeError, match=rf"create_cpu_state_dict: cannot make a CPU "
                               rf"tensor like '{key}', a {layout} tensor"):
                utils.create_cpu_state_dict(sd, **kwargs)


# ---------------------------------------------------------------- similarity / offload


def test_similarity_matches_pytorch_and_never_writes_into_the_second_argument():
    sd = _nested()
    other = utils.create_cpu_state_dict(sd)
    for t in utils.flatten_state_dict(other)[0].values():
        if isinstance(t, torch.Tensor) and t.numel():
            t.fill_(0)
    assert utils.check_state_dict_similarity(sd, other) is True
    assert torch.equal(other["model"]["w"], torch.zeros(4, 3))
    assert ref._check_state_dict_similarity(sd, other) is True
    assert torch.equal(other["model"]["w"], sd["model"]["w"])  # PyTorch's defect: it copied

    other["model"]["w"] = torch.zeros(4, 3, dtype=torch.float64)
    assert utils.check_state_dict_similarity(sd, other) is False
    assert ref._check_state_dict_similarity(sd, other) is False
    other["model"]["w"] = torch.zeros(4, 4)
    assert utils.check_state_dict_similarity(sd, other) is False
    assert ref._check_state_dict_similarity(sd, other) is False
    del other["model"]["w"]
    assert utils.check_state_dict_similarity(sd, other) is False
    assert ref._check_state_dict_similarity(sd, other) is False


def test_offload_returns_cpu_tensors_as_they_are_like_pytorch():
    sd = _nested()
    ours = utils.offload_state_dict_to_cpu(sd)
    theirs = ref._offload_state_dict_to_cpu(sd)
    assert _same(ours, theirs)
    assert ours["model"]["w"] is sd["model"]["w"] and theirs["model"]["w"] is sd["model"]["w"]


# ---------------------------------------------------------------- planning helpers


def test_buckets_never_exceed_the_ceiling_of_total_over_bucket():
    costs = [600] * 10 + [1] * 7 + [3000]
    runs = buckets(costs, 1000)
    assert len(runs) <= -(-sum(costs) // 1000)
    assert [j for r in runs for j in r] == list(range(len(costs)))
    assert buckets([], 10) == [] and len(buckets([0, 0], 10)) == 1
    with pytest.raises(ValueError, match="bucket_bytes"):
        buckets([1], 0)


def test_buckets_with_solos_isolate_big_items_within_the_same_ceiling():
    # Ceiling 2: the 1000 (a bucket) goes alone; the 400 (a quarter and more) would need
    # a third bucket, so it shares.
    assert buckets_with_solos([300, 1000, 400, 300], 1000, [True] * 4, 250) == [[0, 2, 3], [1]]
    # Ceiling 6 leaves room: every flagged item from a quarter bucket on travels alone.
    costs = [100, 3000, 400, 100, 1500, 300, 100]
    runs = buckets_with_solos(costs, 1000, [True] * len(costs), 250)
    assert runs == [[0, 3, 6], [1], [2], [4], [5]]
    # Not flagged: never alone on purpose; the ceiling always holds.
    plain = buckets_with_solos(costs, 1000, [False] * len(costs), 250)
    assert [j for r in plain for j in r] == list(range(len(costs)))
    assert len(plain) <= -(-sum(costs) // 1000)
    assert buckets_with_solos([], 10, [], 1) == []


def test_box_matches_pytorch_local_shape_and_offset_rule():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    cases = [
        ((5, 3), (4,), [Shard(0)]),
        ((3, 7), (2, 2), [Shard(0), Shard(1)]),
        ((7, 2), (2, 2), [Shard(0), Shard(0)]),
        ((1, 3), (2, 2), [Shard(0), Shard(1)]),
        ((4, 4), (2, 3), [Replicate(), Shard(1)]),
    ]
    for shape, mesh_shape, placements in cases:
        coords = [(i,) for i in range(mesh_shape[0])] if len(mesh_shape) == 1 else [
            (i, j) for i in range(mesh_shape[0]) for j in range(mesh_shape[1])
        ]
        for coord in coords:
            theirs = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord),
                                                            placements)
            ours = box_of(shape, mesh_shape, coord, placements)
            assert ours[0] == theirs[0]
            # Offsets agree wherever the box is not empty (PyTorch puts empty ones at the end).
            if all(ours[0]):
                assert ours[1] == theirs[1]


def test_gather_of_a_plain_state_dict_needs_no_process_group_like_pytorch():
    sd = _nested()
    ours = utils.gather_state_dict(sd)
    theirs = ref._gather_state_dict(sd)
    assert _same(ours, theirs)
    assert ours["model"]["w"] is sd["model"]["w"]
    assert _same(utils.gather_state_dict(sd, cpu_offload=True), theirs)


def test_create_cpu_state_dict_under_inference_mode_matches_pytorch():
    # Made under inference mode, PyTorch's copies are inference tensors; so are ours
    # (and making them must not fail there).
    with torch.inference_mode():
        sd = {
            "w": torch.ones(3, 2),
            "b": torch.zeros(4, dtype=torch.bfloat16),
            "s": torch.tensor(2.0),
        }
        ours = utils.create_cpu_state_dict(sd)
        theirs = ref._create_cpu_state_dict(sd)
    for key in sd:
        assert ours[key].is_inference() == theirs[key].is_inference() is True
        assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype
    assert torch.equal(ours["s"], theirs["s"])


def test_create_cpu_state_dict_under_fake_tensor_mode_gives_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        sd = {"w": torch.ones(3, 2), "b": torch.zeros(4, dtype=torch.bfloat16)}
        out = utils.create_cpu_state_dict(sd)
    for key, value in sd.items():
        assert isinstance(out[key], FakeTensor)
        assert out[key].shape == value.shape and out[key].dtype == value.dtype
