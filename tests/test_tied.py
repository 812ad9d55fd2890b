"""Tied (shared) tensors on every path: one transfer per tensor, every key filled.

A language model whose head weight is its token embedding (GPT-2, Llama-3.2-1B, Gemma)
has one tensor under two keys. Each spec compares with PyTorch's function on the same
inputs (bit-exact values, types, placements) and counts the bytes that travel, so a
tied tensor that is sent, gathered or staged twice fails. Results also share storages
exactly where PyTorch's do (:func:`sharing`): transformers' ``save_pretrained`` and
safetensors treat keys whose storage repeats as one tensor and write it once.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed import _state_dict_utils as ref
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint import state_dict as T
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import sdict_ext
from sdict_ext import state_dict as S
from sdict_ext import utils
from sdict_ext.staging import PinnedStager
from tests.mp import run_on_ranks
from tests.test_state_dict import FSDP1, _full, assert_same, clone, make, train_step
from tests.test_utils_dist import (
    ALL_GATHER,
    ROUTE_KEYWORD,
    ROUTES,
    _mesh,
    metadata_call,
    watch_metadata,
)

TIMEOUT_S = 120


def _counting_bytes(names: list[str]) -> tuple[dict[str, int], dict[str, Any]]:
    """Wrap ``dist.<name>`` to sum the bytes of the tensor each call moves."""
    watch_metadata()
    sent = dict.fromkeys(names, 0)
    originals = {name: getattr(dist, name) for name in names}

    def wrap(name: str):
        def counted(tensor, *args, **kwargs):
            if not metadata_call():
                sent[name] += tensor.numel() * tensor.element_size()
            return originals[name](tensor, *args, **kwargs)

        return counted

    for name in names:
        setattr(dist, name, wrap(name))
    return sent, originals


def _restore(originals: dict[str, Any]) -> None:
    for name, fn in originals.items():
        setattr(dist, name, fn)


def _leaves(obj: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in _leaves(v, f"{path}.{k}")]
    if isinstance(obj, (list, tuple)):
        return [leaf for i, v in enumerate(obj) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path, obj)] if isinstance(obj, torch.Tensor) else []


def sharing(obj: Any) -> tuple[list[list[str]], list[list[str]]]:
    """Which key paths share one storage, and which hold one value object.

    Storages of DTensors are their local tensors', of ShardedTensors their first
    shard's; tensors without elements share nothing (a rank's empty shard may view
    padding or nothing at all).
    """
    by_storage: dict[int, list[str]] = {}
    by_id: dict[int, list[str]] = {}
    for path, value in _leaves(obj):
        by_id.setdefault(id(value), []).append(path)
        if isinstance(value, ShardedTensor):
            shards = value.local_shards()
            value = shards[0].tensor if shards else None
        elif isinstance(value, DTensor):
            value = value.to_local()
        if value is not None and value.numel():
            by_storage.setdefault(value.untyped_storage().data_ptr(), []).append(path)
    groups = lambda d: sorted(g for g in d.values() if len(g) > 1)  # noqa: E731
    return groups(by_storage), groups(by_id)


def _weights(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 8, generator=g), torch.randn(8, generator=g)


# --------------------------------------------------------------------------- broadcast


def _on_rank_broadcast(source_tied: bool, local_tied: bool, route: str) -> int:
    """Rank 0's full dict and every rank's local dict, each tied or not."""
    mesh = _mesh((dist.get_world_size(),))
    emb, bias = _weights(0)
    head = emb if source_tied else emb + 1
    full = {"emb": emb, "head": head, "bias": bias} if dist.get_rank() == 0 else {}
    zeros = torch.zeros(16, 8)

    def local() -> dict[str, Any]:
        shard = distribute_tensor(zeros, mesh, [Shard(0)])
        other = shard if local_tied else distribute_tensor(zeros, mesh, [Shard(0)])
        rep = distribute_tensor(torch.zeros(8), mesh, [Replicate()])
        return {"emb": shard, "head": other, "bias": rep}

    ours, theirs = local(), local()
    sent, originals = _counting_bytes(["broadcast", "isend", "irecv"])
    try:
        utils.broadcast_state_dict(clone(full), ours, device=torch.device("cpu"),
                                   route=ROUTE_KEYWORD[route])
    finally:
        _restore(originals)
    ref._broadcast_state_dict(clone(full), theirs, device=torch.device("cpu"))
    assert_same(ours, theirs)
    if local_tied:
        assert ours["emb"] is ours["head"]
    if route == "broadcast":
        assert sent["isend"] == sent["irecv"] == 0
    else:
        assert sent["broadcast"] == 0
    return sum(sent.values())


@pytest.mark.dist
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("local_tied", [False, True])
@pytest.mark.parametrize("source_tied", [False, True])
def test_broadcast_sends_a_tied_tensor_once_and_fills_every_key(source_tied, local_tied, route):
    sent = run_on_ranks(
        2, _on_rank_broadcast, source_tied, local_tied, route, timeout=TIMEOUT_S
    )
    if route == "direct":
        # Rank 1 read its boxes out of rank 0's memory: nothing was sent.
        assert sent == [0, 0]
        return
    boxes = route == "messages"
    # Broadcast: the whole tensors; the box route: rank 1's half of each (8 of 16 rows)
    # and the replicated bias, and only the tensor that stays where two keys share one
    # local shard (the last key's: the other would be overwritten).
    rows = 8 if boxes else 16
    tensors = 1 if source_tied or (boxes and local_tied) else 2
    tensor_bytes = (rows * 8 * tensors + 8) * 4
    # Tensors travel in one aligned bucket: at most one alignment gap per tensor.
    assert sent[0] == sent[1]
    assert tensor_bytes <= sent[0] < tensor_bytes + 3 * 64


def _on_rank_broadcast_local_views_of_one_tensor() -> None:
    """``model.state_dict()`` gives a tied DTensor as a separate view per key."""
    mesh = _mesh((dist.get_world_size(),))
    emb, _ = _weights(1)
    full = {"emb": emb, "head": emb + 2} if dist.get_rank() == 0 else {}
    param = distribute_tensor(torch.zeros(16, 8), mesh, [Shard(0)])
    ours = {"emb": param.detach(), "head": param.detach()}
    utils.broadcast_state_dict(full, ours, device=torch.device("cpu"))
    theirs = {"emb": param.detach(), "head": param.detach()}
    ref._broadcast_state_dict(full, theirs, device=torch.device("cpu"))
    # Key by key, the last key's data is what stays (PyTorch's result).
    assert_same(ours, theirs)
    assert torch.equal(param.full_tensor(), emb + 2)


@pytest.mark.dist
def test_broadcast_into_views_of_one_local_tensor_keeps_the_last_key_like_pytorch():
    run_on_ranks(2, _on_rank_broadcast_local_views_of_one_tensor, timeout=TIMEOUT_S)


# --------------------------------------------------------------------------- distribute


def _on_rank_distribute() -> None:
    mesh = _mesh((dist.get_world_size(),))
    emb, bias = _weights(2)
    full = {"emb": emb, "head": emb, "bias": bias}
    shard = distribute_tensor(torch.zeros(16, 8), mesh, [Shard(0)])
    ours = {"emb": shard, "head": shard, "bias": torch.zeros(8)}
    theirs = dict(ours)
    utils.distribute_state_dict(full, ours, device=torch.device("cpu"))
    ref._distribute_state_dict(full, theirs, device=torch.device("cpu"))
    assert_same(ours, theirs)
    assert ours["emb"] is ours["head"], "a tied weight was sliced twice"


@pytest.mark.dist
def test_distribute_slices_a_tied_tensor_once():
    run_on_ranks(2, _on_rank_distribute, timeout=TIMEOUT_S)


# --------------------------------------------------------------------------- gather


def _on_rank_gather(cpu_offload: bool, ranks_only: tuple[int, ...]) -> int:
    mesh = _mesh((dist.get_world_size(),))
    emb, bias = _weights(3)
    shard = distribute_tensor(emb, mesh, [Shard(0)])
    rep = distribute_tensor(bias, mesh, [Replicate()])
    sd = {
        "emb": shard,
        "head": shard,
        "view": shard.detach(),  # model.state_dict()'s form: a view per name
        "nested": {"again": shard},
        "bias": bias,
        "bias_again": bias,
        "rep": rep,
        "rep_again": rep,
    }
    sent, originals = _counting_bytes([ALL_GATHER])
    try:
        ours = utils.gather_state_dict(sd, cpu_offload=cpu_offload, ranks_only=ranks_only)
    finally:
        _restore(originals)
    theirs = ref._gather_state_dict(sd, cpu_offload=cpu_offload, ranks_only=ranks_only)
    assert_same(ours, theirs)
    # PyTorch gathers key by key: every gathered key has a storage of its own, while
    # plain and replicated values come back as they were (the same storage).
    assert sharing(ours) == sharing(theirs)
    if ours:
        assert ours["emb"].untyped_storage().data_ptr() != ours["head"].untyped_storage().data_ptr()
    return sent[ALL_GATHER]


@pytest.mark.dist
@pytest.mark.parametrize("ranks_only", [(), (0,)])
@pytest.mark.parametrize("cpu_offload", [False, True])
def test_gather_moves_a_tied_dtensor_once_and_returns_separate_tensors_like_pytorch(
    cpu_offload, ranks_only
):
    sent = run_on_ranks(2, _on_rank_gather, cpu_offload, ranks_only, timeout=TIMEOUT_S)
    # The tied shards ("emb", "head", "again") travel once; the view of the same
    # memory under another object ("view") is a tensor of its own, as in PyTorch.
    assert sent[0] == sent[1] == 2 * 16 * 8 * 4


# --------------------------------------------------------------------------- get / set


_GET_OPTIONS = (
    {},
    {"full_state_dict": True},
    {"cpu_offload": True},
    {"full_state_dict": True, "cpu_offload": True},
)


def _on_rank_get_tied(kind: str) -> None:
    warnings.simplefilter("ignore")
    model = make(kind, 0)
    for opts in _GET_OPTIONS:
        if kind in FSDP1 and opts.get("cpu_offload"):
            continue  # PyTorch segfaults there on a CPU device (see test_state_dict.py)
        ours = S.get_state_dict(model.wrapped, model.optim, options=S.StateDictOptions(**opts))
        theirs = T.get_state_dict(model.wrapped, model.optim, options=T.StateDictOptions(**opts))
        assert_same(ours, theirs, str(opts))
        # Model and optimizer: storages shared exactly where PyTorch's are (full
        # FSDP2 / TP / FSDP1 results: a storage per key), a value object per key.
        for part, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert sharing(a) == sharing(b), (opts, part, sharing(a), sharing(b))


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["plain", "ddp", "fsdp2", "fsdp1_orig", "fsdp1_root", "tp"])
def test_get_state_dict_shares_storages_where_pytorch_does(kind):
    run_on_ranks(2, _on_rank_get_tied, kind, timeout=TIMEOUT_S)


def _on_rank_get_tied_with_an_empty_shard() -> None:
    """One embedding row on two ranks: rank 1's shard of the tied weight is empty."""
    warnings.simplefilter("ignore")
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(1, 8), torch.nn.Linear(8, 1, bias=False))
    net[1].weight = net[0].weight
    fully_shard(net, mesh=_mesh((dist.get_world_size(),)))
    for opts in _GET_OPTIONS:
        ours = S.get_model_state_dict(net, options=S.StateDictOptions(**opts))
        theirs = T.get_model_state_dict(net, options=T.StateDictOptions(**opts))
        assert_same(ours, theirs, str(opts))
        assert sharing(ours) == sharing(theirs), opts


