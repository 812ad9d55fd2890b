"""reshard_state_dict as an RL job runs it: trainer weights into inference weights.

A tiny Llama (tied embedding and head, built from a config in code) trains under FSDP2
on all four ranks; an inference copy lives on ranks 0 and 1 under tensor parallelism
(``parallelize_module``: column- and row-wise linears, everything else whole). After
each optimizer step the trainer's state dict is resharded into the inference model's
own parameters, in place, as a weight sync does; each result is compared bit-exactly
with PyTorch's way (a full state dict, then ``distribute_tensor`` into the inference
layout), and the later syncs must be served by the cached plan.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist

from tests.mp import run_fresh

pytestmark = pytest.mark.dist

_TP_PLAN = {
    "self_attn.q_proj": "col", "self_attn.k_proj": "col", "self_attn.v_proj": "col",
    "self_attn.o_proj": "row", "mlp.gate_proj": "col", "mlp.up_proj": "col",
    "mlp.down_proj": "row",
}


def _llama(seed: int):
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config)


def _on_rank_weight_sync() -> list[bool]:
    warnings.simplefilter("ignore")
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    import sdict_ext.state_dict as S
    from sdict_ext.utils import last_reshard_stats, reshard_state_dict

    rank = dist.get_rank()
    trainer = _llama(0)
    train_mesh = DeviceMesh("cpu", list(range(dist.get_world_size())))
    for layer in trainer.model.layers:
        fully_shard(layer, mesh=train_mesh)
    fully_shard(trainer, mesh=train_mesh)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-2)
    tp_mesh = DeviceMesh("cpu", [0, 1])  # every rank makes it (it is a collective)
    inference = None
    if rank < 2:
        inference = _llama(1)  # other weights: a sync must overwrite every one
        styles = {"col": ColwiseParallel, "row": RowwiseParallel}
        for layer in inference.model.layers:
            parallelize_module(layer, tp_mesh, {k: styles[v]() for k, v in _TP_PLAN.items()})
    syncs = []
    for step in range(3):
        batch = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(step))
        trainer(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        src = S.get_model_state_dict(trainer)
        dst = inference.state_dict() if inference is not None else None
        before = {k: v for k, v in dst.items()} if dst is not None else None
        out = reshard_state_dict(src, dst)
        stats = last_reshard_stats()
        syncs.append(stats["planned"] == (step == 0))
        syncs.append(stats["bytes_received"] + stats["bytes_local"] == stats["bytes_owned"])
        full = S.get_model_state_dict(trainer, options=S.StateDictOptions(full_state_dict=True))
        if dst is None:
            syncs.append(out is None)
            continue
        syncs.append(list(out) == list(dst))
        for key, value in out.items():
            syncs.append(value is before[key])  # in place: the model's own tensors
            if isinstance(value, DTensor):
                want = distribute_tensor(full[key], tp_mesh, value.placements).to_local()
                got = value.to_local()
            else:
                want, got = full[key], value
            syncs.append(got.dtype == want.dtype and torch.equal(got, want))
        params = dict(inference.named_parameters(remove_duplicate=False))
        syncs.append(params["lm_head.weight"] is params["model.embed_tokens.weight"])
    return syncs


def test_rl_weight_sync_from_fsdp2_trainer_into_tp_inference_matches_pytorch():
    for rank, checks in enumerate(run_fresh(4, _on_rank_weight_sync, timeout=240,
                                            pg_timeout=120)):
        assert checks and all(checks), (rank, [i for i, ok in enumerate(checks) if not ok])
