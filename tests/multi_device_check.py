"""Several devices, run by tests/test_multi_device.py in a child process: the device count of the CPU
backend (`--xla_force_host_platform_device_count`) must be set before JAX starts, and the main test process has
one device.

For each family and policy, an engine whose experts are split over an `expert` mesh axis of 2 (and 4) virtual
devices is compared with the one-device resident model: teacher-forced float32 logits within 1e-5, identical greedy
tokens (one prompt and a batch of two), something copied, and the per-device budget respected. Prints one JSON
line per case, then "DONE".

  python tests/multi_device_check.py [family ...]
"""

import gc
import json
import os
import sys
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_allow_excess_precision=false"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from conftest import FAMILIES, build_hf_model  # noqa: E402
from test_offload import BATCH, NEW, SINGLE, teacher_forced  # noqa: E402

import moepic_jax  # noqa: E402
from moepic_jax.runtime.engine import ResidentEngine  # noqa: E402
from moepic_jax.runtime.factory import make_engine  # noqa: E402

KW = dict(granule=16, max_batch=2, max_seq_len=32)


def kw(policy):  # the prefetch path too (default: as planned); ondemand never predicts
    return KW if policy == "ondemand" else {**KW, "prefetch": True}
POLICIES = ("ondemand", "lru", "static", "moepic")


def live_device_bytes() -> dict:
    """Bytes of live arrays in device memory, per device (pinned_host buffers excluded)."""
    out = {}
    for a in jax.live_arrays():
        if a.is_deleted() or a.sharding.memory_kind != "device":
            continue
        for sh in a.addressable_shards:
            out[sh.device.id] = out.get(sh.device.id, 0) + sh.data.nbytes
    return out


def reference(path):
    model = moepic_jax.load(path, dtype="float32")
    ref = {}
    for prompts in (SINGLE, BATCH):
        res = moepic_jax.generate(prompts, model=model, max_new_tokens=NEW, policy="resident")
        forced = np.array(res.token_ids).T[:-1]
        logits, _ = teacher_forced(ResidentEngine(model), forced, prompts)
        ref[len(prompts)] = (forced, logits, res.token_ids)
    return ref


def case(model, fam, policy, n_dev, ref) -> dict:
    frac = 0.3 if n_dev == 2 else 0.6  # of each device's own expert bytes: enough for some slots with 2 experts each
    base = make_engine(model, policy=policy, devices=n_dev, **kw(policy))  # its fixed part (prefetch buffers included)
    budget = base.fixed_bytes + int(frac * model.expert_bytes() / n_dev)  # per device
    del base
    gc.collect()
    eng = make_engine(model, policy=policy, vram_budget=budget, devices=n_dev, **kw(policy))
    row = {"family": fam, "policy": policy, "devices": n_dev, "budget": budget}
    for prompts in (SINGLE, BATCH):
        forced, ref_logits, ref_tokens = ref[len(prompts)]
        logits, counters = teacher_forced(eng, forced, prompts)
        res = moepic_jax.generate(prompts, model=model, max_new_tokens=NEW, engine=eng)
        key = f"b{len(prompts)}"
        row[key + "_max_abs_err"] = float(np.max(np.abs(logits - ref_logits)))
        row[key + "_tokens_equal"] = res.token_ids == ref_tokens
        row[key + "_h2d"] = float(sum(c["h2d_bytes"].sum() for c in counters))
        routed = sum(c["routed"].sum() for c in counters)
        parts = sum(c["full_hits"].sum() + c["top_hits"].sum() + c["misses"].sum() for c in counters)
        # prefill copies each layer's whole stack (no layer's cache holds half of it here): bytes over all devices
        row[key + "_prefill_h2d_ok"] = bool(res.stats.prefill_h2d_bytes == sum(model.cfg.moe_layers)
                                             * model.cfg.n_experts * model.cfg.d_ff * 3 * model.cfg.d_model * 4)
        row[key + "_counts_partition"] = bool(parts == routed == len(counters) * len(prompts) * model.cfg.top_k
                                              * sum(model.cfg.moe_layers))
    state = eng.new_state(2, KW["max_seq_len"])
    row["needed_per_device"] = eng.device_bytes_needed(state)
    row["cache_per_device"] = eng.cache_bytes()
    row["cached_everything"] = all(len(lp.cached) == model.cfg.n_experts and lp.split == model.cfg.d_ff
                                   for lp, m in zip(eng.cache_plan.layers, model.cfg.moe_layers) if m)
    live = live_device_bytes()
    row["live_per_device_max"] = max(live.values()) if live else 0
    row["devices_used"] = sorted(live)
    del state, eng
    gc.collect()
    return row


def errors(model) -> dict:
    out = {}
    for name, fn in {
        "uneven": lambda: make_engine(model, policy="lru", devices=3, **KW),
        "too_many": lambda: make_engine(model, policy="lru", devices=99, **KW),
        "resident": lambda: make_engine(model, "resident", devices=2),
    }.items():
        try:
            fn()
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    return out


def main():
    fams = sys.argv[1:] or list(FAMILIES)
    for fam in fams:
        d = tempfile.mkdtemp()
        build_hf_model(fam).save_pretrained(d)
        ref = reference(d)
        model = moepic_jax.load(d, dtype="float32")
        for n_dev in (2, 4) if fam == "qwen2_moe" else (2,):
            for policy in POLICIES:
                print(json.dumps(case(model, fam, policy, n_dev, ref)), flush=True)
        if fam == fams[0]:
            print(json.dumps({"errors": errors(model)}), flush=True)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