@pytest.mark.dist
def test_get_state_dict_of_a_tied_weight_with_an_empty_shard_matches_pytorch():
    # Ranks join tied keys by layout, not by memory, so their gathers agree.
    run_on_ranks(2, _on_rank_get_tied_with_an_empty_shard, timeout=TIMEOUT_S)


def _on_rank_hsdp_broadcast_load() -> None:
    """FSDP2 on a 2-D (replicate, shard) mesh, loaded from rank 0 with the tie."""
    warnings.simplefilter("ignore")
    source = make("plain", 0)
    full = T.get_state_dict(
        source.wrapped, source.optim, options=T.StateDictOptions(full_state_dict=True)
    )
    given = full if dist.get_rank() == 0 else ({}, {})
    opts = {"full_state_dict": True, "broadcast_from_rank0": True}
    ours, theirs = make("hsdp", 1, lazy=True), make("hsdp", 1, lazy=True)
    S.set_state_dict(
        ours.wrapped,
        ours.optim,
        model_state_dict=clone(given[0]),
        optim_state_dict=clone(given[1]),
        options=S.StateDictOptions(**opts),
    )
    T.set_model_state_dict(theirs.wrapped, clone(given[0]), options=T.StateDictOptions(**opts))
    T.set_optimizer_state_dict(
        theirs.wrapped, theirs.optim, clone(given[1]), options=T.StateDictOptions(**opts)
    )
    assert_same(ours.optim.state_dict(), theirs.optim.state_dict(), "optimizer.state_dict()")
    assert_same(_full(ours), _full(theirs))
    assert_same(_full(ours)[0], full[0])
    assert ours.wrapped.emb.weight is ours.wrapped.head.weight
    train_step(ours, 1)
    train_step(theirs, 1)
    assert_same(_full(ours), _full(theirs))


