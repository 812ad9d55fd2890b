"""Tests for sdict_ext.state_dict, against torch.distributed.checkpoint.state_dict.

Every model kind (plain, DDP, FSDP1 with and without ``use_orig_params``, FSDP2, tensor
parallel, ``torch.compile``d, activation-checkpointed) is checked two ways on 2 gloo
ranks: our get_* returns bit-exactly what PyTorch's returns (keys, values, DTensor /
ShardedTensor layouts, optimizer state and param groups), and loading a state dict with
our set_* and then training one step gives the same parameters and optimizer state as
PyTorch's set_* plus the same step, and as the source model taking that step itself.
Where PyTorch 2.13 is wrong (see ../shared/API.md) the reference is the right answer.
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint import state_dict as T
from torch.distributed.tensor import DTensor

from sdict_ext import state_dict as S
from tests.mp import run_fresh, run_on_ranks

# --------------------------------------------------------------------------- models

KINDS = ("plain", "ddp", "fsdp1_orig", "fsdp1_flat", "fsdp1_root", "fsdp2", "tp", "compile", "ac")


class Net(nn.Module):
    """Embedding, three linears, a persistent and a non-persistent buffer.

    ``tied``: the head's weight is the embedding's (GPT-2, Llama-3.2-1B, Gemma), so one
    parameter has two FQNs and every path must move it once and fill both keys.
    """

    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx) * self.scale
        return self.head(self.l2(torch.relu(self.l1(x))))


class Model:
    """A wrapped model, the module to run forward on, and its AdamW (two param groups)."""

    def __init__(self, wrapped: nn.Module, net: nn.Module, optim: torch.optim.Optimizer) -> None:
        self.wrapped = wrapped
        self.forward_module = net
        self.optim = optim


def make(
    kind: str, seed: int, *, tied: bool = True, frozen: bool = False, lazy: bool = False
) -> Model:
    """Build ``kind`` around a ``Net`` from ``seed``; step once on fixed data unless ``lazy``.

    Tied weights sit in one FSDP unit, as real trainers wrap them (FSDP2 refuses a
    parameter shared by two groups, FSDP1 cannot unflatten one).
    """
    torch.manual_seed(seed)
    net = Net(tied=tied)
    if frozen:
        net.l1.bias.requires_grad_(False)
    wrapped: nn.Module = net
    forward_module: nn.Module = net
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = forward_module = DDP(net)
    elif kind in ("fsdp1_orig", "fsdp1_flat", "fsdp1_root"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        own_units = (net.l1, net.l2) if tied else (net.emb, net.l1, net.l2, net.head)
        # fsdp1_root: one flat parameter for the whole model, so each param group's
        # parameters are empty shards on some rank.
        wrapped = forward_module = FSDP(
            net,
            device_id=torch.device("cpu"),
            use_orig_params=kind != "fsdp1_flat",
            auto_wrap_policy=None
            if kind == "fsdp1_root"
            else functools.partial(
                lambda_auto_wrap_policy, lambda_fn=lambda m: any(m is u for u in own_units)
            ),
        )
    elif kind in ("fsdp2", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # hsdp: FSDP2 on a 2-D (replicate, shard) mesh, for an even number of ranks.
        ws = dist.get_world_size()
        if kind == "fsdp2":
            mesh = init_device_mesh("cpu", (ws,))
        else:
            mesh = init_device_mesh("cpu", (ws // 2, 2), mesh_dim_names=("replicate", "shard"))
        units = [[net.emb, net.head]] if tied else [net.emb, net.head]
        for unit in [*units, net.l1, net.l2]:
            fully_shard(unit, mesh=mesh)
        fully_shard(net, mesh=mesh)
    elif kind == "tp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        parallelize_module(net, mesh, {"l1": ColwiseParallel(), "l2": RowwiseParallel()})
    elif kind == "compile":
        # Compilation is lazy: forward runs on the eager module, so nothing is compiled.
        wrapped = torch.compile(net)
    elif kind == "ac":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            apply_activation_checkpointing,
            checkpoint_wrapper,
        )

        apply_activation_checkpointing(
            net,
            checkpoint_wrapper_fn=checkpoint_wrapper,
            check_fn=lambda m: isinstance(m, nn.Linear),
        )
    elif kind != "plain":
        raise ValueError(kind)
    trainable = lambda mods: [p for m in mods for p in m.parameters() if p.requires_grad]  # noqa: E731
    first = trainable([net.emb, net.l1])
    second = [p for p in trainable([net.l2, net.head]) if all(p is not q for q in first)]
    optim = torch.optim.AdamW(
        [{"params": first}, {"params": second, "lr": 1e-3, "weight_decay": 0.1}], lr=1e-2
    )
    model = Model(wrapped, forward_module, optim)
    if not lazy:
        train_step(model, 0)
    return model


def train_step(model: Model, data_seed: int) -> None:
    """One forward / backward / step on data fixed by ``data_seed`` (equal on all ranks)."""
    g = torch.Generator().manual_seed(100 + data_seed)
    idx = torch.randint(0, 10, (4, 3), generator=g)
    model.forward_module(idx).pow(2).mean().backward()
    model.optim.step()
    model.optim.zero_grad()


def _is_dtensor(x: Any) -> bool:
    return isinstance(x, DTensor)


def assert_same(ours: Any, theirs: Any, path: str = "", *, tuple_is_list: bool = False) -> None:
    """Bit-exact equality of two state dicts: keys, types, dtypes, shapes, placements.

    ``tuple_is_list`` accepts a list where a tuple is expected: a full-state-dict
    optimizer load turns Adam's ``betas`` into a list (PyTorch's, and so ours).
    """
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), f"{path}: {type(ours).__name__} is not a dict"
        assert set(ours) == set(theirs), (
            f"{path}: keys differ: {sorted(map(str, set(ours) ^ set(theirs)))}"
        )
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{path}.{key}", tuple_is_list=tuple_is_list)
    elif isinstance(theirs, (list, tuple)):
        same_type = type(ours) is type(theirs) or (
            tuple_is_list and isinstance(ours, (list, tuple))
        )
        assert same_type and len(ours) == len(theirs), f"{path}: {ours!r} vs {theirs!r}"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same(a, b, f"{path}[{i}]", tuple_is_list=tuple_is_list)
    elif isinstance(theirs, ShardedTensor):
        assert isinstance(ours, ShardedTensor), f"{path}: not a ShardedTensor"
        assert ours.metadata() == theirs.metadata(), f"{path}: sharding metadata differs"
        assert len(ours.local_shards()) == len(theirs.local_shards()), (
            f"{path}: shard counts differ"
        )
        for a, b in zip(ours.local_shards(), theirs.local_shards(), strict=True):
            assert a.metadata == b.metadata, f"{path}: {a.metadata} vs {b.metadata}"
            assert_same(a.tensor, b.tensor, f"{path}(shard {a.metadata.shard_offsets})")
    elif _is_dtensor(theirs):
        assert _is_dtensor(ours), f"{path}: not a DTensor"
        assert ours.placements == theirs.placements, (
            f"{path}: {ours.placements} vs {theirs.placements}"
        )
        assert ours.device_mesh == theirs.device_mesh, f"{path}: meshes differ"
        assert ours.shape == theirs.shape, f"{path}: {ours.shape} vs {theirs.shape}"
        assert_same(ours.to_local(), theirs.to_local(), f"{path}(local)")
    elif isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and not _is_dtensor(ours), (
            f"{path}: {type(ours).__name__}"
        )
        assert ours.dtype == theirs.dtype, f"{path}: {ours.dtype} vs {theirs.dtype}"
        assert ours.shape == theirs.shape, f"{path}: {ours.shape} vs {theirs.shape}"
        assert ours.device == theirs.device, f"{path}: {ours.device} vs {theirs.device}"
        assert torch.equal(ours, theirs), f"{path}: values differ"
    else:
        assert type(ours) is type(theirs) and ours == theirs, f"{path}: {ours!r} vs {theirs!r}"


def storages(obj: Any) -> set[int]:
    """Data pointers of every (local) tensor storage in a nested state dict."""
    out: set[int] = set()
    if isinstance(obj, dict):
        for v in obj.values():
            out |= storages(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out |= storages(v)
    elif isinstance(obj, ShardedTensor):
        out |= storages([shard.tensor for shard in obj.local_shards()])
    elif isinstance(obj, torch.Tensor):
        local = obj.to_local() if _is_dtensor(obj) else obj
        if local.untyped_storage().nbytes():
            out.add(local.untyped_storage().data_ptr())
    return out


def live_storages(model: Model) -> set[int]:
    """Storages of the model's parameters / buffers and its optimizer state."""
    tensors = list(model.wrapped.parameters()) + list(model.wrapped.buffers())
    return storages(tensors) | storages(list(model.optim.state.values()))


