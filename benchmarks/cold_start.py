"""Cold start: how long a new user waits for the first token, from a fresh `moepic-jax generate` process.

Two models:
  * `random`: a random-weight checkpoint shaped like Qwen1.5-MoE-A2.7B (hidden 2048, 24 layers, 60 experts top-4,
    expert d_ff 1408, shared expert 5632, vocab 151936, 16 heads; `common.REAL_CONFIGS["qwen15"]`), written here
    as a Hugging Face directory: `config.json`, one safetensors shard per decoder layer plus one for the
    embedding / final norm / lm head, and `model.safetensors.index.json`. Tensor names and shapes come from
    `io.hf.name_table` (the table `load` reads). Layers are written one at a time, so the host holds one layer
    (~1 GB) at most. Full size: 14.3 G parameters, 26.7 GiB in bfloat16 (`--layers N` keeps N layers, `--tiny`
    the CPU stand-in of `common.TINY_OVERRIDES`). No tokenizer: the prompt is token ids.
  * `embedded`: the embedded default model (`moepic-jax generate` with no `--model`).

Each model runs `python -m moepic_jax.cli generate ... --stats-json F` as a fresh subprocess `--runs` times (default
2), with JAX's persistent compilation cache in a fresh temporary directory per model (`XDG_CACHE_HOME`): run 1
compiles, run 2 finds the compiled steps in the cache. Per run: the process's wall time, `load` (reading the
weights), `setup` (the generate call before prefill: placing, profiling, planning, compiling or loading the
compiled steps), `compile` (the part of setup spent compiling), first token (from the process launch to the first
new token: Python and JAX imports, load, setup, TTFT), TTFT and TPOT (`GenerateStats`).

The checkpoint is read from the page cache in both runs (it was just written, and the host has more memory than
the checkpoint): `load` is the read-and-pack cost, not a cold disk.

Usage (from the repo root):
  python -m benchmarks.cold_start --layers 12     # GPU: benchmarks/results/qwen15/cold_start_qwen15_12l.json
  python -m benchmarks.cold_start --tiny --layers 2 --out /tmp/cold_tiny.json                # CPU smoke, ~1 min
Options after `--` go to every `moepic-jax generate` (e.g. `-- --vram-budget 25%`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from benchmarks import common as C
from moepic_jax.config import MoEConfig
from moepic_jax.io.hf import name_table

REPO = pathlib.Path(__file__).resolve().parent.parent
POOL = 1 << 25  # random values drawn once (64 MB of bfloat16); every tensor is a window of them
EMBEDDED_PROMPT = "def fibonacci(n):"


# ---------------------------------------------------------------------------------------------- checkpoint
def checkpoint_bytes(cfg: MoEConfig, itemsize: int = 2) -> int:
    """Bytes of every tensor of `cfg`'s HF checkpoint (`io.hf.name_table`), at `itemsize` bytes per value."""
    n = 0
    for row in name_table(cfg):
        count = 1
        if "{l}" in row.hf:
            count = sum(_row_in_layer(row, cfg, l) for l in range(cfg.n_layers))
        if "{e}" in row.hf:
            count *= cfg.n_experts
        n += count * math.prod(row.hf_shape)
    return n * itemsize


def _row_in_layer(row, cfg: MoEConfig, l: int) -> bool:
    """Whether layer l has this row's tensor: MoE rows (path "moe") only in MoE layers, dense MLP rows ("mlp") only
    in dense ones, as `to_hf_state_dict` skips them."""
    kind = row.path[2] if len(row.path) > 2 else None
    return not (kind == "moe" and not cfg.moe_layers[l] or kind == "mlp" and cfg.moe_layers[l])


