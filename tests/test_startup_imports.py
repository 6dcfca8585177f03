"""Work kept off the start-up path (bench/startup.py) and a run's first steps, each checked in a fresh interpreter:
what an engine or a trainer rank imports before it can serve is most of a run's start-up on 2 cores."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU start-up path")


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_an_engine_resolves_glm_without_importing_sglangs_other_models():
    facts = _run("""
import importlib.util, json, sys
import rollout.engine
rollout.engine.prepare_engine_process()
from sglang.srt.models.registry import ModelRegistry
glm5 = ModelRegistry.resolve_model_cls(["GlmMoeDsaForCausalLM"])[1]
glm45 = ModelRegistry.resolve_model_cls(["Glm4MoeForCausalLM"])[1]
before = sorted(m for m in sys.modules if m.startswith("sglang.srt.models.") and m.count(".") == 3)
llama = ModelRegistry.resolve_model_cls(["LlamaForCausalLM"])[1]
print(json.dumps({"glm5": glm5, "glm45": glm45, "models_imported": before, "llama": llama,
                  "flashinfer_found": importlib.util.find_spec("flashinfer") is not None}))
""")
    assert (facts["glm5"], facts["glm45"]) == ("GlmMoeDsaForCausalLM", "Glm4MoeForCausalLM")
    # glm4_moe and what it builds on (deepseek_v2, ...), not SGLang's ~250 model modules
    assert len(facts["models_imported"]) < 15, facts["models_imported"]
    assert facts["llama"] == "LlamaForCausalLM", "an architecture outside rollout/sglang_models must still resolve"
    assert not facts["flashinfer_found"]


def test_a_trainer_rank_imports_megatron_without_flashinfer():
    facts = _run("""
import json, sys
from glm5_model.compat import install_compat
install_compat()
import megatron.core.inference.contexts.dynamic_context as ctx
print(json.dumps({"flashinfer_loaded": sys.modules.get("flashinfer") is not None, "have": ctx.HAVE_FLASHINFER}))
""")
    assert facts == {"flashinfer_loaded": False, "have": False}


def test_a_cpu_rank_runs_megatrons_compiled_functions_eagerly():
    """Inductor compiled Megatron's jit_fuser functions during a rank's first two training steps (~2.6 s)."""
    facts = _run("""
import json, torch
from glm5_model.compat import install_compat
install_compat()
from megatron.core.jit import jit_fuser
import torch._dynamo.utils as du
fused = jit_fuser(lambda x: torch.sigmoid(x) * x)
fused(torch.ones(4))
import os
print(json.dumps({"frames_compiled": du.counters["frames"]["total"],
                  "in_environment": "TORCH_COMPILE_DISABLE" in os.environ}))
""")
    # ... and only in that process: not through the environment its children (Ray, engines) would inherit
    assert facts == {"frames_compiled": 0, "in_environment": False}


def test_the_driver_checks_and_starts_engines_without_importing_torch(tiny_checkpoint):
    """trainer/launch.py starts the engines before the driver imports torch (1 s of one core): the config checks,
    the checkpoint, tokenizer and data checks, the modules launch imports and the engine actor's class leave torch
    out."""
    facts = _run(f"""
import json, sys
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from trainer.config import parse_config
with initialize_config_dir(config_dir={str(REPO / "conf")!r}, version_base=None):
    raw = compose(config_name="config", overrides=["+experiment=quickstart", "model.checkpoint_dir={tiny_checkpoint}"])
cfg = parse_config(OmegaConf.to_container(raw, resolve=True))
import trainer.launch
from glm5_model.hf_checkpoint import ensure_checkpoint
from glm5_model.tokenizer import load_tokenizer
from rollout.data import load_data
checkpoint = ensure_checkpoint(cfg.model.preset, {str(tiny_checkpoint)!r}, cfg.model.init_seed)
data = load_data(cfg.data, load_tokenizer(checkpoint))
trainer.launch.task_rewards(cfg)
from rollout.engine import RolloutEngineActor
print(json.dumps({{"rows": len(data.train) > 0, "torch": "torch" in sys.modules}}))
""")
    assert facts == {"rows": True, "torch": False}
