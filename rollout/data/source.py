"""Serving prompts: shuffled epochs with a cursor the rollout buffer checkpoints, so a resumed run continues
exactly where it stopped (no repeats, no gaps), including across epoch boundaries."""
from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from rollout.data.rows import DataError, PromptRow


class DataExhausted(DataError):
    """All configured epochs have been served."""


def dataset_fingerprint(rows: list[PromptRow]) -> str:
    """Row count + a hash of what each row asks. A cursor position only means something for the same rows in the
    same order, so a changed file (or a different skip-mode outcome) must not silently resume mid-epoch."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.index, r.messages, r.tools, r.label], sort_keys=True, default=str,
                            ensure_ascii=False).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return f"{len(rows)}:{h.hexdigest()[:16]}"


class PromptSource:
    """Epochs over `rows`, shuffled per epoch by (seed, epoch) so any epoch's order can be rebuilt from the
    cursor alone. `epochs=None` serves forever; otherwise the last batch may be short and then DataExhausted."""

    def __init__(self, rows: list[PromptRow], seed: int = 0, *, shuffle: bool = True, epochs: int | None = None):
        if not rows:
            raise DataError("no prompt rows to serve (every row was dropped, or the source is empty)")
        self.rows, self.seed, self.shuffle, self.epochs = rows, seed, shuffle, epochs
        self.fingerprint = dataset_fingerprint(rows)
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    @property
    def exhausted(self) -> bool:
        return (self.epochs is not None and self.position == len(self._order)
                and self.epoch + 1 >= self.epochs)

    def next_batch(self, n: int) -> list[PromptRow]:
        out: list[PromptRow] = []
        while len(out) < n and not self.exhausted:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            out.append(self.rows[self._order[self.position]])
            self.position += 1
        if not out:
            raise DataExhausted(f"all {self.epochs} epoch(s) of {len(self.rows)} prompts have been served")
        return out

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "fingerprint": self.fingerprint}

    def load_state(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("epoch", "position", "seed", "fingerprint") if k not in state]
        if missing:
            raise DataError(f"data cursor: saved state lacks {missing}; cannot resume exactly")
        if state["fingerprint"] != self.fingerprint:
            raise DataError(f"data cursor: saved for a different dataset (fingerprint {state['fingerprint']}, "
                            f"this one is {self.fingerprint}); the file, its rows or the skip-mode result changed "
                            "since the checkpoint")
        if not 0 <= state["position"] <= len(self.rows) or state["epoch"] < 0:
            raise DataError(f"data cursor: position {state['position']} / epoch {state['epoch']} out of range "
                            f"for {len(self.rows)} rows")
        # The saved seed/shuffle win over the config: the point is to replay the same order.
        self.seed, self.shuffle = state["seed"], state.get("shuffle", True)
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)
