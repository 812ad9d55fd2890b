"""``patch_torch()``: make PyTorch's own state-dict names run sdict_ext's functions.

Trainer libraries (accelerate, Lightning, torchtitan) call
``torch.distributed.checkpoint.state_dict.get_model_state_dict`` and friends
themselves, and DCP's ``save`` / ``load`` / ``async_save`` reach
``torch.distributed.checkpoint.utils._DistWrapper`` and the ``_state_dict_utils``
helpers through names their modules bound at import time
(``from .utils import _DistWrapper``). Replacing the three home modules' attributes
alone would miss those bindings, so the patch also rebinds every name that a loaded
``torch.*`` module holds to one of the replaced objects, found by identity (what
``from ... import`` bound is the very function object). Modules imported while the
patch is on bind sdict_ext's objects by themselves; ``undo()`` finds those too.

Left alone on purpose:

* ``StateDictOptions``: torch's class stays, so options made before, during and after
  the patch are all torch's and user ``isinstance`` checks keep working. sdict_ext's
  functions take torch's instances, and torch's functions take sdict_ext's (they read
  the fields through ``dataclasses.asdict``).
* ``CompanionMismatch``: ours subclasses torch's, so ``except`` clauses naming torch's
  class catch what the patched functions raise.
* Modules outside ``torch`` that bound a name before the patch keep PyTorch's function:
  patch first (``SDICT_EXT_PATCH=1``, or call it before importing the library).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from sdict_ext import dist, state_dict, utils

__all__ = ["TorchPatch", "patch_torch"]

#: The environment variable that applies the patch at ``import sdict_ext``.
ENV_VAR = "SDICT_EXT_PATCH"

# PyTorch's home module -> (its name, sdict_ext's object), as listed in docs/API.md.
_REPLACEMENTS: dict[str, tuple[tuple[str, Any], ...]] = {
    "torch.distributed._state_dict_utils": (
        ("_iterate_state_dict", utils.iterate_state_dict),
        ("_gather_state_dict", utils.gather_state_dict),
        ("_offload_state_dict_to_cpu", utils.offload_state_dict_to_cpu),
        ("_copy_state_dict", utils.copy_state_dict),
        ("_create_cpu_state_dict", utils.create_cpu_state_dict),
        ("_check_state_dict_similarity", utils.check_state_dict_similarity),
        ("_broadcast_state_dict", utils.broadcast_state_dict),
        ("_distribute_state_dict", utils.distribute_state_dict),
        ("_traverse_state_dict", utils.traverse_state_dict),
        ("_flatten_state_dict", utils.flatten_state_dict),
        ("_unflatten_state_dict", utils.unflatten_state_dict),
    ),
    "torch.distributed.checkpoint.state_dict": (
        ("get_model_state_dict", state_dict.get_model_state_dict),
        ("get_optimizer_state_dict", state_dict.get_optimizer_state_dict),
        ("get_state_dict", state_dict.get_state_dict),
        ("set_model_state_dict", state_dict.set_model_state_dict),
        ("set_optimizer_state_dict", state_dict.set_optimizer_state_dict),
        ("set_state_dict", state_dict.set_state_dict),
        ("_patch_model_state_dict", state_dict.patch_model_state_dict),
        ("_patch_optimizer_state_dict", state_dict.patch_optimizer_state_dict),
    ),
    "torch.distributed.checkpoint.utils": (
        ("_DistWrapper", dist.DistWrapper),
        ("find_tensor_shard", dist.find_tensor_shard),
        ("find_state_dict_object", dist.find_state_dict_object),
        ("_create_file_view", dist.create_file_view),
    ),
}


@dataclass
class _Installed:
    """What the one installed patch replaced, shared by every live handle."""

    # id(PyTorch's object) -> (PyTorch's object, sdict_ext's), and the reverse.
    by_original: dict[int, tuple[Any, Any]]
    by_replacement: dict[int, tuple[Any, Any]]
    # (module, attribute, PyTorch's object, sdict_ext's) for every rebinding made.
    changes: list[tuple[ModuleType, str, Any, Any]] = field(default_factory=list)
    missing: tuple[str, ...] = ()


_LOCK = threading.Lock()
_installed: _Installed | None = None
_holders = 0


def _torch_modules() -> list[ModuleType]:
    # A snapshot: another thread may be importing while we scan.
    return [
        module
        for name, module in list(sys.modules.items())
        if isinstance(module, ModuleType) and (name == "torch" or name.startswith("torch."))
    ]


def _rebind(pairs: dict[int, tuple[Any, Any]]) -> list[tuple[ModuleType, str, Any, Any]]:
    """Point every ``torch.*`` module attribute holding ``old`` at ``new``, for each pair."""
    changes = []
    for module in _torch_modules():
        namespace = module.__dict__
        for name, value in list(namespace.items()):
            pair = pairs.get(id(value))
            if pair is not None and pair[0] is value:
                setattr(module, name, pair[1])
                changes.append((module, name, value, pair[1]))
    return changes


def _install() -> _Installed:
    by_original: dict[int, tuple[Any, Any]] = {}
    missing: list[str] = []
    for module_name, names in _REPLACEMENTS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing += [f"{module_name}.{name}" for name, _ in names]
            continue
        for name, ours in names:
            original = module.__dict__.get(name)
            if original is None:
                missing.append(f"{module_name}.{name}")
            elif original is not ours:
                by_original[id(original)] = (original, ours)
    if missing:
        warnings.warn(
            f"sdict_ext.patch_torch: torch {torch.__version__} has no {', '.join(missing)}; "
            "left unpatched (everything else is patched)",
            RuntimeWarning,
            stacklevel=3,
        )
    by_replacement = {id(ours): (ours, original) for original, ours in by_original.values()}
    installed = _Installed(by_original, by_replacement, missing=tuple(missing))
    installed.changes = _rebind(by_original)
    return installed


def _restore(installed: _Installed) -> None:
    for module, name, original, ours in installed.changes:
        # A name someone rebound after us keeps their object: it is not ours to undo.
        if module.__dict__.get(name) is ours:
            setattr(module, name, original)
    # Modules imported while the patch was on bound our objects themselves.
    _rebind(installed.by_replacement)


class TorchPatch:
    """A handle on :func:`patch_torch`; ``undo()`` (or leaving the ``with``) releases it.

    Attributes:
        replaced: ``"module.name"`` of every attribute the patch rebound, sorted.
        missing: the PyTorch names the installed torch lacks (left unpatched).
    """

    def __init__(self, installed: _Installed) -> None:
        self.replaced = tuple(sorted({f"{m.__name__}.{n}" for m, n, _, _ in installed.changes}))
        self.missing = installed.missing
        self._active = True

    @property
    def active(self) -> bool:
        """Whether this handle still holds the patch (``undo()`` not called yet)."""
        return self._active

    def undo(self) -> None:
        """Release this handle; the last live handle restores what PyTorch had.

        Idempotent. Restores exactly the attributes the patch rebound, plus those that
        modules imported during the patch bound to sdict_ext's objects, to PyTorch's
        objects; an attribute someone else rebound meanwhile is left as it is.
        """
        global _installed, _holders
        with _LOCK:
            if not self._active:
                return
            self._active = False
            _holders -= 1
            if _holders == 0 and _installed is not None:
                _restore(_installed)
                _installed = None

    def __enter__(self) -> TorchPatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self._active else "undone"
        return f"<sdict_ext.TorchPatch {state}: {len(self.replaced)} names>"


def patch_torch() -> TorchPatch:
    """Make PyTorch's state-dict functions (and DCP's uses of them) run sdict_ext's.

    Replaces, on ``torch.distributed.checkpoint.state_dict``,
    ``torch.distributed._state_dict_utils`` and ``torch.distributed.checkpoint.utils``,
    every function and class sdict_ext implements (docs/API.md has the mapping), and
    every other ``torch.*`` module's binding of them, so code that cannot change an
    import (a trainer library, DCP itself) runs on sdict_ext. Results are the same
    as PyTorch's (sdict_ext's contract), minus the defects listed in docs/API.md.

    Idempotent and reference-counted: while a patch is on, another call patches
    nothing more and returns a new handle; torch is restored when every handle has
    been undone, so nested ``with sdict_ext.patch_torch():`` blocks compose. Safe to
    call from several threads. A name the installed torch lacks is reported in a
    ``RuntimeWarning`` and skipped. ``SDICT_EXT_PATCH=1`` in the environment calls
    this at ``import sdict_ext`` (for ``torchrun`` jobs whose code is not yours).

    Returns:
        A :class:`TorchPatch`; a context manager that undoes itself on exit.
    """
    global _installed, _holders
    with _LOCK:
        if _installed is None:
            _installed = _install()
        _holders += 1
        return TorchPatch(_installed)


def patch_from_environment() -> TorchPatch | None:
    """:func:`patch_torch` when ``SDICT_EXT_PATCH`` says so (``1``/``true``/``yes``/``on``)."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return patch_torch()
    if value not in ("", "0", "false", "no", "off"):
        warnings.warn(
            f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not understood; set it to 1 to patch torch "
            "at import, or 0 not to. Not patching.",
            RuntimeWarning,
            stacklevel=2,
        )
    return None
