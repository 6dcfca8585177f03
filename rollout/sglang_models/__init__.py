"""The model classes SGLang's registry starts with (`SGLANG_EXTERNAL_MODEL_PACKAGE`, set in rollout/engine.py).

By default SGLang's registry imports every one of its ~250 model modules to find the architecture a checkpoint
names (3.3 s of one core measured alone; an engine's scheduler started in 1.4 s instead of 2.5 s without it), on
the critical path of a run's start-up (bench/startup.py). Named as the external package, only the modules here
are imported; an architecture not listed still resolves, because SGLang falls back to importing its whole
registry when the first architecture is not found here."""
