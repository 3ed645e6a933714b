"""On the device at hand: the embedded model's tokens with direct copies (`offload/transfer.py`) against the resident
model's, for every offloading policy at 25 % of the expert bytes, prefetch on where the policy predicts.

  PYTHONPATH=. python -m benchmarks.experiments.direct.check_exact
"""
import jax

import moepic_jax
from moepic_jax.offload import transfer
from moepic_jax.runtime.factory import make_engine

PROMPT = "def read_config(path):\n    "


def main():
    m = moepic_jax.load(None)
    ref = moepic_jax.generate(PROMPT, model=m, max_new_tokens=24, policy="resident").token_ids
    ok = True
    for policy in ("ondemand", "lru", "static", "moepic"):
        eng = make_engine(m, policy=policy, vram_budget="25%", prefetch=None if policy == "ondemand" else True,
                          direct=True)
        res = moepic_jax.generate(PROMPT, model=m, max_new_tokens=24, engine=eng)
        same = res.token_ids == ref
        ok &= same
        print(f"{policy:8s} direct={eng.direct} prefetch={eng.prefetches} same tokens as resident: {same} "
              f"hits {1 - res.stats.miss_rate:.1%} H2D {res.stats.h2d_bytes_per_token / 1e6:.2f} MB/token")
    print(f"direct copies ran {transfer.mode(jax.devices()[0].platform)}")
    print("ALL EXACT" if ok else "MISMATCH")


if __name__ == "__main__":
    main()
