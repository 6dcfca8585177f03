"""The model classes SGLang's registry starts with (`SGLANG_EXTERNAL_MODEL_PACKAGE`, set in rollout/engine.py).

By default SGLang's registry imports every one of its ~250 model modules to find the architecture a checkpoint
names: 3.3 s of one core in each engine, on the critical path of a run's start-up (bench/startup.py). Named as the
external package, only the modules here are imported; an architecture not listed still resolves, because SGLang
falls back to importing its whole registry when the first architecture is not found here."""
