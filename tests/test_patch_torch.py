"""``sdict_ext.patch_torch()``: PyTorch's own state-dict names run sdict_ext's functions.

Specs: every name resolves to sdict_ext's while the patch is on and to PyTorch's after
``undo()`` (the three home modules and every torch module's ``from ... import``
binding); the handle is idempotent, reference-counted, a context manager and safe
from several threads; a name the installed torch lacks is a warning; results stay
PyTorch's, through DCP ``save`` / ``load`` / ``async_save`` and through accelerate's
FSDP2 checkpoint helpers (2 gloo ranks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import os
import subprocess
import sys
import threading
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed._state_dict_utils as torch_utils
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.utils as torch_dcp_utils
from torch.distributed.checkpoint import state_dict as T
from torch.distributed.checkpoint.staging import BlockingAsyncStager

import sdict_ext
from sdict_ext import dist as S_dist
from sdict_ext import patch_torch
from sdict_ext import state_dict as S
from sdict_ext import utils as S_utils
from tests.mp import run_on_ranks
from tests.test_state_dict import assert_same, make, train_step

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ROOT = Path(__file__).resolve().parent.parent
CALL_TIMEOUT_S = 180

# docs/API.md: PyTorch's home module and name -> sdict_ext's object.
MAPPING = {
    (torch_utils, "_iterate_state_dict"): S_utils.iterate_state_dict,
    (torch_utils, "_gather_state_dict"): S_utils.gather_state_dict,
    (torch_utils, "_offload_state_dict_to_cpu"): S_utils.offload_state_dict_to_cpu,
    (torch_utils, "_copy_state_dict"): S_utils.copy_state_dict,
    (torch_utils, "_create_cpu_state_dict"): S_utils.create_cpu_state_dict,
    (torch_utils, "_check_state_dict_similarity"): S_utils.check_state_dict_similarity,
    (torch_utils, "_broadcast_state_dict"): S_utils.broadcast_state_dict,
    (torch_utils, "_distribute_state_dict"): S_utils.distribute_state_dict,
    (torch_utils, "_traverse_state_dict"): S_utils.traverse_state_dict,
    (torch_utils, "_flatten_state_dict"): S_utils.flatten_state_dict,
    (torch_utils, "_unflatten_state_dict"): S_utils.unflatten_state_dict,
    (T, "get_model_state_dict"): S.get_model_state_dict,
    (T, "get_optimizer_state_dict"): S.get_optimizer_state_dict,
    (T, "get_state_dict"): S.get_state_dict,
    (T, "set_model_state_dict"): S.set_model_state_dict,
    (T, "set_optimizer_state_dict"): S.set_optimizer_state_dict,
    (T, "set_state_dict"): S.set_state_dict,
    (T, "_patch_model_state_dict"): S.patch_model_state_dict,
    (T, "_patch_optimizer_state_dict"): S.patch_optimizer_state_dict,
    (torch_dcp_utils, "_DistWrapper"): S_dist.DistWrapper,
    (torch_dcp_utils, "find_tensor_shard"): S_dist.find_tensor_shard,
    (torch_dcp_utils, "find_state_dict_object"): S_dist.find_state_dict_object,
    (torch_dcp_utils, "_create_file_view"): S_dist.create_file_view,
}
ORIGINALS = {key: getattr(*key) for key in MAPPING}

# Bindings made by ``from ... import`` in torch 2.13 (grep of its sources): the scan
# must find at least these (those another torch has), or DCP would keep PyTorch's code.
FROM_IMPORTS = {
    "torch.distributed.checkpoint.state_dict_saver._DistWrapper",
    "torch.distributed.checkpoint.state_dict_loader._DistWrapper",
    "torch.distributed.checkpoint._async_process_executor._DistWrapper",
    "torch.distributed.checkpoint.filesystem._create_file_view",
    "torch.distributed.checkpoint.default_planner.find_state_dict_object",
    "torch.distributed.checkpoint.staging._copy_state_dict",
    "torch.distributed.checkpoint.staging._create_cpu_state_dict",
    "torch.distributed.checkpoint.state_dict._gather_state_dict",
    "torch.distributed.checkpoint.state_dict._broadcast_state_dict",
    "torch.distributed.fsdp._optim_utils._gather_state_dict",
}


def _import_consumers() -> set[str]:
    """Load every module that binds a patched name; the bindings this torch has."""
    present = set()
    for binding in FROM_IMPORTS:
        module, name = binding.rsplit(".", 1)
        with contextlib.suppress(ImportError):
            if hasattr(importlib.import_module(module), name):
                present.add(binding)
    return present


def _bindings(objects: dict[int, object]) -> dict[str, object]:
    """``"module.name" -> object`` for every torch module attribute that is one of ``objects``."""
    found = {}
    for name, module in list(sys.modules.items()):
        if isinstance(module, types.ModuleType) and name.split(".")[0] == "torch":
            for attr, value in list(vars(module).items()):
                if id(value) in objects and objects[id(value)] is value:
                    found[f"{module.__name__}.{attr}"] = value
    return found


def _assert_unpatched() -> None:
    for key, original in ORIGINALS.items():
        assert getattr(*key) is original, f"{key[0].__name__}.{key[1]} is not PyTorch's"
    leftovers = _bindings({id(v): v for v in MAPPING.values()})
    assert not leftovers, f"still bound to sdict_ext: {sorted(leftovers)}"


@contextlib.contextmanager
def _calls_into(*modules: types.ModuleType) -> Iterator[set[str]]:
    """The names of the functions of ``modules`` that ran (in any thread) inside the block."""
    files = {m.__file__ for m in modules}
    called: set[str] = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename in files:
            called.add(frame.f_code.co_name)

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        yield called
    finally:
        sys.setprofile(None)
        threading.setprofile(None)


# --------------------------------------------------------------------------- names


def test_every_patched_name_resolves_to_sdict_ext_and_back_after_undo():
    present = _import_consumers()
    _assert_unpatched()
    before = _bindings({id(v): v for v in ORIGINALS.values()})
    assert present <= set(before), sorted(present - set(before))
    if torch.__version__.startswith("2.13."):
        assert present == FROM_IMPORTS
    ours_for = {id(ORIGINALS[key]): ours for key, ours in MAPPING.items()}
    with patch_torch() as handle:
        assert handle.active and not handle.missing
        for key, ours in MAPPING.items():
            assert getattr(*key) is ours, f"{key[0].__name__}.{key[1]}"
        for where, original in before.items():
            module, attr = where.rsplit(".", 1)
            assert getattr(sys.modules[module], attr) is ours_for[id(original)], where
        assert set(handle.replaced) == set(before)
        assert not _bindings({id(v): v for v in ORIGINALS.values()})
    assert not handle.active
    _assert_unpatched()
    assert _bindings({id(v): v for v in ORIGINALS.values()}) == before


def test_every_replacement_accepts_pytorchs_signature():
    # Callers pass arguments by PyTorch's names: each of its parameters must exist in
    # ours, in order, with its kind and default; ours may only add keyword-only extras.
    for (module, name), ours in MAPPING.items():
        theirs = list(inspect.signature(ORIGINALS[module, name]).parameters.values())
        mine = list(inspect.signature(ours).parameters.values())
        where = f"{module.__name__}.{name}"
        assert [(p.name, p.kind, p.default) for p in mine[: len(theirs)]] == [
            (p.name, p.kind, p.default) for p in theirs
        ], where
        for extra in mine[len(theirs) :]:
            assert extra.kind is inspect.Parameter.KEYWORD_ONLY, f"{where}: {extra}"
            assert extra.default is not inspect.Parameter.empty, f"{where}: {extra}"


def test_module_imported_during_the_patch_is_restored_by_undo(monkeypatch):
    consumer = types.ModuleType("torch._sdict_ext_test_consumer")
    monkeypatch.setitem(sys.modules, consumer.__name__, consumer)
    with patch_torch():
        # What ``from torch.distributed.checkpoint.state_dict import get_state_dict``
        # binds in a module first imported while the patch is on.
        consumer.get_state_dict = T.get_state_dict
        assert consumer.get_state_dict is S.get_state_dict
    assert consumer.get_state_dict is ORIGINALS[T, "get_state_dict"]


def test_patch_is_idempotent_and_reference_counted():
    first = patch_torch()
    second = patch_torch()
    try:
        assert T.get_state_dict is S.get_state_dict
        assert first.replaced == second.replaced
        first.undo()
        first.undo()
        assert not first.active and second.active
        assert T.get_state_dict is S.get_state_dict
        with patch_torch():
            assert T.get_state_dict is S.get_state_dict
        assert T.get_state_dict is S.get_state_dict
    finally:
        second.undo()
    _assert_unpatched()


def test_undo_leaves_a_name_someone_rebound_meanwhile():
    mine = object()
    try:
        with patch_torch():
            T.get_state_dict = mine
        assert T.get_state_dict is mine
        assert T.set_state_dict is ORIGINALS[T, "set_state_dict"]
    finally:
        T.get_state_dict = ORIGINALS[T, "get_state_dict"]
    _assert_unpatched()


def test_concurrent_patches_and_undos_from_threads():
    start = threading.Barrier(8)
    handles = []

    def patch_then_wait() -> None:
        start.wait()
        handles.append(patch_torch())

    threads = [threading.Thread(target=patch_then_wait) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(handles) == 8 and T.get_state_dict is S.get_state_dict
    assert len({h.replaced for h in handles}) == 1
    threads = [threading.Thread(target=h.undo) for h in handles]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    _assert_unpatched()


def test_missing_name_is_a_warning_and_the_rest_is_patched(monkeypatch):
    monkeypatch.delattr(torch_utils, "_distribute_state_dict")
    with pytest.warns(RuntimeWarning, match=r"has no torch\.distributed\._state_dict_utils\."
                      r"_distribute_state_dict; left unpatched"):
        handle = patch_torch()
    try:
        assert handle.missing == ("torch.distributed._state_dict_utils._distribute_state_dict",)
        assert torch_utils._broadcast_state_dict is S_utils.broadcast_state_dict
        assert not hasattr(torch_utils, "_distribute_state_dict")
    finally:
        handle.undo()
    assert torch_utils._broadcast_state_dict is ORIGINALS[torch_utils, "_broadcast_state_dict"]


def test_missing_module_is_a_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.distributed.checkpoint.utils", None)
    with pytest.warns(RuntimeWarning, match=r"torch\.distributed\.checkpoint\.utils\._DistWrapper"):
        handle = patch_torch()
    try:
        assert len(handle.missing) == 4
        assert T.get_state_dict is S.get_state_dict
    finally:
        handle.undo()
    monkeypatch.undo()
    _assert_unpatched()


@pytest.mark.parametrize(
    ("value", "patched", "warned"),
    [("1", True, False), ("0", False, False), ("maybe", False, True)],
)
def test_environment_variable_patches_at_import(value, patched, warned):
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "import sdict_ext, torch.distributed.checkpoint.state_dict as T\n"
        "print(T.get_state_dict is sdict_ext.get_state_dict, sdict_ext.ENV_PATCH is not None)\n"
        "if sdict_ext.ENV_PATCH: sdict_ext.ENV_PATCH.undo()\n"
        "print(T.get_state_dict is sdict_ext.get_state_dict)\n"
    )
    env = {**os.environ, "SDICT_EXT_PATCH": value, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(patched), str(patched), "False"]
    assert ("SDICT_EXT_PATCH='maybe' is not understood" in proc.stderr) == warned


# --------------------------------------------------------------------------- results


def test_options_made_before_and_after_patching_both_work():
    model = make("plain", 0, frozen=True)
    torch_get = ORIGINALS[T, "get_model_state_dict"]
    before = T.StateDictOptions(ignore_frozen_params=True)
    want = torch_get(model.wrapped, options=before)
    assert "l1.bias" not in want
    with patch_torch():
        during = T.StateDictOptions(ignore_frozen_params=True)
        assert type(during) is type(before)  # torch's class is left in place
        for opts in (before, during, dataclasses.replace(during, strict=True),
                     S.StateDictOptions(ignore_frozen_params=True)):
            assert_same(T.get_model_state_dict(model.wrapped, options=opts), want)
    # sdict_ext's options are read by PyTorch's own functions too.
    assert_same(torch_get(model.wrapped, options=S.StateDictOptions(ignore_frozen_params=True)),
                want)
    assert_same(torch_get(model.wrapped, options=during), want)


def _torch_full(model) -> tuple[dict, dict]:
    """PyTorch's own full state dict of ``model`` (whether or not the patch is on)."""
    opts = T.StateDictOptions(full_state_dict=True)
    return ORIGINALS[T, "get_state_dict"](model.wrapped, model.optim, options=opts)