def write_random_checkpoint(cfg: MoEConfig, out_dir: str | os.PathLike, seed: int = 0, std: float = 0.02,
                            progress: bool = True) -> pathlib.Path:
    """Write a random bfloat16 Hugging Face checkpoint of `cfg` to `out_dir`, one decoder layer per shard.

    Norm weights are 1, biases 0, every other tensor a window of one pool of N(0, std) values at a random offset
    (drawing 14 G normal values would take minutes; the cold start does not depend on the values). The host holds
    one shard's tensors (views of the pool) and their serialised bytes at a time.
    Returns the directory (config.json, model-XXXXX-of-XXXXX.safetensors, model.safetensors.index.json).
    """
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(POOL, dtype=np.float32) * std).astype(ml_dtypes.bfloat16)

    def value(name: str, shape: tuple) -> np.ndarray:
        if name.endswith("norm.weight"):
            return np.ones(shape, ml_dtypes.bfloat16)
        if name.endswith(".bias"):
            return np.zeros(shape, ml_dtypes.bfloat16)
        n = math.prod(shape)
        if n <= POOL:
            off = int(rng.integers(0, POOL - n + 1))
            return pool[off:off + n].reshape(shape)
        return np.resize(np.roll(pool, int(rng.integers(0, POOL))), n).reshape(shape)

    rows = name_table(cfg)
    groups = [[(row.hf.format(l=l, e=e), row.hf_shape) for row in rows if "{l}" in row.hf and _row_in_layer(row, cfg, l)
               for e in (range(cfg.n_experts) if "{e}" in row.hf else [None])] for l in range(cfg.n_layers)]
    groups.append([(row.hf, row.hf_shape) for row in rows if "{l}" not in row.hf])
    n_files = len(groups)
    weight_map = {}
    t0 = time.perf_counter()
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        tensors = {name: value(name, shape) for name, shape in group}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update((name, fname) for name in tensors)
        del tensors
        if progress:
            print(f"  wrote {fname} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return out


# ---------------------------------------------------------------------------------------------------- runs
def run_cli(model_dir: str | None, prompt: str, new_tokens: int, cache_home: str, extra: list[str],
            timeout_s: float) -> dict:
    """One fresh `python -m moepic_jax.cli generate` process; its timings (seconds unless named _ms).

    `cache_home` becomes XDG_CACHE_HOME, so the persistent compilation cache is `cache_home/moepic_jax/xla`.
    Raises RuntimeError (with the end of its stderr) when the process fails.
    """
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = pathlib.Path(tmp) / "stats.json"
        cmd = [sys.executable, "-m", "moepic_jax.cli", "generate", prompt, "--max-new-tokens", str(new_tokens),
               "--stats-json", str(stats_path)] + (["--model", model_dir] if model_dir else []) + extra
        env = dict(os.environ, XDG_CACHE_HOME=cache_home,
                   PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        t_launch = time.time()
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
        wall = time.perf_counter() - t0
        if p.returncode != 0 or not stats_path.exists():
            raise RuntimeError(f"{' '.join(cmd)} exited with {p.returncode}:\n{p.stderr[-3000:]}")
        s = json.loads(stats_path.read_text())
    xla = pathlib.Path(cache_home) / "moepic_jax" / "xla"
    return {"wall_s": wall, "load_s": s["load_s"], "setup_s": s["setup_s"], "compile_s": s["compile_s"],
            "compiles": s["compile_count"], "first_token_s": s["first_token_unix_s"] - t_launch,
            "ttft_ms": s["ttft_s"] * 1e3, "tpot_ms": s["tpot_s"] * 1e3, "new_tokens": s["new_tokens"],
            "policy": s["policy"], "budget_gib": None if s["vram_budget_bytes"] is None else
            s["vram_budget_bytes"] / 2**30, "cache_files": len(list(xla.rglob("*"))) if xla.exists() else 0,
            "stdout": p.stdout[-300:]}


def device_name(timeout_s: float = 120) -> str:
    """The default JAX device's kind, asked in a child process (this process never starts JAX's backend, which
    would take GPU memory from the runs)."""
    p = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices()[0]; print(d.platform, d.device_kind)"],
                       capture_output=True, text=True, timeout=timeout_s, check=False)
    return p.stdout.strip() or f"unknown ({p.stderr.strip()[-200:]})"


COLUMNS = [("model", "model", ""), ("run", "run", ""), ("cache", "compile cache", ""), ("wall_s", "process s", ".1f"),
           ("load_s", "load s", ".1f"), ("setup_s", "setup s", ".1f"), ("compile_s", "compile s", ".1f"),
           ("first_token_s", "first token s", ".1f"), ("ttft_ms", "TTFT ms", ".1f"), ("tpot_ms", "TPOT ms", ".2f"),
           ("policy", "policy", ""), ("budget_gib", "budget GiB", ".3g")]


def _write(path: pathlib.Path, meta: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(C._jsonable({"meta": meta, "rows": rows}), indent=1) + "\n")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cold_start", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None,
                    help="JSON file to write (default benchmarks/results/qwen15/cold_start_<model>.json)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the random checkpoint (default: all)")
    ap.add_argument("--tiny", action="store_true", help="the tiny CPU stand-in of the Qwen1.5 config")
    ap.add_argument("--models", default="embedded,random", help="comma list of embedded, random (in that order)")
    ap.add_argument("--runs", type=int, default=2, help="fresh processes per model (run 1 fills the compile cache)")
    ap.add_argument("--new-tokens", type=int, default=32, help="--max-new-tokens of every run")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="prompt length of the random model (token ids)")
    ap.add_argument("--work-dir", default=None, help="where the checkpoint and compile caches go (default: $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    args = ap.parse_args(argv)
    args.extra = extra
    bad = set(args.models.split(",")) - {"random", "embedded"}
    if bad:
        ap.error(f"unknown models {sorted(bad)}; choose from random, embedded")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    cfg = C.get_config("qwen15", tiny=args.tiny, n_layers=args.layers)
    name = "qwen15" + ("_tiny" if args.tiny else "") + (f"_{args.layers}l" if args.layers else "")
    out = pathlib.Path(args.out or C.RESULTS_DIR / "qwen15" / f"cold_start_{name}.json")
    work = pathlib.Path(tempfile.mkdtemp(prefix="moepic_cold_", dir=args.work_dir))
    rows, meta = [], {"config": cfg.to_hf_dict(), "cli_extra": args.extra, "new_tokens": args.new_tokens,
                      "work_dir": str(work)}
    t_all = time.perf_counter()
    try:
        for model in args.models.split(","):
            cache_home = str(work / f"cache_{model}")
            if model == "random":
                need = checkpoint_bytes(cfg)
                free = shutil.disk_usage(work).free
                if need * 1.05 > free:
                    raise OSError(f"the checkpoint needs {need / 2**30:.1f} GiB but {work} has {free / 2**30:.1f} GiB "
                                  "free; use --work-dir on a larger disk or fewer --layers")
                print(f"[write] {name}: {need / 2**30:.2f} GiB into {work / 'ckpt'}", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                ckpt = str(write_random_checkpoint(cfg, work / "ckpt", progress=not args.tiny))
                meta["write_s"] = time.perf_counter() - t0
                meta["checkpoint_gib"] = need / 2**30
                print(f"[write] {meta['write_s']:.1f} s ({need / 1e9 / meta['write_s']:.2f} GB/s)", file=sys.stderr,
                      flush=True)
                ids = np.random.default_rng(1).integers(0, cfg.vocab_size, args.prompt_tokens)
                prompt = " ".join(map(str, ids))
            else:
                ckpt, prompt = None, EMBEDDED_PROMPT
            for r in range(args.runs):
                res = run_cli(ckpt, prompt, args.new_tokens, cache_home, args.extra, args.timeout)
                row = {"model": name if model == "random" else "embedded", "run": r + 1,
                       "cache": "empty" if r == 0 else "filled", **res}
                rows.append(row)
                _write(out, meta, rows)  # after every run: a run that times out leaves the rows before it
                print(f"[run] {row['model']} #{r + 1}: process {res['wall_s']:.1f} s, load {res['load_s']:.1f} s, "
                      f"setup {res['setup_s']:.1f} s (compile {res['compile_s']:.1f} s), first token "
                      f"{res['first_token_s']:.1f} s, TPOT {res['tpot_ms']:.2f} ms", file=sys.stderr, flush=True)
            if model == "random" and not args.keep:
                shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta["total_s"] = time.perf_counter() - t_all
    meta["env"] = C.env_info(device=device_name())
    _write(out, meta, rows)
    print(f"\ncold start on {meta['env']['device']} ({meta['total_s']:.0f} s in all; wrote {out}):")
    print(C.markdown_table(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