def clone(obj: Any) -> Any:
    """A deep copy of a state dict, so neither side of a comparison sees the other's writes."""
    return copy.deepcopy(obj)


CALL_TIMEOUT_S = 120
FSDP1 = ("fsdp1_orig", "fsdp1_flat", "fsdp1_root")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

GET_OPTIONS = (
    {},
    {"full_state_dict": True},
    {"cpu_offload": True},
    {"full_state_dict": True, "cpu_offload": True},
    {"flatten_optimizer_state_dict": True},
    {"full_state_dict": True, "flatten_optimizer_state_dict": True},
)


def _quiet() -> None:
    warnings.simplefilter("ignore")


# --------------------------------------------------------------------------- get


def _on_rank_get_matches_pytorch(kind: str) -> list[str]:
    _quiet()
    model = make(kind, 0)
    checked = []
    for opts in GET_OPTIONS:
        if kind in FSDP1 and opts.get("cpu_offload"):
            continue  # PyTorch segfaults here on a CPU device: see the FSDP1 offload test
        ours = S.get_state_dict(model.wrapped, model.optim, options=S.StateDictOptions(**opts))
        theirs = T.get_state_dict(model.wrapped, model.optim, options=T.StateDictOptions(**opts))
        assert_same(ours, theirs, str(opts))
        assert_same(
            S.get_model_state_dict(model.wrapped, options=S.StateDictOptions(**opts)), theirs[0]
        )
        assert_same(
            S.get_optimizer_state_dict(
                model.wrapped, model.optim, options=S.StateDictOptions(**opts)
            ),
            theirs[1],
        )
        checked.append(str(opts))
    return checked


@pytest.mark.dist
@pytest.mark.parametrize("kind", KINDS)
def test_get_state_dict_equals_pytorch(kind):
    results = run_on_ranks(2, _on_rank_get_matches_pytorch, kind, timeout=CALL_TIMEOUT_S)
    assert results[0] == results[1] and len(results[0]) >= 4


def _on_rank_fsdp1_cpu_offload(kind: str) -> tuple[list[str], int]:
    _quiet()
    model = make(kind, 0)
    full = T.get_state_dict(
        model.wrapped, model.optim, options=T.StateDictOptions(full_state_dict=True)
    )
    ours = S.get_state_dict(
        model.wrapped,
        model.optim,
        options=S.StateDictOptions(full_state_dict=True, cpu_offload=True),
    )
    if dist.get_rank() == 0:
        assert_same(ours, full)
    else:
        assert ours == ({}, {})
    sharded = S.get_state_dict(
        model.wrapped, model.optim, options=S.StateDictOptions(cpu_offload=True)
    )
    theirs = T.get_state_dict(model.wrapped, model.optim)
    assert_same(sharded, theirs)
    assert not storages(sharded) & live_storages(model), "sharded offload aliases live tensors"
    return sorted(ours[0]), len(storages(ours) & live_storages(model))


@pytest.mark.dist
@pytest.mark.parametrize("kind", FSDP1)
def test_fsdp1_full_state_dict_with_cpu_offload_is_rank0_only_and_does_not_crash(kind):
    (keys0, shared0), (keys1, shared1) = run_on_ranks(
        2, _on_rank_fsdp1_cpu_offload, kind, timeout=CALL_TIMEOUT_S
    )
    assert keys0 == [
        "emb.weight",
        "head.weight",
        "l1.bias",
        "l1.weight",
        "l2.bias",
        "l2.weight",
        "scale",
    ]
    assert keys1 == [] and shared0 == shared1 == 0


def _on_rank_offload_is_a_snapshot(kind: str) -> None:
    _quiet()
    model = make(kind, 0)
    for opts in ({"full_state_dict": True, "cpu_offload": True}, {"cpu_offload": True}):
        msd, osd = S.get_state_dict(model.wrapped, model.optim, options=S.StateDictOptions(**opts))
        assert not storages((msd, osd)) & live_storages(model), (
            f"{opts}: result aliases live tensors"
        )
    snapshot = clone((msd, osd))
    train_step(model, 1)
    assert_same((msd, osd), snapshot)


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["plain", "fsdp2", "tp"])
def test_cpu_offloaded_state_dict_never_aliases_live_parameters_or_step(kind):
    run_on_ranks(2, _on_rank_offload_is_a_snapshot, kind, timeout=CALL_TIMEOUT_S)


def _on_rank_lazy_and_frozen(kind: str) -> None:
    _quiet()
    for opts in ({}, {"full_state_dict": True}, {"ignore_frozen_params": True}):
        ours_model = make(kind, 0, frozen=True, lazy=True)
        theirs_model = make(kind, 0, frozen=True, lazy=True)
        ours = S.get_state_dict(
            ours_model.wrapped, ours_model.optim, options=S.StateDictOptions(**opts)
        )
        theirs = T.get_state_dict(
            theirs_model.wrapped, theirs_model.optim, options=T.StateDictOptions(**opts)
        )
        assert_same(ours, theirs, str(opts))
        if opts.get("ignore_frozen_params"):
            assert "l1.bias" not in ours[0] and "l1.weight" in ours[0]
        # Lazy initialisation must not move parameters (zero grads, zero learning rate).
        assert_same(
            T.get_model_state_dict(
                ours_model.wrapped, options=T.StateDictOptions(full_state_dict=True)
            ),
            T.get_model_state_dict(
                make(kind, 0, frozen=True, lazy=True).wrapped,
                options=T.StateDictOptions(full_state_dict=True),
            ),
        )


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_lazy_optimizer_and_frozen_params_equal_pytorch(kind):
    run_on_ranks(2, _on_rank_lazy_and_frozen, kind, timeout=CALL_TIMEOUT_S)