def _on_rank_dcp_round_trips(path: str) -> None:
    warnings.simplefilter("ignore")
    source = make("fsdp2", 0)
    torch_sharded = ORIGINALS[T, "get_state_dict"](source.wrapped, source.optim)
    want = _torch_full(source)
    targets = {}
    with patch_torch(), _calls_into(S_dist, S_utils, S) as called:
        msd, osd = T.get_state_dict(source.wrapped, source.optim)
        assert_same((msd, osd), torch_sharded)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{path}/sync")
        dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=f"{path}/async").result()
        # DefaultStager copies by itself; this stager stages through the patched names.
        dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=f"{path}/blocking",
                       async_stager=BlockingAsyncStager()).result()
        for kind in ("sync", "async", "blocking"):
            target = targets[kind] = make("fsdp2", 1)
            tmsd, tosd = T.get_state_dict(target.wrapped, target.optim)
            dcp.load({"model": tmsd, "optim": tosd}, checkpoint_id=f"{path}/{kind}")
            T.set_state_dict(target.wrapped, target.optim, model_state_dict=tmsd,
                             optim_state_dict=tosd)
    # DCP's own modules ran sdict_ext's code: the wrapper, the file views, the staging.
    wanted = {"reduce_scatter", "all_reduce", "all_gather",
              "create_file_view", "find_state_dict_object", "create_cpu_state_dict",
              "copy_state_dict", "get_state_dict", "set_state_dict"}
    assert wanted <= called, sorted(wanted - called)
    for target in targets.values():
        assert_same(_torch_full(target), want)
    # A checkpoint written under the patch loads with PyTorch alone, and trains on alike.
    plain = make("fsdp2", 2)
    pmsd, posd = T.get_state_dict(plain.wrapped, plain.optim)
    dcp.load({"model": pmsd, "optim": posd}, checkpoint_id=f"{path}/sync")
    T.set_state_dict(plain.wrapped, plain.optim, model_state_dict=pmsd, optim_state_dict=posd)
    for model in (source, targets["async"], plain):
        train_step(model, 1)
    assert_same(_torch_full(targets["async"]), _torch_full(source))
    assert_same(_torch_full(plain), _torch_full(source))