@pytest.mark.dist
def test_hsdp_tied_model_loads_from_rank0_like_pytorch():
    run_on_ranks(4, _on_rank_hsdp_broadcast_load, timeout=240)


# --------------------------------------------------------------------------- local paths


def test_cpu_offloaded_state_dict_holds_one_copy_of_a_tied_weight():
    model = make("plain", 0)
    opts = {"full_state_dict": True, "cpu_offload": True}
    ours = S.get_model_state_dict(model.wrapped, options=S.StateDictOptions(**opts))
    theirs = T.get_model_state_dict(model.wrapped, options=T.StateDictOptions(**opts))
    assert_same(ours, theirs)
    # PyTorch returns the live CPU parameter under both names (one storage, a view per
    # key); ours is one snapshot copy, viewed under both names the same way.
    assert sharing(ours) == sharing(theirs) == ([[".emb.weight", ".head.weight"]], [])
    assert ours["emb.weight"].data_ptr() != model.wrapped.emb.weight.data_ptr()


def test_copy_state_dict_between_tied_dicts_matches_pytorch():
    emb, bias = _weights(4)
    src = {"emb": emb, "head": emb, "bias": bias}
    for dst_tied in (False, True):
        target = torch.zeros(16, 8)
        ours = {"emb": target, "head": target if dst_tied else torch.zeros(16, 8)}
        ours["bias"] = torch.zeros(8)
        theirs = copy.deepcopy(ours)
        got = utils.copy_state_dict(src, ours)
        want = ref._copy_state_dict(src, theirs)
        assert_same(got, want)
        assert (got["emb"] is got["head"]) == dst_tied


