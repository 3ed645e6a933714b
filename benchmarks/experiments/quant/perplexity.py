"""Held-out perplexity of the embedded model with bfloat16, int8 and int4 experts at several group sizes: the
measure of `checkpoints/stdlib_moe/eval.json` (float32 compute from the stored weights, 2048 tokens of the shipped
held-out sample in chunks of 512; `tools/train_embedded.sample_perplexity`), and the stored expert bytes.

  python -m benchmarks.experiments.quant.perplexity --out ppl.json       # CPU, ~2 minutes
"""
from __future__ import annotations

import argparse
import json

import moepic_jax
from moepic_jax.io import checkpoint
from tools import train_embedded as train

RUNS = [(None, None), ("int8", 128), ("int8", 256), ("int8", 32), ("int4", 64), ("int4", 128), ("int4", 32)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    d = checkpoint.default_checkpoint_dir()
    ev = json.loads((d / "eval.json").read_text())
    text = (d / ev["sample"]).read_text(encoding="utf-8")[ev["offset_chars"]:]
    rows = []
    for experts, group in RUNS:
        m = moepic_jax.load(dtype="float32", experts=experts, group=group)
        ppl = train.sample_perplexity(m, text, ev["n_tokens"], ev["chunk"])
        stored = sum(lp.moe.experts.nbytes for lp in m.params.layers if lp.moe is not None)
        if experts is None:  # the stored stacks are bfloat16; this float32 load holds them at 4 bytes a value
            stored //= 2
        rows.append(dict(experts=experts or "bfloat16", group=group, ppl=ppl, expert_bytes=stored))
        print(rows[-1], flush=True)
    base = rows[0]
    print("\n| experts | group | perplexity | vs bf16 | expert bytes | smaller by |\n|---|---|---|---|---|---|")
    for r in rows:
        change = "-" if r is base else f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f} %"
        print(f"| {r['experts']} | {r['group'] or '-'} | {r['ppl']:.3f} | {change} | "
              f"{r['expert_bytes'] / 1e6:.1f} MB | {base['expert_bytes'] / r['expert_bytes']:.2f}x |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(eval=ev, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
