"""The RL loop on one screen, the same for every loop mode (loop.mode: sync | one_step_off | async):
next batch -> train -> push weights -> evaluate -> log -> checkpoint.

    python -m trainer.main +experiment=quickstart [overrides...]

What differs between modes is when the rollout manager generates (rollout/manager.py): in sync mode only the
batch being waited for; in one_step_off and async modes the next batches too, while this loop trains. The config
is validated (trainer/config.py) before Ray or any engine starts."""
from __future__ import annotations

import logging
import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from rollout.data import DataError
from trainer.config import REPO_ROOT, ConfigError, RunConfig, parse_config

log = logging.getLogger("slipstream")


def run(cfg: RunConfig, **start_options) -> list[dict[str, float]]:
    """Runs the loop; returns each step's metrics (what W&B gets)."""
    from trainer.launch import launch

    launched = launch(cfg, **start_options)                  # checks, Ray, the engines starting (no torch yet)
    from trainer.runtime import Runtime

    rt = Runtime.start(cfg, launched)                        # the trainer ranks, W&B; waits for the engines
    history: list[dict[str, float]] = []
    try:
        start = rt.resume()                                  # the newest run checkpoint, if any; generation starts
        for step in range(start, cfg.trainer.num_steps):
            t0 = time.perf_counter()
            batch = rt.next_batch(step)                      # scored groups; waits only while generation is behind
            t1 = time.perf_counter()
            metrics = rt.train(batch)                        # GRPO on the Megatron ranks
            t2 = time.perf_counter()
            metrics.update(rt.sync_weights(step))            # every loop.sync_interval steps: pause, push, resume
            t3 = time.perf_counter()
            metrics.update(rt.evaluate(step))                # eval rows under the new weights, every eval.interval
            metrics.update({"perf/rollout_time": t1 - t0, "perf/train_time": t2 - t1,
                            "perf/update_weights_time": t3 - t2, "perf/step_time": time.perf_counter() - t0})
            rt.log(batch, metrics)
            rt.save_checkpoint(step)                         # every checkpoint.save_interval steps
            history.append(metrics)
        rt.save_final()
    finally:
        rt.shutdown()
    return history


@hydra.main(config_path=str(REPO_ROOT / "conf"), config_name="config", version_base=None)
def main(hydra_cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = parse_config(OmegaConf.to_container(hydra_cfg, resolve=True))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        run(cfg)
    except ConfigError as exc:  # a checkpoint the config cannot resume (another layout or group size)
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
    except DataError as exc:  # bad rows in strict mode (before Ray starts), or a cursor that does not fit
        print(f"data error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
