"""The prompt cursor: a run resumed from `state()` serves exactly what the uninterrupted run would have served --
no repeats, no gaps -- across epoch boundaries, and refuses a cursor saved for different data."""
from __future__ import annotations

import json

import pytest

from rollout.data import DataError, DataExhausted, PromptRow, PromptSource, load_data, make_source
from trainer.config import DataConfig


def rows(n: int, tag: str = "p") -> list[PromptRow]:
    return [PromptRow(i, [{"role": "user", "content": f"{tag} {i}"}]) for i in range(n)]


def served(batches) -> list[int]:
    return [r.index for b in batches for r in b]


@pytest.mark.parametrize("stop_after", [1, 2, 3, 4])   # 7 rows, batches of 3: stops before, at and after epoch 0->1
def test_resume_across_epoch_boundary_has_no_repeats_or_gaps(stop_after):
    data = rows(7)
    reference = PromptSource(data, seed=5)
    expected = served(reference.next_batch(3) for _ in range(8))

    first = PromptSource(data, seed=5)
    before = served(first.next_batch(3) for _ in range(stop_after))
    saved = json.loads(json.dumps(first.state()))    # the buffer stores it as plain JSON
    resumed = PromptSource(data, seed=999)             # config seed changed: the saved one must win
    resumed.load_state(saved)
    after = served(resumed.next_batch(3) for _ in range(8 - stop_after))
    assert before + after == expected
    # each epoch is a permutation: every row exactly once per 7 served
    for e in range(3):
        assert sorted(expected[7 * e:7 * e + 7]) == list(range(7))
    assert expected[:7] != expected[7:14]   # epochs are reshuffled


def test_cursor_state_is_small_and_names_the_dataset():
    src = PromptSource(rows(4), seed=1)
    src.next_batch(5)
    state = src.state()
    assert state["epoch"] == 1 and state["position"] == 1 and state["seed"] == 1
    assert state["fingerprint"].startswith("4:")


def test_load_state_refuses_another_dataset():
    saved = PromptSource(rows(5), seed=0).state()
    with pytest.raises(DataError, match="different dataset"):
        PromptSource(rows(5, tag="other"), seed=0).load_state(saved)
    with pytest.raises(DataError, match="different dataset"):
        PromptSource(rows(6), seed=0).load_state(saved)
    with pytest.raises(DataError, match="lacks"):
        PromptSource(rows(5), seed=0).load_state({"epoch": 0, "position": 0, "seed": 0})


def test_epoch_limit_serves_a_short_last_batch_then_stops():
    src = PromptSource(rows(5), seed=0, epochs=2)
    assert len(src.next_batch(4)) == 4 and len(src.next_batch(4)) == 4
    last = src.next_batch(4)
    assert len(last) == 2 and src.exhausted
    with pytest.raises(DataExhausted):
        src.next_batch(1)


def test_unshuffled_order_is_file_order():
    src = PromptSource(rows(3), shuffle=False)
    assert served([src.next_batch(7)]) == [0, 1, 2, 0, 1, 2, 0]


def test_config_resume_through_load_data(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"messages": f"q{i}"}) + "\n" for i in range(5)))
    cfg = DataConfig(path=str(path), shuffle_seed=2)
    src = make_source(cfg, load_data(cfg).train)
    head = served([src.next_batch(3)])
    state = src.state()
    tail_ref = served([src.next_batch(4)])
    again = make_source(cfg, load_data(cfg).train)   # a new process re-reads the file
    again.load_state(state)
    assert served([again.next_batch(4)]) == tail_ref
    assert len(set(head + tail_ref[:2])) == 5

    path.write_text(path.read_text() + json.dumps({"messages": "new row"}) + "\n")
    changed = make_source(cfg, load_data(cfg).train)
    with pytest.raises(DataError, match="different dataset"):
        changed.load_state(state)
