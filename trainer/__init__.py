"""Megatron-core training actors, RL losses and the driver loop (`python -m trainer.main +experiment=NAME`)."""