def test_plain_model_without_process_group_equals_pytorch():
    for tied in (False, True):
        model = make("plain", 0, tied=tied, frozen=True)
        for opts in GET_OPTIONS + ({"ignore_frozen_params": True},):
            ours = S.get_state_dict(model.wrapped, model.optim, options=S.StateDictOptions(**opts))
            theirs = T.get_state_dict(
                model.wrapped, model.optim, options=T.StateDictOptions(**opts)
            )
            assert_same(ours, theirs, f"tied={tied} {opts}")
    assert "head.weight" in ours[0] and "emb.weight" in ours[0]


def test_submodules_with_and_without_prefixes_equal_pytorch():
    model = make("plain", 0)
    for keep in (True, False):
        opts = dict(keep_submodule_prefixes=keep)
        ours = S.get_model_state_dict(
            model.wrapped, submodules={model.wrapped.l1}, options=S.StateDictOptions(**opts)
        )
        theirs = T.get_model_state_dict(
            model.wrapped, submodules={model.wrapped.l1}, options=T.StateDictOptions(**opts)
        )
        assert_same(ours, theirs)
        assert set(ours) == ({"l1.weight", "l1.bias"} if keep else {"weight", "bias"})


def test_several_optimizers_combine_and_split_like_pytorch():
    torch.manual_seed(0)
    net = Net(tied=False)  # each parameter in one optimizer
    optims = [
        torch.optim.AdamW(list(net.emb.parameters()) + list(net.l1.parameters()), lr=1e-2),
        torch.optim.SGD(
            list(net.l2.parameters()) + list(net.head.parameters()), lr=0.1, momentum=0.9
        ),
    ]
    net(torch.arange(6).view(2, 3)).sum().backward()
    for optim in optims:
        optim.step()
    ours = S.get_optimizer_state_dict(net, optims)
    assert_same(ours, T.get_optimizer_state_dict(net, optims))
    assert len(ours["param_groups"]) == 2 and set(ours["state"]["l2.weight"]) == {"momentum_buffer"}

    torch.manual_seed(1)
    fresh = Net(tied=False)
    fresh_optims = [
        torch.optim.AdamW(list(fresh.emb.parameters()) + list(fresh.l1.parameters()), lr=1e-2),
        torch.optim.SGD(
            list(fresh.l2.parameters()) + list(fresh.head.parameters()), lr=0.1, momentum=0.9
        ),
    ]
    S.set_optimizer_state_dict(fresh, fresh_optims, clone(ours))
    for want, got in zip(optims, fresh_optims, strict=True):
        assert_same(got.state_dict(), want.state_dict())


