"""Weight sync from the trainer ranks to the rollout engines (docs/weight-sync.md).

Rank side (imported by trainer/actor.py): plan.py (which tensors each rank sends, in buckets), sender.py (fill and
send), memory.py (measuring what a push allocates). Driver side (imported by trainer/runtime.py):
strategies.py (`build_weight_sync`; tensor / distributed / disk). Kept apart, and this file imports neither, so the
rank actor and the trainer group never import each other.
"""
