"""The learning-rate schedule and the optax optimizer (the trainable/frozen split is `runs.freeze`)."""

from __future__ import annotations

import optax


def learning_rate_schedule(peak: float, total_steps: int, warmup_fraction: float) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_fraction` of the steps, then cosine decay to 0."""
  warmup = max(1, int(round(total_steps * warmup_fraction)))
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end_value=0.0)


def make_optimizer(schedule: optax.Schedule, grad_clip: float, weight_decay: float, b1: float = 0.9,
                   b2: float = 0.999) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW (decoupled weight decay)."""
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
