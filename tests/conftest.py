"""Session plumbing for the multi-process harness in ``tests/mp.py``."""

from __future__ import annotations

import pytest

from tests import mp


@pytest.fixture(scope="session", autouse=True)
def _stop_rank_pools():
    """Stop the cached worker pools when the session ends, not just at interpreter exit,
    so their processes never outlive a pytest run embedded in another program."""
    yield
    mp.shutdown_pools()