def test_extra_state_round_trips():
    class WithExtra(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.note = {"epoch": 0}

        def get_extra_state(self):
            return dict(self.note)

        def set_extra_state(self, state):
            self.note = dict(state)

    src, dst = WithExtra(), WithExtra()
    src.note["epoch"] = 7
    ours = S.get_model_state_dict(src)
    assert_same(ours, T.get_model_state_dict(src))
    S.set_model_state_dict(dst, ours)
    assert dst.note == {"epoch": 7} and torch.equal(dst.lin.weight, src.lin.weight)


def test_fqn_modifiers_drop_the_declared_path_component():
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

    class Hidden(nn.Module):
        """Saves its child's tensors without the ``inner.`` component (via hooks)."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()
            self._register_state_dict_hook(Hidden._drop)
            self._register_load_state_dict_pre_hook(Hidden._add, with_module=True)

        def _fqn_modifiers(self):
            return {"lin": "inner"}

        @staticmethod
        def _drop(module, state_dict, prefix, local_metadata):
            for key in [k for k in state_dict if k.startswith(f"{prefix}inner.")]:
                state_dict[prefix + key[len(prefix) + len("inner.") :]] = state_dict.pop(key)

        def _add(self, state_dict, prefix, *args):
            for key in [k for k in state_dict if k.startswith(f"{prefix}lin.")]:
                state_dict[f"{prefix}inner.{key[len(prefix) :]}"] = state_dict.pop(key)

    model = nn.Sequential(Hidden())
    ours = S.get_model_state_dict(model)
    assert_same(ours, T.get_model_state_dict(model))
    assert set(ours) == {"0.lin.weight", "0.lin.bias"}
    other = nn.Sequential(Hidden())
    assert S.set_model_state_dict(other, clone(ours)) == ([], [])
    assert torch.equal(other[0].inner.lin.weight, model[0].inner.lin.weight)


# --------------------------------------------------------------------------- set

MODES = ("sharded", "full", "broadcast")
_MODE_OPTIONS = {
    "sharded": {},
    "full": {"full_state_dict": True},
    "broadcast": {"full_state_dict": True, "broadcast_from_rank0": True},
}


def _full(model) -> tuple[dict, dict]:
    return T.get_state_dict(
        model.wrapped, model.optim, options=T.StateDictOptions(full_state_dict=True)
    )


def _on_rank_set_then_step(kind: str, mode: str) -> None:
    _quiet()
    source = make(kind, 0)
    opts = _MODE_OPTIONS[mode]
    given = S.get_state_dict(source.wrapped, source.optim) if mode == "sharded" else _full(source)
    if mode == "broadcast" and dist.get_rank() != 0:
        given = ({}, {})  # PyTorch's set_state_dict mismatches collectives here; ours must not
    ours_in, theirs_in, untouched = clone(given), clone(given), clone(given)

    ours, theirs = make(kind, 1, lazy=True), make(kind, 1, lazy=True)
    result = S.set_state_dict(
        ours.wrapped,
        ours.optim,
        model_state_dict=ours_in[0],
        optim_state_dict=ours_in[1],
        options=S.StateDictOptions(**opts),
    )
    assert tuple(result) == ([], [])
    if (kind, mode) in _PYTORCH_CANNOT:
        theirs = None
    elif mode == "broadcast":
        T.set_model_state_dict(theirs.wrapped, theirs_in[0], options=T.StateDictOptions(**opts))
        T.set_optimizer_state_dict(
            theirs.wrapped, theirs.optim, theirs_in[1], options=T.StateDictOptions(**opts)
        )
    else:
        T.set_state_dict(
            theirs.wrapped,
            theirs.optim,
            model_state_dict=theirs_in[0],
            optim_state_dict=theirs_in[1],
            options=T.StateDictOptions(**opts),
        )
    assert_same(ours_in, untouched, "the caller's state dicts")
    # What the loaded optimizer holds, container types included (a full load turns Adam's
    # ``betas`` into a list in PyTorch, and so in ours). FSDP1 loses the first param
    # group's state in PyTorch (../shared/API.md): there only the types must agree.
    if theirs is None:
        pass
    elif kind in FSDP1:
        assert _group_types(ours.optim) == _group_types(theirs.optim)
    else:
        assert_same(ours.optim.state_dict(), theirs.optim.state_dict(), "optimizer.state_dict()")

    loaded = [m for m in (source, ours, theirs) if m is not None]
    for model in loaded:
        train_step(model, 1)
    assert_same(ours_in, untouched, "the caller's state dicts after a step")
    expected = _full(source)
    for model in loaded[1:]:
        assert_same(_full(model), expected, tuple_is_list=True)


# PyTorch 2.13 fails these loads of the tied model (../shared/API.md): ranks other than 0
# raise "Missing key(s) in state_dict: head.weight" while rank 0 waits in a collective.
_PYTORCH_CANNOT = {("fsdp1_flat", "broadcast")}


def _group_types(optim: torch.optim.Optimizer) -> list[dict[str, str]]:
    return [{k: type(v).__name__ for k, v in g.items()} for g in optim.state_dict()["param_groups"]]


@pytest.mark.dist
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_set_state_dict_then_step_equals_pytorch_and_the_source(kind, mode):
    run_on_ranks(2, _on_rank_set_then_step, kind, mode, timeout=CALL_TIMEOUT_S)


def test_set_state_dict_never_adopts_the_callers_step_tensors():
    source = make("plain", 0)
    given = S.get_state_dict(source.wrapped, source.optim)
    snapshot = clone(given)
    target = make("plain", 1, lazy=True)
    S.set_state_dict(
        target.wrapped, target.optim, model_state_dict=given[0], optim_state_dict=given[1]
    )
    assert not storages(list(target.optim.state.values())) & storages(given[1])
    train_step(target, 1)
    assert_same(given, snapshot)
    assert_same(target.optim.state_dict()["state"][0]["step"], torch.tensor(2.0))


def _on_rank_bad_input_rejected_everywhere(kind: str) -> str:
    """Rank 1 passes a bad state dict, rank 0 a good one: rank 0 must fail as well (else
    it would wait in a collective, or its replica would silently diverge)."""
    _quiet()
    model = make(kind, 0)
    msd, osd = clone(
        S.get_state_dict(
            model.wrapped, model.optim, options=S.StateDictOptions(full_state_dict=True)
        )
    )
    if dist.get_rank() == 1:  # only one rank's input is bad
        msd["l1.weight"] = torch.zeros(3, 3)
        msd["l2.bias"] = msd["l2.bias"].double()
        del msd["scale"]
        msd["extra.weight"] = torch.zeros(1)
        osd["state"]["l2.weight"]["exp_avg"] = torch.zeros(5)
    target = make(kind, 1)
    before = clone(_full(target))
    try:
        S.set_state_dict(
            target.wrapped,
            target.optim,
            model_state_dict=msd,
            optim_state_dict=osd,
            options=S.StateDictOptions(full_state_dict=True),
        )
    except RuntimeError as exc:
        message = str(exc)
    else:
        raise AssertionError("a bad state dict was accepted")
    assert_same(_full(target), before)
    return message


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_mismatched_keys_shapes_dtypes_raise_on_every_rank_and_load_nothing(kind):
    messages = run_on_ranks(2, _on_rank_bad_input_rejected_everywhere, kind, timeout=CALL_TIMEOUT_S)
    assert messages[0] == messages[1] and messages[0].startswith("state dict load rejected")
    for message in messages:
        for part in (
            'Missing key(s) in state_dict: "scale". ',
            'Unexpected key(s) in state_dict: "extra.weight". ',
            "'l1.weight': shape (3, 3) does not match the model's (16, 8)",
            "'l2.bias': dtype torch.float64 does not match the model's torch.float32",
            "'state.l2.weight.exp_avg': shape (5,) does not match the optimizer's (8, 16)",
        ):
            assert part in message, message


def test_strict_errors_use_pytorchs_wording_and_load_nothing():
    source = make("plain", 0)
    for drop, add in ((["scale"], []), ([], ["extra.weight"]), (["scale", "l1.bias"], ["x", "y"])):
        msd = clone(S.get_model_state_dict(source.wrapped))
        for key in drop:
            del msd[key]
        for key in add:
            msd[key] = torch.zeros(1)
        ours_model, theirs_model = make("plain", 1), make("plain", 1)
        before = clone(ours_model.wrapped.state_dict())
        with pytest.raises(RuntimeError) as ours:
            S.set_model_state_dict(ours_model.wrapped, clone(msd))
        with pytest.raises(RuntimeError) as theirs:
            T.set_model_state_dict(theirs_model.wrapped, clone(msd))
        # PyTorch's whole message (header and one line per kind) is part of ours.
        assert str(theirs.value) in str(ours.value), (str(ours.value), str(theirs.value))
        assert_same(ours_model.wrapped.state_dict(), before)


def test_strict_false_reports_incompatible_keys_like_pytorch():
    source = make("plain", 0)
    msd = clone(S.get_model_state_dict(source.wrapped))
    del msd["scale"]
    msd["extra"] = torch.zeros(1)
    ours_model, theirs_model = make("plain", 1), make("plain", 1)
    opts = dict(strict=False)
    ours = S.set_model_state_dict(
        ours_model.wrapped, clone(msd), options=S.StateDictOptions(**opts)
    )
    theirs = T.set_model_state_dict(
        theirs_model.wrapped, clone(msd), options=T.StateDictOptions(**opts)
    )
    assert ours == theirs == (["scale"], ["extra"])
    assert_same(ours_model.wrapped.state_dict(), theirs_model.wrapped.state_dict())


def test_flattened_optimizer_state_dict_round_trips():
    source = make("plain", 0, tied=True)
    opts = S.StateDictOptions(flatten_optimizer_state_dict=True)
    msd, osd = S.get_state_dict(source.wrapped, source.optim, options=opts)
    assert "state.l1.weight.exp_avg" in osd and osd["param_groups.l2.weight.lr"] == 1e-3
    target = make("plain", 1, tied=True, lazy=True)
    S.set_state_dict(
        target.wrapped,
        target.optim,
        model_state_dict=clone(msd),
        optim_state_dict=clone(osd),
        options=opts,
    )
    assert_same(
        S.get_state_dict(target.wrapped, target.optim),
        S.get_state_dict(source.wrapped, source.optim),
    )


def test_patched_model_and_optimizer_use_fqn_state_dicts():
    source, target = make("plain", 0), make("plain", 1)
    for model in (source, target):
        S.patch_model_state_dict(model.wrapped)
        S.patch_optimizer_state_dict(model.wrapped, optimizers=model.optim)
    osd = source.optim.state_dict()
    assert "l1.weight" in osd["state"]
    target.wrapped.load_state_dict(clone(source.wrapped.state_dict()))
    target.optim.load_state_dict(clone(osd))
    assert_same(target.optim.state_dict(), osd)
    assert_same(target.wrapped.state_dict(), source.wrapped.state_dict())


def _on_rank_patches_see_through_each_other(kind: str) -> None:
    """PyTorch's get/set on a model we patched, and ours on one PyTorch patched."""
    _quiet()
    reference = make(kind, 0)
    want = _full(reference)
    for patch_model, patch_optim, functions in (
        (S.patch_model_state_dict, S.patch_optimizer_state_dict, T),
        (T._patch_model_state_dict, T._patch_optimizer_state_dict, S),
    ):
        model = make(kind, 0)
        patch_model(model.wrapped)
        patch_optim(model.wrapped, optimizers=(model.optim,))
        got = functions.get_state_dict(
            model.wrapped, model.optim, options=functions.StateDictOptions(full_state_dict=True)
        )
        assert_same(got, want, functions.__name__)
        assert_same(functions.get_model_state_dict(model.wrapped), T.get_model_state_dict(
            reference.wrapped
        ))
        target = make(kind, 1, lazy=True)
        patch_model(target.wrapped)
        patch_optim(target.wrapped, optimizers=(target.optim,))
        functions.set_state_dict(
            target.wrapped,
            target.optim,
            model_state_dict=clone(got[0]),
            optim_state_dict=clone(got[1]),
            options=functions.StateDictOptions(full_state_dict=True),
        )
        assert_same(_full(target), want, functions.__name__, tuple_is_list=True)


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_pytorch_functions_see_through_our_patches_and_ours_through_pytorchs(kind):
    run_on_ranks(2, _on_rank_patches_see_through_each_other, kind, timeout=CALL_TIMEOUT_S)


def _on_rank_dcp_fsdp2_to_plain(path: str) -> None:
    import torch.distributed.checkpoint as dcp

    _quiet()
    source = make("fsdp2", 0)
    msd, osd = S.get_state_dict(source.wrapped, source.optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)

    full = S.StateDictOptions(full_state_dict=True)
    target = make("plain", 1, lazy=True)
    tmsd, tosd = S.get_state_dict(target.wrapped, target.optim, options=full)
    dcp.load({"model": tmsd, "optim": tosd}, checkpoint_id=path)
    S.set_state_dict(
        target.wrapped, target.optim, model_state_dict=tmsd, optim_state_dict=tosd, options=full
    )
    loaded = S.get_state_dict(target.wrapped, target.optim, options=full)
    assert_same(loaded, _full(source), tuple_is_list=True)
    for model in (source, target):
        train_step(model, 1)
    loaded = S.get_state_dict(target.wrapped, target.optim, options=full)
    assert_same(loaded, _full(source), tuple_is_list=True)


@pytest.mark.dist
def test_dcp_checkpoint_of_fsdp2_loads_into_a_plain_model_with_full_state_dict(tmp_path):
    run_on_ranks(2, _on_rank_dcp_fsdp2_to_plain, str(tmp_path), timeout=CALL_TIMEOUT_S)


def test_broadcast_from_rank0_requires_full_state_dict():
    model = make("plain", 0)
    with pytest.raises(ValueError, match="full_state_dict must be True"):
        S.set_model_state_dict(
            model.wrapped, {}, options=S.StateDictOptions(broadcast_from_rank0=True)
        )


def test_accepts_pytorch_options_and_the_deprecated_submodule_keyed_form():
    source, target = make("plain", 0), make("plain", 1)
    opts = T.StateDictOptions(cpu_offload=True)
    ours = S.get_model_state_dict(source.wrapped, options=opts)
    assert_same(ours, T.get_model_state_dict(source.wrapped, options=opts))
    by_module = {target.wrapped.l1: {"weight": ours["l1.weight"], "bias": ours["l1.bias"]}}
    with pytest.warns(FutureWarning, match="deprecated"):
        result = S.set_model_state_dict(
            target.wrapped, by_module, options=S.StateDictOptions(strict=False)
        )
    assert torch.equal(target.wrapped.l1.weight, source.wrapped.l1.weight)
    assert "l2.weight" in result.missing_keys and not result.unexpected_keys


def _on_rank_offloaded_round_trip(kind: str) -> str:
    _quiet()
    source = make(kind, 0)
    offloaded = S.StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = S.get_state_dict(source.wrapped, source.optim, options=offloaded)
    assert bool(msd) == bool(osd) == (dist.get_rank() == 0)
    target = make(kind, 1, lazy=True)
    before = _full(target)
    try:
        S.set_state_dict(
            target.wrapped,
            target.optim,
            model_state_dict=clone(msd),
            optim_state_dict=clone(osd),
            options=offloaded,
        )
    except RuntimeError as exc:
        message = str(exc)
    else:
        raise AssertionError("rank 1's empty dicts were loaded without broadcast_from_rank0")
    assert_same(_full(target), before)
    S.set_state_dict(
        target.wrapped,
        target.optim,
        model_state_dict=msd,
        optim_state_dict=osd,
        options=S.StateDictOptions(
            full_state_dict=True, cpu_offload=True, broadcast_from_rank0=True
        ),
    )
    for model in (source, target):
        train_step(model, 1)
    assert_same(_full(target), _full(source), tuple_is_list=True)
    return message


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["fsdp1_orig", "fsdp2"])
def test_rank0_only_offloaded_state_dict_loads_with_broadcast_and_not_without(kind):
    messages = run_on_ranks(2, _on_rank_offloaded_round_trip, kind, timeout=CALL_TIMEOUT_S)
    assert messages[0] == messages[1]
    assert "ranks [1] passed empty state dicts" in messages[0]
    assert "broadcast_from_rank0=True" in messages[0]