def test_stager_copies_a_tied_tensor_once_and_restages_when_the_tie_goes():
    emb, bias = _weights(5)
    sd = {"emb": emb, "head": emb, "nested": [emb, bias]}
    with PinnedStager(all_ranks=False) as stager:
        staged = stager.stage(sd)
        staged = staged.result() if hasattr(staged, "result") else staged
        assert_same(staged, sd)
        assert staged["emb"] is staged["head"] is staged["nested"][0]
        assert stager.stats.staged_bytes == (16 * 8 + 8) * 4
        untied = {"emb": emb, "head": emb + 1, "nested": [emb, bias]}
        staged = stager.stage(untied)
        staged = staged.result() if hasattr(staged, "result") else staged
        assert_same(staged, untied)
        assert stager.stats.allocations == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_gives_each_key_of_a_tied_cuda_tensor_its_own_copy_like_pytorch():
    emb, bias = (t.cuda() for t in _weights(6))
    sd = {"emb": emb, "head": emb, "view": emb.detach(), "bias": bias}
    ours = utils.offload_state_dict_to_cpu(sd)
    theirs = ref._offload_state_dict_to_cpu(sd)
    assert_same(ours, theirs)
    assert sharing(ours) == sharing(theirs) == ([], [])
    assert ours["emb"].is_cpu and ours["head"].is_cpu


