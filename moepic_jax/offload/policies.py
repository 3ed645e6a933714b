"""The one registry of policies: name -> where the experts live, the cache's replacement rule, whether the step
predicts the next layer's experts, whether the plan may split experts, and how the plan is made.

DESIGN.md's policy table:
  resident  every weight on the device                       the speed ceiling, when it fits
  ondemand  no cache, no prediction: copy the k experts       naive expert offloading
  lru       whole experts, equal slots per layer, LRU rule    Mixtral-offloading (Eliseev & Mazur 2023)
  static    planner, whole experts only, the hot set fixed    MoE-Infinity / AdapMoE-like caching
  moepic    planner with split, hot top segments, freq rule   MoEpic (arXiv 2509.08342); `cache.py`: why freq
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """What a policy is. `plan`: "none" (nothing cached), "slots" (the same number of whole-expert slots in every MoE
    layer, warm-started with the hottest experts) or "solve" (`planner.solve` under the cache budget)."""

    name: str
    offloads: bool  # experts in pinned host memory (False: all on the device)
    rule: str  # the cache's replacement rule (`cache.RULES`)
    predicts: bool  # the decode step may predict and prefetch the next layer's experts
    allow_split: bool  # the plan may cache top segments (0 < split < d_ff)
    plan: str  # "none" | "slots" | "solve"
    adapts_to_prompt: bool = False  # `adapt_to_prompt` may refill its slots from the prompt's routing


POLICY_SPECS = {s.name: s for s in (
    PolicySpec("resident", offloads=False, rule="static", predicts=False, allow_split=False, plan="none"),
    PolicySpec("ondemand", offloads=True, rule="static", predicts=False, allow_split=False, plan="none"),
    PolicySpec("lru", offloads=True, rule="lru", predicts=True, allow_split=False, plan="slots"),
    PolicySpec("static", offloads=True, rule="static", predicts=True, allow_split=False, plan="solve",
               adapts_to_prompt=True),
    PolicySpec("moepic", offloads=True, rule="freq", predicts=True, allow_split=True, plan="solve",
               adapts_to_prompt=True),
)}
POLICIES = tuple(POLICY_SPECS)
OFFLOAD_POLICIES = tuple(n for n, s in POLICY_SPECS.items() if s.offloads)


def policy_spec(name: str, offloading: bool = False) -> PolicySpec:
    """The spec of policy `name`. Raises ValueError for an unknown name (or, with offloading=True, `resident`)."""
    choices = OFFLOAD_POLICIES if offloading else POLICIES
    if name not in choices:
        kind = "offloading policy" if offloading else "policy"
        raise ValueError(f"unknown {kind} {name!r}; choose one of {', '.join(choices)}")
    return POLICY_SPECS[name]
