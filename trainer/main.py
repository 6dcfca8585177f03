"""The RL loop on one screen: generate -> reward -> train -> sync weights -> log -> checkpoint.

    python -m trainer.main +experiment=quickstart [overrides...]

The config is validated (trainer/config.py) before Ray or any engine starts."""
from __future__ import annotations

import logging
import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from rollout.data import DataError
from trainer.config import REPO_ROOT, ConfigError, RunConfig, parse_config

log = logging.getLogger("slipstream")


def run(cfg: RunConfig) -> dict[str, float]:
    from trainer.runtime import Runtime

    rt = Runtime.start(cfg)
    metrics: dict[str, float] = {}
    try:
        start = rt.resume()                                  # the newest run checkpoint, if any; else step 0
        for step in range(start, cfg.trainer.num_steps):
            t0 = time.perf_counter()
            samples = rt.generate(step)                      # rollout with weight version `step`
            rt.score(samples)                                # rewards (async plugins)
            t1 = time.perf_counter()
            metrics = rt.train(samples)                      # GRPO step on the Megatron ranks
            t2 = time.perf_counter()
            rt.sync_weights(version=step + 1)                # push new weights into every engine
            t3 = time.perf_counter()
            metrics.update(rt.rollout_metrics(samples))
            metrics.update(rt.evaluate(step))                # eval rows under the new weights, every eval.interval
            metrics.update({"perf/rollout_time": t1 - t0, "perf/train_time": t2 - t1,
                            "perf/update_weights_time": t3 - t2})
            rt.log(step, metrics)
            rt.save_checkpoint(step)                         # every checkpoint.save_interval steps
        rt.save_final()
    finally:
        rt.shutdown()
    return metrics


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
    except ConfigError as exc:  # a checkpoint the config cannot resume (another layout, a dropped buffer)
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
    except DataError as exc:  # bad rows in strict mode (before Ray starts), or a cursor that does not fit
        print(f"data error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
