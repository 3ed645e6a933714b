"""The benchmarks of moepic_jax, run from the repo root as modules.

  python -m benchmarks --model qwen15            # the suite of one model (benchmarks/__main__.py)
  python -m benchmarks.bench_policies ...        # one benchmark
  python -m benchmarks.experiments.probe_step    # a probe that answered its question (benchmarks/experiments/)

Nothing is imported here: `common` imports JAX, and some scripts must set XLA_* variables first.
"""