# --------------------------------------------------------------------------- transformers


def _tiny_tied_gpt2() -> Any:
    """A 2-layer GPT-2 whose head is its token embedding, built from a config (no download)."""
    # The pool's workers outlive a test's monkeypatch: set before transformers is imported.
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32, tie_word_embeddings=True
    )
    return transformers.GPT2LMHeadModel(config)


def _saved(model: Any, state_dict: dict[str, Any], path: str) -> dict[str, bytes]:
    """The bytes of every tensor ``save_pretrained`` writes for ``state_dict``."""
    from safetensors.torch import load_file

    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    saved = load_file(os.path.join(path, "model.safetensors"))
    return {k: v.view(torch.uint8).numpy().tobytes() for k, v in saved.items()}


def test_save_pretrained_of_a_cpu_copy_writes_the_same_safetensors_as_pytorch(tmp_path):
    """create_cpu_state_dict carves every tensor out of one slab: one storage for all
    keys (PyTorch: a storage each), but disjoint views, which transformers and
    safetensors write as separate tensors, so the files are the same."""
    model = _tiny_tied_gpt2()
    sd = model.state_dict()
    theirs = ref._copy_state_dict(sd, ref._create_cpu_state_dict(sd))
    ours = utils.copy_state_dict(sd, utils.create_cpu_state_dict(sd))
    assert [sorted(group) for group in sharing(ours)[0]] == [sorted(f".{k}" for k in sd)]
    assert sharing(theirs) == ([], [])
    assert _saved(model, ours, str(tmp_path / "ours")) == _saved(
        model, theirs, str(tmp_path / "theirs")
    )


def _on_rank_save_pretrained(kind: str, root: str) -> dict[str, dict[str, bytes]]:
    """A tiny tied GPT-2 saved as a trainer saves it, through PyTorch's names.

    accelerate's ``get_state_dict`` for FSDP2 calls
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with these options
    and hands the result to ``save_pretrained``; under ``patch_torch()`` that name is ours.
    """
    warnings.simplefilter("ignore")
    model = _tiny_tied_gpt2()
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        mesh = _mesh((dist.get_world_size(),))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the tied embedding and head: the root's unit
    opts = T.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    files: dict[str, dict[str, bytes]] = {}
    for name in ("pytorch", "sdict_ext"):
        if name == "sdict_ext":
            with sdict_ext.patch_torch():
                sd = T.get_model_state_dict(model, options=opts)
        else:
            sd = T.get_model_state_dict(model, options=opts)
        if dist.get_rank() == 0:
            files[name] = _saved(model, sd, os.path.join(root, f"{kind}-{name}"))
    return files


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["plain", "fsdp2"])
def test_save_pretrained_of_a_tied_model_writes_the_same_safetensors_as_pytorch(
    kind, tmp_path, monkeypatch
):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = run_on_ranks(2, _on_rank_save_pretrained, kind, str(tmp_path), timeout=TIMEOUT_S)[0]
    theirs, ours = files["pytorch"], files["sdict_ext"]
    assert sorted(ours) == sorted(theirs)
    assert ours == theirs
    if kind == "fsdp2":
        # PyTorch's gathered head is a tensor of its own, and transformers writes it.
        assert "lm_head.weight" in theirs
