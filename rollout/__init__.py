"""Rollout: SGLang engines as Ray actors, sample generation, reward scoring. Never imports trainer/."""
