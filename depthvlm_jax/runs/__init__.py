"""A training run as stored on disk, shared by training and by the tools that read runs.

`checkpoints` (orbax steps and the frozen parameters), `freeze` (the trainable/frozen split of the
parameter tree) and `model_from_config` (the model and parameter layout a run's config describes).
`depthvlm_jax.train` writes runs with them; `evaluation`, `predict`, `export` and the demo read runs
with them without importing the trainer.
"""
