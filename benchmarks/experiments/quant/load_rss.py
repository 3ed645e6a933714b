"""Peak host memory of `moepic_jax.load` for one checkpoint and expert format: one fresh process per format.

Prints and writes (JSON) per format: load seconds, the process's peak resident set (ru_maxrss), the checkpoint's
bytes on disk, the pinned expert bytes, and the peak minus the process's RSS before loading. A quantized load that
materialised every layer's experts at full precision would peak near the bfloat16 expert bytes; one that quantizes
layer by layer (README "Quantized experts") peaks near the packed bytes plus one layer.

  python -m benchmarks.experiments.quant.load_rss CKPT_DIR --formats none,int8,int4 --out rss.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import jax
import moepic_jax
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
before = rss()
t = time.perf_counter()
m = moepic_jax.load(sys.argv[1], experts=None if sys.argv[2] == "none" else sys.argv[2])
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
experts = sum(lp.moe.experts.nbytes for lp in m.params.layers if lp.moe is not None)
print(json.dumps(dict(format=sys.argv[2], load_s=dt, rss_before=before, peak_rss=peak, rss_after=rss(),
                      expert_bytes=experts)))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--formats", default="none,int8,int4")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    disk = sum(f.stat().st_size for f in pathlib.Path(a.ckpt).glob("*.safetensors"))
    rows = []
    for fmt in a.formats.split(","):
        p = subprocess.run([sys.executable, "-c", CHILD, a.ckpt, fmt], capture_output=True, text=True,
                           timeout=a.timeout)
        if p.returncode:
            rows.append(dict(format=fmt, error=p.stderr[-1500:]))
        else:
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(f"\ncheckpoint {disk / 2**30:.2f} GiB on disk\n| experts | load s | peak RSS GiB | peak - before GiB | "
          "expert bytes GiB |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['format']} | error | | | |")
            continue
        eb = f"{r['expert_bytes'] / 2**30:.2f}"
        print(f"| {r['format']} | {r['load_s']:.1f} | {r['peak_rss'] / 2**30:.2f} | "
              f"{(r['peak_rss'] - r['rss_before']) / 2**30:.2f} | {eb} |")
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps(dict(checkpoint=a.ckpt, disk_bytes=disk, rows=rows), indent=1))


if __name__ == "__main__":
    main()
