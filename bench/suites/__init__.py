"""The benchmark suites: each module defines ``cases(size, device)`` and ``run(spec, ctx)``.

``cases`` lists the workloads (plain :class:`~bench.harness.CaseSpec` data) for a size
and device; ``run`` builds one case's inputs and measures every implementation on them
through the :class:`~bench.harness.Ctx`. Spawned ranks import the suite by name and call
``run`` with the same spec, so nothing but the spec crosses process boundaries.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["SIZES", "SUITES", "get_suite"]

#: In run order. ``limits`` comes last in the table but its bounds feed every case.
SUITES = ("ops", "utils", "state_dict", "staging", "limits")

#: ``tiny`` is CI's smoke size (``--tiny``); ``small`` is the default.
SIZES = ("tiny", "small", "medium", "large")


def get_suite(name: str) -> ModuleType:
    """The suite module ``bench.suites.<name>``, or the module a dotted path names.

    A dotted path (``tests.bench_crash_suite``) runs a suite kept outside the package,
    e.g. one a test injects to check the harness itself.
    """
    if "." in name:
        return importlib.import_module(name)
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    return importlib.import_module(f"bench.suites.{name}")