def _flat_params_model(seed: int, *, lazy: bool) -> Model:
    """FSDP1 without ``use_orig_params``, tied, with the optimizer over the flat parameters.

    What a trainer builds from ``wrapped.parameters()``: the root unit's flat parameter
    holds the tied embedding/head (flattened once, under ``emb.weight``), in its own
    param group; the two inner units' flat parameters in a second one.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    torch.manual_seed(seed)
    net = Net(tied=True)
    wrapped = FSDP(
        net,
        device_id=torch.device("cpu"),
        use_orig_params=False,
        auto_wrap_policy=functools.partial(
            lambda_auto_wrap_policy, lambda_fn=lambda m: m is net.l1 or m is net.l2
        ),
    )
    inner = [p for m in (wrapped.l1, wrapped.l2) for p in m.parameters()]
    root = [p for p in wrapped.parameters() if all(p is not q for q in inner)]
    optim = torch.optim.AdamW(
        [{"params": root}, {"params": inner, "lr": 1e-3, "weight_decay": 0.1}], lr=1e-2
    )
    model = Model(wrapped, wrapped, optim)
    if not lazy:
        train_step(model, 0)
    return model


def _on_rank_flat_params_tied_optimizer_load(mode: str) -> None:
    _quiet()
    opts = _MODE_OPTIONS[mode]
    source = _flat_params_model(0, lazy=False)
    get_opts = {"full_state_dict": bool(opts)}
    theirs_get = T.get_optimizer_state_dict(
        source.wrapped, source.optim, options=T.StateDictOptions(**get_opts)
    )
    ours_get = S.get_optimizer_state_dict(
        source.wrapped, source.optim, options=S.StateDictOptions(**get_opts)
    )
    assert_same(ours_get, theirs_get)
    # The tied parameter's state is under its first name only, where PyTorch wrote it.
    assert "emb.weight" in theirs_get["state"] and "head.weight" not in theirs_get["state"]
    given = theirs_get if mode != "broadcast" or dist.get_rank() == 0 else {}
    ours, theirs = _flat_params_model(1, lazy=True), _flat_params_model(1, lazy=True)
    S.set_optimizer_state_dict(
        ours.wrapped, ours.optim, clone(given), options=S.StateDictOptions(**opts)
    )
    T.set_optimizer_state_dict(
        theirs.wrapped, theirs.optim, clone(given), options=T.StateDictOptions(**opts)
    )
    assert_same(ours.optim.state_dict(), theirs.optim.state_dict(), "optimizer.state_dict()")
    for model in (ours, theirs):
        model.wrapped.load_state_dict(source.wrapped.state_dict())
        train_step(model, 1)
    assert_same(_full(ours), _full(theirs))


@pytest.mark.dist
@pytest.mark.parametrize("mode", MODES)
def test_fsdp1_flat_params_tied_optimizer_state_loads_like_pytorch(mode):
    run_on_ranks(2, _on_rank_flat_params_tied_optimizer_load, mode, timeout=CALL_TIMEOUT_S)


def _load_outcome(api: Any, model: Model, msd: dict[str, Any], opts: dict[str, Any]) -> Any:
    try:
        result = api.set_model_state_dict(
            model.wrapped, msd, options=api.StateDictOptions(strict=False, **opts)
        )
    except RuntimeError as exc:  # compared by message: the same rejection
        return str(exc).splitlines()[-1]
    return sorted(result.missing_keys), sorted(result.unexpected_keys)


def _on_rank_incompatible_keys(kind: str) -> list[Any]:
    _quiet()
    source = make(kind, 0)
    outcomes = []
    for mode, opts in _MODE_OPTIONS.items():
        got = T.get_model_state_dict(
            source.wrapped, options=T.StateDictOptions(full_state_dict=bool(opts))
        )
        msd = {k: v for k, v in got.items() if k not in ("scale", "l1.bias")}
        msd["extra.weight"] = torch.zeros(1)
        if mode == "broadcast" and dist.get_rank() != 0:
            msd = {}
        ours = _load_outcome(S, make(kind, 1, lazy=True), clone(msd), opts)
        theirs = _load_outcome(T, make(kind, 1, lazy=True), clone(msd), opts)
        assert ours == theirs, (mode, ours, theirs)
        outcomes.append(ours)
    return outcomes


@pytest.mark.dist
@pytest.mark.parametrize("kind", KINDS)
def test_non_strict_load_reports_pytorchs_missing_and_unexpected_keys(kind):
    """PyTorch reports ``load_state_dict``'s own (raw) names: DDP's ``module.scale``,
    ``torch.compile``'s ``_orig_mod.scale``, the checkpoint wrapper's component; a full
    load fills the missing keys from the model itself, so none are missing there."""
    outcomes = run_on_ranks(2, _on_rank_incompatible_keys, kind, timeout=CALL_TIMEOUT_S)
    sharded = outcomes[0][0]
    assert sharded[1] == ["extra.weight"] and len(sharded[0]) == 2, sharded
    if kind == "ddp":
        assert sharded[0] == ["module.l1.bias", "module.scale"]


# ------------------------------------------------- faults: every rank raises, nothing written

# Collective timeout of the fresh groups below: a rank left waiting in a collective that
# another rank never joins fails with DistBackendError after this long, not with ours.
_FAULT_PG_TIMEOUT_S = 20


class Notes(nn.Module):
    """A module with extra state (a dict); its ``get_extra_state`` raises on ``broken_on``."""

    def __init__(self, broken_on: int | None = None) -> None:
        super().__init__()
        self.note = {"epoch": 0}
        self.broken_on = broken_on

    def get_extra_state(self) -> Any:
        if dist.get_rank() == self.broken_on:
            raise RuntimeError(f"Notes.get_extra_state: broken on rank {self.broken_on}")
        return dict(self.note)

    def set_extra_state(self, state: Any) -> None:
        self.note = dict(state)


def _raise_on_rank_1(optimizer: torch.optim.Optimizer) -> None:
    if dist.get_rank() == 1:
        raise RuntimeError("optimizer state_dict hook: broken on rank 1")


def _on_rank_state_dict_raises_on_rank_1(kind: str) -> list[tuple[str, str]]:
    """get_state_dict(full_state_dict, cpu_offload) while rank 1's model.state_dict()
    raises, then while its optimizer.state_dict() does: (exception type, message)."""
    _quiet()
    model = make(kind, 0)
    options = S.StateDictOptions(full_state_dict=True, cpu_offload=True)
    seen = []
    for part in ("model", "optimizer"):
        notes = Notes(broken_on=1 if part == "model" else None)
        model.forward_module.add_module("notes", notes)
        hook = None
        if part == "optimizer":
            hook = model.optim.register_state_dict_pre_hook(_raise_on_rank_1)
        seen.append(_outcome(lambda: S.get_state_dict(model.wrapped, model.optim, options=options)))
        if hook is not None:
            hook.remove()
    return seen


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["fsdp2", "tp"])
def test_get_full_state_dict_raises_on_every_rank_when_state_dict_raises_on_one(kind):
    rank0, rank1 = run_fresh(
        2, _on_rank_state_dict_raises_on_rank_1, kind,
        pg_timeout=_FAULT_PG_TIMEOUT_S, timeout=CALL_TIMEOUT_S,
    )
    for (kind0, text0), (kind1, text1), broken in zip(
        rank0, rank1, ["Notes.get_extra_state", "optimizer state_dict hook"], strict=True
    ):
        # Rank 1 raises its own error; rank 0 learns it in the gather's agreement.
        assert (kind0, kind1) == ("RankFailure", "RuntimeError"), (text0, text1)
        assert f"rank 1: RuntimeError: {broken}: broken on rank 1" in text0
        assert text1 == f"{broken}: broken on rank 1"


def _hold_all(model: Model, optims: list[torch.optim.Optimizer]) -> Any:
    """Snapshots every tensor of the model and the optimizers (DTensors: this rank's
    shard) and every optimizer's hyperparameters; the returned check says whether all
    still hold the same values (a failed load may write nothing, on any rank)."""

    def now() -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
        net = model.forward_module
        held = [*net.parameters(), *net.buffers()]
        held += [v for o in optims for s in o.state.values() for v in s.values()]
        tensors = [
            (v.to_local() if isinstance(v, DTensor) else v).detach().clone()
            for v in held if isinstance(v, torch.Tensor)
        ]
        groups = [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]
                  for o in optims]
        return tensors, copy.deepcopy(groups)

    tensors, groups = now()

    def untouched() -> bool:
        tensors_after, groups_after = now()
        return groups_after == groups and len(tensors_after) == len(tensors) and all(
            (a.is_meta and b.is_meta and a.shape == b.shape) if a.is_meta or b.is_meta
            else torch.equal(a, b)
            for a, b in zip(tensors_after, tensors, strict=True)
        )

    return untouched


def _outcome(call: Any) -> tuple[str, str]:
    try:
        call()
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc)
    return "nothing", ""


def _missing_line(message: str) -> str:
    return next(line.strip() for line in message.splitlines() if "Missing key(s)" in line)


def _replace_layer(model: Model, name: str, layer: nn.Module) -> None:
    """Put ``layer`` in place of ``name``, its parameters (with their state) in place of
    the old one's in the optimizer, so that only the model differs from the source."""
    old = model.forward_module.get_submodule(name)
    model.forward_module.add_module(name, layer)
    new_of = {id(o): n for o, n in zip(old.parameters(), layer.parameters(), strict=True)}
    for group in model.optim.param_groups:
        group["params"] = [new_of.get(id(p), p) for p in group["params"]]
    for param in old.parameters():
        if param in model.optim.state:
            model.optim.state[new_of[id(param)]] = model.optim.state.pop(param)


