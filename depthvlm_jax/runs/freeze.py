"""Trainable/frozen split of the parameter tree by regex rules.

Freezing follows big_vision: a list of (regex over "a/b/c" parameter paths, trainable?) rules,
first match wins, and every parameter must be matched by some rule (a typo cannot silently freeze
or train a tower). Frozen parameters are kept out of `jax.grad` and carry no optimizer state.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from flax.traverse_util import flatten_dict as flatten, unflatten_dict as unflatten


class FreezeRuleError(ValueError):
  pass


def path_str(path: tuple[str, ...]) -> str:
  return "/".join(path)


def trainable_mask(params: Mapping[str, Any], rules: Sequence[tuple[str, bool]]) -> dict[tuple[str, ...], bool]:
  """Flat {path: trainable} from ordered (regex, trainable) rules; raises if a path matches none."""
  compiled = [(re.compile(p), bool(t)) for p, t in rules]
  out, unmatched = {}, []
  for path in flatten(params):
    s = path_str(path)
    for pattern, trainable in compiled:
      if pattern.fullmatch(s):
        out[path] = trainable
        break
    else:
      unmatched.append(s)
  if unmatched:
    raise FreezeRuleError(f"{len(unmatched)} parameters match no trainable/frozen rule, e.g. {unmatched[:5]}; "
                          "add a catch-all rule such as ('.*', False)")
  unused = [p for p, _ in rules if not any(re.fullmatch(p, path_str(q)) for q in out)]
  if unused:
    raise FreezeRuleError(f"freeze rules {unused} match no parameter (typo?)")
  return out


def split_params(params: Mapping[str, Any], mask: Mapping[tuple[str, ...], bool]):
  """-> (trainable tree, frozen tree), disjoint; `merge_params` undoes it."""
  flat = flatten(params)
  return (unflatten({p: v for p, v in flat.items() if mask[p]}),
          unflatten({p: v for p, v in flat.items() if not mask[p]}))


def merge_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, Any]:
  flat = flatten(frozen)
  flat.update(flatten(trainable))
  return unflatten(flat)
