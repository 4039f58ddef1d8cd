"""Model FLOPs: every matmul and convolution of a program's jaxpr (no compile), scan bodies times
their trip counts; the attention part separately (what the cost model skips for Pallas kernels)."""

from __future__ import annotations

import math
from typing import Callable

def _subjaxprs(eqn):
  from jax.extend import core as jex_core
  for v in eqn.params.values():
    for x in (v if isinstance(v, (list, tuple)) else [v]):
      if isinstance(x, jex_core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jex_core.Jaxpr):
        yield x


def jaxpr_flops(jaxpr, mult: float = 1.0, scope: str | None = None) -> float:
  """FLOPs of every dot_general / conv_general_dilated in a jaxpr (scan bodies x their length).

  For a `cond`, the most expensive branch counts (the update branch of the NaN guard). scope: count
  only the operations traced under a `jax.named_scope` of that name (their gradients included).
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    counted = scope is None or scope in str(eqn.source_info.name_stack)
    if name == "dot_general" and counted:
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += mult * 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
    elif name == "conv_general_dilated" and counted:
      rhs = eqn.invars[1].aval.shape
      out_ch = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += mult * 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / out_ch
    subs = list(_subjaxprs(eqn))
    if name == "cond":
      total += max((jaxpr_flops(s, mult, scope) for s in subs), default=0.0)
    else:
      inner = mult * (eqn.params["length"] if name == "scan" else 1)
      total += sum(jaxpr_flops(s, inner, scope) for s in subs)
  return total


def model_flops(fn: Callable, *args) -> float:
  return sum(model_flops_split(fn, *args))


def model_flops_split(fn: Callable, *args) -> tuple[float, float]:
  """(FLOPs outside attention, attention FLOPs) of `fn`'s matmuls and convolutions. The attention
  part is what the XLA form of attention (`layers.ATTENTION_SCOPE`) computes, gradients included."""
  import jax
  from depthvlm_jax.model.layers import ATTENTION_SCOPE
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  attention = jaxpr_flops(jaxpr, scope=ATTENTION_SCOPE)
  return jaxpr_flops(jaxpr) - attention, attention
