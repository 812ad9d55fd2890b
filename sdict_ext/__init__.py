"""sdict_ext: fast, memory-bounded PyTorch state-dict utilities.

A drop-in home for ``torch.distributed._state_dict_utils``,
``torch.distributed.checkpoint.state_dict`` and ``torch.distributed.checkpoint.utils``,
built on batched C++/CUDA copy kernels and coalesced collectives. See README.md.
"""

from __future__ import annotations

from sdict_ext import dist, ops, staging, state_dict, utils
from sdict_ext.dist import *  # noqa: F403
from sdict_ext.ops import *  # noqa: F403
from sdict_ext.staging import *  # noqa: F403
from sdict_ext.state_dict import *  # noqa: F403
from sdict_ext.utils import *  # noqa: F403

__all__ = (
    list(ops.__all__)
    + list(utils.__all__)
    + list(dist.__all__)
    + list(staging.__all__)
    + list(state_dict.__all__)
)
__version__ = "0.1.0"
