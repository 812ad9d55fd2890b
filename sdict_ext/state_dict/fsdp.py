"""FSDP1 plumbing of ``sdict_ext.state_dict``: the state-dict-type context and process group.

FSDP1 (``FullyShardedDataParallel``) returns and loads state dicts through its own
``state_dict_type`` context; this module builds that context from the call's options
and picks the group its optimizer state-dict APIs use. FSDP2 (``fully_shard``) needs
neither: its parameters are DTensors, handled like any other.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    ShardedOptimStateDictConfig,
    ShardedStateDictConfig,
    ShardingStrategy,
    StateDictType,
)
from torch.distributed.fsdp import (
    FullyShardedDataParallel as FSDP,
)

if TYPE_CHECKING:
    from sdict_ext.state_dict.options import Info, StateDictOptions

__all__ = ["fsdp_context_factory", "fsdp_process_group", "fsdp_runs_on_cpu"]

# FSDP1 strategies whose process group is a (shard, replicate) pair: FSDP picks the groups
# itself when ``group=None`` is passed to its optimizer state-dict APIs.
_HYBRID = {ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2}


def fsdp_runs_on_cpu(fsdp_modules: list[nn.Module]) -> bool:
    return any(getattr(m, "compute_device", None) == torch.device("cpu") for m in fsdp_modules)


def fsdp_context_factory(
    model: nn.Module, fsdp_modules: list[nn.Module], options: StateDictOptions
) -> Callable[[], contextlib.AbstractContextManager]:
    if options.full_state_dict:
        # When the compute device already is the CPU, FSDP1's own CPU offload of a full
        # state dict returns tensors that still point into freed unsharded buffers
        # (PyTorch 2.13: the model state dict segfaults, optimizer states come back with
        # garbage values). There the tensors are on the CPU anyway, so we ask FSDP for
        # rank-0-only results without its offload; our full_or_offload copies them.
        fsdp_offload = options.cpu_offload and not fsdp_runs_on_cpu(fsdp_modules)
        state_dict_config: Any = FullStateDictConfig(
            offload_to_cpu=fsdp_offload, rank0_only=options.cpu_offload
        )
        optim_config: Any = FullOptimStateDictConfig(
            offload_to_cpu=fsdp_offload,
            rank0_only=options.cpu_offload or options.broadcast_from_rank0,
        )
        state_dict_type = StateDictType.FULL_STATE_DICT
    else:
        state_dict_config = ShardedStateDictConfig(offload_to_cpu=options.cpu_offload)
        optim_config = ShardedOptimStateDictConfig(offload_to_cpu=options.cpu_offload)
        state_dict_type = StateDictType.SHARDED_STATE_DICT

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with warnings.catch_warnings():
            # FSDP.state_dict_type warns that it is deprecated; it is still FSDP1's only API.
            warnings.filterwarnings(
                "ignore", message="FSDP.state_dict_type", category=FutureWarning
            )
            with FSDP.state_dict_type(model, state_dict_type, state_dict_config, optim_config):
                yield

    return context


def fsdp_process_group(model: nn.Module, info: Info) -> dist.ProcessGroup | None:
    """The group FSDP1's optimizer state-dict APIs should use (None: FSDP decides)."""
    module = (
        model if isinstance(model, FSDP) else (info.fsdp_modules[0] if info.fsdp_modules else None)
    )
    if module is None or module.sharding_strategy in _HYBRID:
        return None
    group = module.process_group
    return None if isinstance(group, tuple) else group