@pytest.mark.dist
def test_dcp_save_load_and_async_save_round_trip_with_the_patch(tmp_path):
    _assert_unpatched()
    run_on_ranks(2, _on_rank_dcp_round_trips, str(tmp_path), timeout=CALL_TIMEOUT_S)


def _on_rank_accelerate(path: str, state_dict_type: str) -> None:
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin, fsdp_utils

    warnings.simplefilter("ignore")
    PartialState(cpu=True)  # accelerate's logging needs one; the group is already ours
    rank = dist.get_rank()
    # The attributes accelerate's helpers read from their Accelerator.
    accelerator = types.SimpleNamespace(
        num_processes=dist.get_world_size(), process_index=rank, is_main_process=rank == 0,
        is_fsdp2=True, wait_for_everyone=dist.barrier,
    )
    loaded, saved, ran = {}, {}, {}
    for patched in (False, True):
        out = f"{path}/{'patched' if patched else 'torch'}"
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=state_dict_type)
        source, target = make("fsdp2", 0), make("fsdp2", 1)
        patch = patch_torch() if patched else contextlib.nullcontext()
        with patch, _calls_into(S) as called:
            fsdp_utils.save_fsdp_model(plugin, accelerator, source.wrapped, out)
            fsdp_utils.save_fsdp_optimizer(plugin, accelerator, source.optim, source.wrapped, out)
            fsdp_utils.load_fsdp_model(plugin, accelerator, target.wrapped, out)
            fsdp_utils.load_fsdp_optimizer(plugin, accelerator, target.optim, target.wrapped, out)
        ran[patched] = set(called)
        loaded[patched] = _torch_full(target)
        if state_dict_type == "FULL_STATE_DICT" and rank == 0:
            saved[patched] = [torch.load(f"{out}/{name}", weights_only=True)
                              for name in ("pytorch_model_fsdp.bin", "optimizer.bin")]
        dist.barrier()
    wanted = {"get_model_state_dict", "set_model_state_dict", "get_optimizer_state_dict",
              "set_optimizer_state_dict"}
    assert wanted <= ran[True] and not ran[False], (ran[True], ran[False])
    assert_same(loaded[True], loaded[False])
    # A broadcast load turns Adam's betas into a list (PyTorch's, and so ours).
    assert_same(loaded[True], _torch_full(make("fsdp2", 0)), tuple_is_list=True)
    if saved:
        assert_same(saved[True], saved[False])


@pytest.mark.dist
@pytest.mark.parametrize("state_dict_type", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_accelerate_fsdp2_checkpoints_equal_with_and_without_the_patch(tmp_path, state_dict_type):
    try:
        import accelerate.utils.fsdp_utils  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"accelerate is not importable ({exc}); `make setup` installs it")
    run_on_ranks(2, _on_rank_accelerate, str(tmp_path), state_dict_type, timeout=CALL_TIMEOUT_S)
    _assert_unpatched()


def test_top_level_exports():
    assert sdict_ext.patch_torch is patch_torch
    assert "patch_torch" in sdict_ext.__all__ and "TorchPatch" in sdict_ext.__all__
