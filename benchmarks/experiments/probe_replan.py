"""Does a warm-up re-plan slow the decode? bench_policies with every `moepic` engine forced to re-plan once.

Earlier GPU runs saw `static`/`moepic` + adapt_to_prompt at 25 % decode at 17-25 ms per token after a warm-up
re-plan against 9.7 ms without one, at about the same hits and bytes (docs/notes/2026-11-30-benchmark-diary.md).
Where the planner picks whole experts and no prediction (Qwen1.5-MoE on the H200), `moepic` runs as `static`, so
this probe compares the two: a `moepic` engine's first budget check sees --extra-gib more than the compiled steps
need, and the engine re-plans its caches with about that much less, as a real overshoot would. Everything else is
benchmarks.bench_policies (same arguments, same output).

Usage (GPU):
  python -m benchmarks.experiments.probe_replan --extra-gib 0.43 -- --pairs static:0.25:adapt,moepic:0.25:adapt
"""

import argparse
import sys

from benchmarks import bench_policies
from moepic_jax.runtime.engine import OffloadEngine


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extra-gib", type=float, default=0.43, help="added to the first budget check of moepic engines")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: bench_policies' arguments")
    args = ap.parse_args(argv)
    real = OffloadEngine.device_bytes_needed

    def need(self, state):
        n = real(self, state)
        if self.policy == "moepic" and not self.__dict__.get("_probe_forced"):
            self._probe_forced = True  # once per engine: the first check re-plans, the next ones see the real need
            return n + int(args.extra_gib * 2**30)
        return n

    OffloadEngine.device_bytes_needed = need
    rest = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    return bench_policies.main(rest)


if __name__ == "__main__":
    sys.exit(main())
