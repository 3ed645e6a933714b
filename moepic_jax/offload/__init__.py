"""Offloading: experts in pinned host memory, a VRAM cache of top segments, next-layer prediction and prefetch.

  policies.py   the one policy registry (rule, prediction, split, how the plan is made)
  placement.py  devices and the expert mesh axis
  memory.py     the VRAM budget and the fixed part of an engine's device bytes
  store.py      the pinned host stacks [E, F, 3, D] per MoE layer
  cache.py      per-layer slots of top segments and the replacement rules (pure functions)
  copy_step.py  one layer's copies: misses whole, bottoms of top hits, admission into the slots
  decode.py     the compiled decode step (predictor, prefetch, copy step, counters)
  prefill.py    the prefill layer step, stack assembly, the prompt refill
"""
