"""sdict_ext: fast, memory-bounded PyTorch state-dict utilities.

A drop-in home for ``torch.distributed._state_dict_utils``,
``torch.distributed.checkpoint.state_dict`` and ``torch.distributed.checkpoint.utils``,
built on batched C++/CUDA copy kernels and coalesced collectives. See README.md.
``patch_torch()`` (or ``SDICT_EXT_PATCH=1``) makes PyTorch's own names run sdict_ext.
"""

from __future__ import annotations

from sdict_ext import dist, ops, staging, state_dict, utils
from sdict_ext._patch_torch import TorchPatch, patch_from_environment, patch_torch
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
    + ["TorchPatch", "patch_torch"]
)
__version__ = "0.1.0"

#: The handle of the patch applied at import by ``SDICT_EXT_PATCH=1`` (else None).
ENV_PATCH = patch_from_environment()
