"""Reward metrics a run logs beyond per-sample means."""
from __future__ import annotations


def test_run_logs_hallucination_rate_from_batch_components():
    """What a run logs for a factuality batch: the runner's '<name>/<component>' keys through the reward's own
    batch-metrics function (rollout/metrics.py)."""
    from rewards import RewardInput, RewardRunner, RewardSpec
    from rollout.metrics import reward_batch_metrics_for

    q = [{"role": "user", "content": "What is the capital of France?"}]
    samples = [RewardInput(q, "Paris", "Paris"), RewardInput(q, "I don't know.", "Paris"),
               RewardInput(q, "Lyon", "Paris"), RewardInput(q, "Marseille", "Paris")]
    results = RewardRunner([RewardSpec("factuality")]).score_many_sync(samples)
    metrics = reward_batch_metrics_for("factuality", [r.components for r in results])
    assert metrics["reward/factuality/accuracy"] == 0.25
    assert metrics["reward/factuality/abstention_rate"] == 0.25
    assert metrics["reward/factuality/hallucination_rate"] == 2 / 3
