"""rollout/sglang_process.py without starting an engine: the start-method switch around SGLang's launch."""
from __future__ import annotations

import multiprocessing as mp

import pytest

import sglang.srt.entrypoints.engine as sglang_engine
from rollout import sglang_process


def _stub_launch_setup(monkeypatch):
    """SGLang's own setup, reduced to the one line this switch answers: it forces spawn."""
    calls = []

    def set_envs_and_config(server_args):
        calls.append(server_args)
        mp.set_start_method("spawn", force=True)

    monkeypatch.setattr(sglang_engine, "_set_envs_and_config", set_envs_and_config)
    return calls


def test_children_are_forked_during_the_launch_and_spawned_again_after_it(monkeypatch):
    calls = _stub_launch_setup(monkeypatch)
    with sglang_process._children_forked(True):
        sglang_engine._set_envs_and_config("args")  # what Engine.__init__ calls before starting its processes
        assert mp.get_start_method() == "fork"
    assert calls == ["args"]
    assert mp.get_start_method() == "spawn"
    sglang_engine._set_envs_and_config("again")  # SGLang's own setup is back in place
    assert mp.get_start_method() == "spawn"


def test_a_failed_launch_restores_sglang_setup(monkeypatch):
    _stub_launch_setup(monkeypatch)
    original = sglang_engine._set_envs_and_config
    with pytest.raises(RuntimeError, match="scheduler died"):
        with sglang_process._children_forked(True):
            sglang_engine._set_envs_and_config("args")
            raise RuntimeError("scheduler died")
    assert sglang_engine._set_envs_and_config is original and mp.get_start_method() == "spawn"


def test_without_fork_sglang_setup_is_untouched(monkeypatch):
    _stub_launch_setup(monkeypatch)
    original = sglang_engine._set_envs_and_config
    with sglang_process._children_forked(False):
        assert sglang_engine._set_envs_and_config is original
        sglang_engine._set_envs_and_config("args")
        assert mp.get_start_method() == "spawn"