def _on_rank_broadcast_load_faults(kind: str) -> list[tuple[str, str, bool, str]]:
    """set_state_dict(full_state_dict, broadcast_from_rank0) of a good source state dict
    that rank 0 alone passes, with one fault each: rank 1's model has one layer more, or
    one of another shape; rank 0's model state dict holds a value that cannot be
    pickled, or a meta tensor.
    Returns per fault (exception type, message, every local tensor unchanged,
    PyTorch's message for the same load of the model or "")."""
    _quiet()
    rank = dist.get_rank()
    options = S.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    seen = []
    for fault in ("extra_layer", "other_shape", "unpicklable", "meta"):
        source = make(kind, 0)
        source.forward_module.add_module("notes", Notes())
        msd, osd = _full(source)
        copies = []
        for _ in range(2):  # ours, PyTorch's
            target = make(kind, 1)
            target.forward_module.add_module("notes", Notes())
            if fault == "extra_layer" and rank == 1:
                target.forward_module.add_module("extra", nn.Linear(2, 2))
            if fault == "other_shape" and rank == 1:
                _replace_layer(target, "l2", nn.Linear(16, 9))
            copies.append(target)
        ours, theirs = copies
        if rank == 0 and fault == "unpicklable":
            msd["notes._extra_state"] = lambda: None
        if rank == 0 and fault == "meta":
            msd["l2.weight"] = torch.empty(msd["l2.weight"].shape, device="meta")
        given = (msd, osd) if rank == 0 else ({}, {})
        untouched = _hold_all(ours, [ours.optim])
        kind_seen, message = _outcome(lambda ours=ours, given=given: S.set_state_dict(
            ours.wrapped, ours.optim, model_state_dict=clone(given[0]),
            optim_state_dict=clone(given[1]), options=options,
        ))
        reference = ""
        if fault == "extra_layer":
            # PyTorch's model load raises on rank 1 only (after writing it), and returns
            # on rank 0; its optimizer load would then mismatch collectives.
            try:
                T.set_model_state_dict(
                    theirs.wrapped, clone(given[0]), options=T.StateDictOptions(
                        full_state_dict=True, broadcast_from_rank0=True
                    )
                )
            except RuntimeError as exc:
                reference = str(exc)
        seen.append((kind_seen, message, untouched(), reference))
    return seen


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["plain", "fsdp2"])
def test_broadcast_load_faults_raise_on_every_rank_and_load_neither_model_nor_optimizer(kind):
    rank0, rank1 = run_fresh(
        2, _on_rank_broadcast_load_faults, kind,
        pg_timeout=_FAULT_PG_TIMEOUT_S, timeout=2 * CALL_TIMEOUT_S,
    )
    (extra0, shape0, unpicklable0, meta0), (extra1, *_) = rank0, rank1
    for (kind0, text0, untouched0, _), (kind1, text1, untouched1, _) in zip(rank0, rank1):
        assert (kind0, kind1) == ("RuntimeError", "RuntimeError"), (text0, text1)
        assert text0 == text1 and text0.startswith("state dict load rejected, nothing was loaded")
        assert untouched0 and untouched1, text0
    # Rank 1's extra layer: the keys PyTorch's strict load on rank 1 reports missing.
    assert extra0[3] == "" and "Missing key(s)" in extra1[3]
    assert "rank 1: set_model_state_dict: " in extra0[1]
    assert _missing_line(extra0[1]) == _missing_line(extra1[3]), (extra0[1], extra1[3])
    assert 'Missing key(s) in state_dict: "extra.weight", "extra.bias".' in extra0[1]
    assert (
        "rank 1: set_model_state_dict: 'l2.weight': shape (8, 16) does not match the "
        "model's (9, 16); 'l2.bias': shape (8,) does not match the model's (9,)"
    ) in shape0[1]
    assert (
        "rank 0: set_model_state_dict: broadcast_state_dict: "
        "full_state_dict['notes._extra_state'] (a function) cannot be pickled"
    ) in unpicklable0[1]
    assert "full_state_dict['l2.weight'] is a meta tensor" in meta0[1]


