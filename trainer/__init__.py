"""Trajectories -> gradient steps. Only `trainer/learner/` imports deepspeed."""
