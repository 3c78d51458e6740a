"""A short run of scripts/chaos.py: random operations, server kills and daemon kills (some in the
middle of an operation or at an armed kill point) against a real daemon, with every invariant
checked after each step. The long run (200 operations) is the script itself."""

from __future__ import annotations

import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import chaos  # noqa: E402

SEED = int(os.environ.get("MODELD_CHAOS_SEED", 20261123))  # replay another run with its seed


@pytest.mark.slow
def test_short_chaos_run_loses_nothing_and_signals_no_stranger(home):
    result = chaos.run(ops=40, seed=SEED, home=home, keep=True)
    assert {key: result[key] for key in chaos.BAD} == dict.fromkeys(chaos.BAD, 0), result
    assert result["operations"] == 40
    assert result["daemon_kills"] > 0, result
    assert result["failed_calls"] == 0, result