def _on_rank_broadcast_load_into_a_model_on_two_devices() -> tuple[str, str, bool]:
    """Rank 1's model spans the CPU and a GPU; rank 0 broadcasts a full state dict."""
    _quiet()
    rank = dist.get_rank()
    torch.manual_seed(rank)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    if rank == 1:
        model[1].to("cuda")
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optim.step()
    model_sd, optim_sd = ({}, {})
    if rank == 0:
        model_sd, optim_sd = T.get_state_dict(
            model, optim, options=T.StateDictOptions(full_state_dict=True)
        )
    untouched = _hold_all(Model(model, model, optim), [optim])
    return (*_outcome(lambda: S.set_state_dict(
        model, optim, model_state_dict=model_sd, optim_state_dict=optim_sd,
        options=S.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )), untouched())


@pytest.mark.dist
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_broadcast_load_into_a_model_on_two_devices_fails_on_every_rank_loading_nothing():
    # The device check runs with the other checks, before the agreement: a rank that
    # found it only at the load left rank 0 waiting in the broadcast.
    for kind, text, untouched in run_fresh(
        2, _on_rank_broadcast_load_into_a_model_on_two_devices,
        pg_timeout=_FAULT_PG_TIMEOUT_S, timeout=CALL_TIMEOUT_S,
    ):
        assert kind == "RuntimeError" and untouched
        assert "several devices" in text


def _two_optimizers(kind: str, seed: int) -> tuple[Model, list[torch.optim.Optimizer]]:
    """``make(kind, seed)``'s model under two AdamW (embedding and l1; the rest) with
    different hyperparameters, stepped once: ``set_state_dict(model, [a, b], ...)``."""
    model = make(kind, seed, lazy=True)
    net = model.wrapped.module if kind == "ddp" else model.forward_module
    first = [*net.emb.parameters(), *net.l1.parameters()]
    rest = [p for m in (net.l2, net.head) for p in m.parameters() if all(p is not q for q in first)]
    optims = [
        torch.optim.AdamW(first, lr=1e-2),
        torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.1, betas=(0.8, 0.9)),
    ]
    g = torch.Generator().manual_seed(200 + seed)
    model.forward_module(torch.randint(0, 10, (4, 3), generator=g)).pow(2).mean().backward()
    for optim in optims:
        optim.step()
        optim.zero_grad()
    return model, optims


def _on_rank_second_optimizer_faults(kind: str, mode: str) -> list[tuple[str, str, str, bool]]:
    """set_state_dict(model, [a, b]) of a full state dict with one fault in rank 0's
    state for the second optimizer: a value that cannot be pickled (broadcast only), a
    meta tensor, a tensor of another shape. Returns per fault (fault, exception type,
    message, every local tensor and hyperparameter unchanged)."""
    _quiet()
    rank = dist.get_rank()
    options = S.StateDictOptions(**_MODE_OPTIONS[mode])
    faults = ("unpicklable",) * (mode == "broadcast") + ("meta", "other_shape")
    seen = []
    for fault in faults:
        source, source_optims = _two_optimizers(kind, 0)
        msd, osd = T.get_state_dict(
            source.wrapped, source_optims,
            options=T.StateDictOptions(**_MODE_OPTIONS["sharded" if mode == "sharded" else "full"]),
        )
        state = osd["state"]["l2.weight"]
        if fault == "unpicklable":
            state["note"] = lambda: None
        if fault == "meta":
            state["exp_avg"] = torch.empty(state["exp_avg"].shape, device="meta")
        if fault == "other_shape":
            state["exp_avg_sq"] = torch.zeros(3, 16)
        target, optims = _two_optimizers(kind, 1)
        untouched = _hold_all(target, optims)
        given = (msd, osd) if rank == 0 or mode != "broadcast" else ({}, {})
        def load(target=target, optims=optims, given=given):
            return S.set_state_dict(
                target.wrapped, optims, model_state_dict=clone(given[0]),
                optim_state_dict=clone(given[1]), options=options,
            )

        seen.append((fault, *_outcome(load), untouched()))
    return seen


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["plain", "fsdp2"])
@pytest.mark.parametrize("mode", ["broadcast", "full", "sharded"])
def test_a_fault_in_the_second_optimizers_state_raises_on_every_rank_loading_no_optimizer(
    kind, mode
):
    # Each optimizer's source is checked before the first optimizer loads: found at the
    # second one's broadcast / distribute, the first was already loaded.
    ranks = run_fresh(
        2, _on_rank_second_optimizer_faults, kind, mode,
        pg_timeout=_FAULT_PG_TIMEOUT_S, timeout=2 * CALL_TIMEOUT_S,
    )
    agreed = mode == "broadcast" or kind == "fsdp2"  # else each rank checks its own input
    for rank, seen in enumerate(ranks):
        for fault, kind_seen, text, untouched in seen:
            assert kind_seen == "RuntimeError" and untouched, (rank, fault, text)
            if agreed:
                assert text.startswith("state dict load rejected, nothing was loaded"), text
                assert text == ranks[0][[f for f, *_ in ranks[0]].index(fault)][2]
            origin = "rank 0: " if agreed else ""
            expected = {
                "unpicklable": "broadcast_state_dict: full_state_dict['state.l2.weight.note'] "
                "(a function) cannot be pickled",
                "meta": "broadcast_state_dict: full_state_dict['state.l2.weight.exp_avg'] is a "
                "meta tensor" if mode == "broadcast" else "'state.l2.weight.exp_avg' is a meta "
                "tensor (it has no data); a state dict to load must hold tensors with data",
                "other_shape": "'state.l2.weight.exp_avg_sq': shape (3, 16) does not match the "
                "optimizer's (8, 16)",
            }[fault]
            assert f"{origin}set_optimizer_state_dict: optimizer 1: {expected}" in text, text


