"""The loop model behind bench/async_loop.py's `simulated` figures: exact on cases with a closed form, and never
past the staleness bound it models."""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace

import pytest

from trainer.config import REPO_ROOT

_spec = importlib.util.spec_from_file_location("loop_sim", REPO_ROOT / "bench" / "loop_sim.py")
loop_sim = sys.modules.setdefault("loop_sim", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(loop_sim)

FIXED = loop_sim.SimParams(groups_per_batch=2, group_size=3, median_len=10, max_len=10, sigma=0.0, engines=1,
                           fixed_s=0.01, per_request_s=0.001, train_fixed_s=0.2, train_per_token_s=0.0, sync_s=0.1,
                           batches=5)


def test_sync_matches_the_closed_form():
    """Equal lengths L: a step is L decode steps of (fixed + per_request * B * G), then training, then the push."""
    p = FIXED
    step = 10 * (0.01 + 0.001 * 6) + 0.2 + 0.1
    assert loop_sim.simulate("sync", p).samples_per_s == pytest.approx(6 / step, rel=1e-9)


def test_one_step_off_hides_training_behind_generation():
    """Generation (0.16 s per batch) overlaps training (0.2 s); the push (drained) still stalls both: a step
    costs max(train, generate) + sync once the pipeline is full."""
    r = loop_sim.simulate("one_step_off", replace(FIXED, batches=40))
    assert r.samples_per_s == pytest.approx(6 / (0.2 + 0.1), rel=0.03)
    assert r.max_staleness == 1


@pytest.mark.parametrize("eta", [1, 2, 4])
def test_async_bound_and_long_tail_gain(eta):
    # GLM5_SCALE's shape with lengths scaled down 16x, so the model runs in a second.
    p = replace(loop_sim.GLM5_SCALE, max_staleness=eta, batches=6, median_len=256, max_len=2048,
                train_per_token_s=loop_sim.GLM5_SCALE.train_per_token_s * 16)
    sync, fast = loop_sim.simulate("sync", p), loop_sim.simulate("async", p)
    assert fast.max_staleness <= eta and sync.max_staleness == 0
    assert fast.samples_per_s > sync.samples_per_s