def _on_rank_positional_state_dict_for_two_optimizers(kind: str) -> list[tuple[str, str, bool]]:
    """set_optimizer_state_dict(model, [a, b], a.state_dict()): a plain positional
    torch.optim state dict goes to both optimizers as it is, and b's parameter group is
    smaller. (exception type, message, nothing changed) for ours, then PyTorch's."""
    _quiet()
    source, (source_a, _) = _two_optimizers(kind, 0)
    seen = []
    for api in (S, T):
        target, optims = _two_optimizers(kind, 1)
        untouched = _hold_all(target, optims)
        def load(api=api, target=target, optims=optims):
            return api.set_optimizer_state_dict(
                target.wrapped, optims, optim_state_dict=clone(source_a.state_dict()),
            )

        seen.append((*_outcome(load), untouched()))
    return seen


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["plain", "ddp"])
def test_a_state_dict_whose_group_does_not_fit_the_second_optimizer_loads_no_optimizer(kind):
    # PyTorch's load_state_dict refuses the second optimizer's group after the first
    # optimizer was loaded; ours compares every group's size first.
    for (ours, text, untouched), (theirs, their_text, theirs_untouched) in run_fresh(
        2, _on_rank_positional_state_dict_for_two_optimizers, kind,
        pg_timeout=_FAULT_PG_TIMEOUT_S, timeout=CALL_TIMEOUT_S,
    ):
        assert ours == "RuntimeError" and untouched, text
        assert (
            "set_optimizer_state_dict: optimizer 1: saved parameter group 0 has 3 parameters, "
            "the optimizer's has 2"
        ) in text
        if kind == "ddp":  # replicas must agree: every rank's verdict reaches every rank
            assert text.startswith("state dict load rejected, nothing was loaded"), text
        assert theirs == "ValueError" and "doesn't match the size" in their_text
        assert not theirs_untouched


def _on_rank_load_with_a_meta_model_tensor(
    kind: str, mode: str
) -> list[tuple[str, str, bool]]:
    """set_state_dict of a state dict (every rank passes its own) whose model part holds
    a meta tensor: (exception type, message, every local tensor and hyperparameter
    unchanged) for ours, then for PyTorch's."""
    _quiet()
    source = make(kind, 0)
    msd, osd = T.get_state_dict(
        source.wrapped, source.optim, options=T.StateDictOptions(**_MODE_OPTIONS[mode])
    )
    msd["l2.weight"] = torch.empty(msd["l2.weight"].shape, device="meta")
    seen = []
    for api in (S, T):
        target = make(kind, 1)
        untouched = _hold_all(target, [target.optim])
        seen.append((*_outcome(lambda api=api, target=target: api.set_state_dict(
            target.wrapped, target.optim, model_state_dict=clone(msd),
            optim_state_dict=clone(osd), options=api.StateDictOptions(**_MODE_OPTIONS[mode]),
        )), untouched()))
    return seen


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["plain", "fsdp2"])
@pytest.mark.parametrize("mode", ["full", "sharded"])
def test_load_of_a_meta_model_tensor_raises_before_the_optimizer_loads(kind, mode):
    # PyTorch fails too, on every rank, but only in the model load: after its optimizer
    # was loaded. Ours finds the tensor with the other checks and loads neither.
    for (ours, text, untouched), (theirs, _, theirs_untouched) in run_fresh(
        2, _on_rank_load_with_a_meta_model_tensor, kind, mode,
        pg_timeout=_FAULT_PG_TIMEOUT_S, timeout=CALL_TIMEOUT_S,
    ):
        assert ours == "RuntimeError" and untouched, text
        assert "set_model_state_dict: 'l2.weight' is a meta tensor (it has no data)" in text
        assert theirs != "nothing" and not theirs_untouched


def _on_rank_broadcast_optimizer_load_into_state_on_two_devices(
    second: str,
) -> tuple[str, str, bool]:
    """set_optimizer_state_dict(broadcast_from_rank0) where rank 1's optimizer state is
    on the CPU and on ``second`` (e.g. partly moved off the model's device)."""
    _quiet()
    rank = dist.get_rank()
    torch.manual_seed(rank)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optim.step()
    if rank == 1:
        # "meta" stands in for a second device that any machine has.
        state = optim.state[model[1].weight]
        state["exp_avg"] = state["exp_avg"].to(second)
    optim_sd = {}
    if rank == 0:
        optim_sd = T.get_optimizer_state_dict(
            model, optim, options=T.StateDictOptions(full_state_dict=True)
        )
    untouched = _hold_all(Model(model, model, optim), [optim])
    return (*_outcome(lambda: S.set_optimizer_state_dict(
        model, optim, optim_state_dict=optim_sd,
        options=S.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )), untouched())


def _assert_every_rank_refuses_state_on_two_devices(second: str) -> None:
    devices = ["cpu", "cuda:0" if second == "cuda" else second]
    for rank, (kind, text, untouched) in enumerate(run_fresh(
        2, _on_rank_broadcast_optimizer_load_into_state_on_two_devices, second,
        pg_timeout=_FAULT_PG_TIMEOUT_S, timeout=CALL_TIMEOUT_S,
    )):
        assert kind == "RuntimeError" and untouched, (rank, text)
        assert text.startswith("state dict load rejected, nothing was loaded"), text
        assert (
            "rank 1: set_optimizer_state_dict: optimizer 0: the optimizer state is on several "
            f"devices {devices}"
        ) in text, text


@pytest.mark.dist
def test_broadcast_optimizer_load_into_state_on_two_devices_fails_on_every_rank():
    # Checked with the other checks, before the agreement: found at the load, on rank 1
    # only, it left rank 0 waiting in the broadcast until the group timed out.
    _assert_every_rank_refuses_state_on_two_devices("meta")


@pytest.mark.dist
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_broadcast_optimizer_load_into_state_on_cpu_and_gpu_fails_on_every_rank():
    _assert_every_rank_refuses_state_on_two_devices("cuda")
