"""moepic_jax checkpoints: orbax-checkpoint trees of the host `Params`, beside config.json and tokenizer.json.

Layout of a checkpoint directory:
  config.json            Hugging Face config (the same reader as HF directories)
  tokenizer.json         optional
  moepic_checkpoint.json manifest: format version, dtype, config identity, leaf count
  params/                orbax StandardCheckpointer tree (experts neuron-major [E, F, 3, D])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from moepic_jax import model as M
from moepic_jax.config import MoEConfig, from_hf_config
from moepic_jax.io.hf import to_hf_state_dict
from moepic_jax.model.params import empty_params, np_dtype

MANIFEST = "moepic_checkpoint.json"
FORMAT_VERSION = 1


def default_checkpoint_dir() -> pathlib.Path:
    """The embedded default model: under the source tree's `checkpoints/`, or where a wheel installs it
    (`<prefix>/share/moepic_jax/checkpoints/`); the first directory holding a manifest."""
    roots = [pathlib.Path(__file__).resolve().parents[2] / "checkpoints",
             pathlib.Path(sys.prefix) / "share" / "moepic_jax" / "checkpoints"]
    for root in roots:
        found = sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no embedded model under {' or '.join(map(str, roots))}; pass a model path "
                            "(reinstall moepic_jax to restore the embedded one)")


def is_orbax_checkpoint(path) -> bool:
    return (pathlib.Path(path) / MANIFEST).exists()


def _to_tree(params: M.Params):
    """Params -> nested dict of NumPy arrays (orbax-friendly, None leaves dropped)."""
    def conv(x):
        if isinstance(x, (np.ndarray, jax.Array)):
            return np.asarray(x)
        if isinstance(x, tuple):
            return {str(i): conv(v) for i, v in enumerate(x)}
        return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x) if getattr(x, f.name) is not None}

    return conv(params)


def _from_tree(tree, like: M.Params):
    def conv(t, ref):
        if isinstance(ref, np.ndarray):
            return t
        if isinstance(ref, tuple):
            return tuple(conv(t[str(i)], r) for i, r in enumerate(ref))
        kw = {}
        for f in dataclasses.fields(ref):
            r = getattr(ref, f.name)
            kw[f.name] = None if r is None else conv(t[f.name], r)
        return type(ref)(**kw)

    return conv(tree, like)


def _refuse_quantized(cfg: MoEConfig, what: str) -> None:
    if cfg.expert_quant is not None:
        raise ValueError(f"{what} writes full-precision weights, but this model's experts are quantized "
                         f"({cfg.expert_quant.name}, at load time); load the model without experts= and {what} that")


def save(path, cfg: MoEConfig, params: M.Params, dtype: str, tokenizer=None) -> None:
    """Write a checkpoint directory (see module docstring). `path` must not exist yet or be empty.

    Raises:
      ValueError: the model's experts are quantized (checkpoints hold full-precision weights; quantize at load).
    """
    import orbax.checkpoint as ocp

    _refuse_quantized(cfg, "save")

    path = pathlib.Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    tree = _to_tree(params)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / "params", tree, force=True)
    ckptr.wait_until_finished()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path)) if hasattr(tokenizer, "save_pretrained") else tokenizer.save(
            str(path / "tokenizer.json"))
    leaves = sum(1 for _ in _iter_leaves(tree))
    manifest = {"format_version": FORMAT_VERSION, "dtype": dtype, "config_identity": cfg.identity(), "leaves": leaves,
                "files": _hashes(path / "params")}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _hashes(root: pathlib.Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path: detects truncated or altered checkpoint files,
    which orbax itself may load silently."""
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        out[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _verify_files(path: pathlib.Path, manifest: dict) -> None:
    want = manifest.get("files")
    if not want:
        return  # written before hashes were recorded
    have = _hashes(path / "params")
    missing = sorted(set(want) - set(have))
    changed = sorted(k for k in want if k in have and have[k] != want[k])
    if missing or changed:
        what = f"missing {missing[:3]}" if missing else f"altered {changed[:3]}"
        raise ValueError(f"checkpoint {path} is truncated or corrupted ({what} under params/); re-create it "
                         "(or `git checkout` the embedded one)")


def _iter_leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _iter_leaves(v)
    else:
        yield tree


def restore(path, dtype: str, store_experts: Callable[[int, np.ndarray], Any] | None = None
            ) -> tuple[MoEConfig, M.Params]:
    """Read a checkpoint directory into host NumPy `Params` cast to `dtype`.

    store_experts: when given, the expert stacks are read one MoE layer at a time (orbax partial restore) and
      `store_experts(layer, stack [E, F, 3, D] in dtype)` returns what the tree keeps for that layer (e.g. its
      quantized, pinned stack), so the host never holds every layer's experts at full precision at once.
    Raises:
      ValueError: the manifest does not match config.json, or the orbax tree is truncated/corrupted
        (the message names the directory and what to do).
    """
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).resolve()
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        cfg = from_hf_config(json.loads((path / "config.json").read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {path} is unreadable ({e}); re-create or re-download it") from e
    _verify_files(path, manifest)
    if manifest.get("config_identity") != cfg.identity():
        raise ValueError(f"checkpoint {path}: config.json does not match the manifest; the directory was modified")
    stored = manifest["dtype"]
    like = empty_params(cfg, stored)
    abstract = _to_tree(like)
    target = np_dtype(dtype)
    if store_experts is not None:
        return cfg, _restore_by_layer(path, cfg, like, abstract, target, store_experts)
    try:
        tree = ocp.StandardCheckpointer().restore(path / "params", abstract)
    except Exception as e:  # orbax raises many types for missing/corrupt files
        raise _corrupted(path, e) from e
    tree = {k: v for k, v in tree.items()}
    return cfg, _from_tree(_cast(tree, abstract, path, target), like)


def _corrupted(path: pathlib.Path, e: Exception) -> ValueError:
    return ValueError(f"checkpoint {path} is truncated or corrupted ({type(e).__name__}: {str(e)[:200]}); "
                      "re-create it (or `git checkout` the embedded one)")


def _cast(t, ref, path: pathlib.Path, target):
    """Restored tree `t` as NumPy arrays of dtype `target`, checked against the abstract tree `ref`'s shapes."""
    if isinstance(ref, dict):
        return {k: _cast(t[k], r, path, target) for k, r in ref.items()}
    a = np.asarray(t)
    if a.shape != ref.shape:
        raise ValueError(f"checkpoint {path}: a tensor has shape {a.shape}, expected {ref.shape}; corrupted")
    return a.astype(target)


def _restore_by_layer(path: pathlib.Path, cfg: MoEConfig, like: M.Params, abstract: dict, target,
                      store_experts: Callable[[int, np.ndarray], Any]) -> M.Params:
    """`restore` with the expert stacks read one layer at a time (orbax partial restore): first every other leaf,
    then each MoE layer's stack, handed to `store_experts(layer, stack)` and dropped."""
    import orbax.checkpoint as ocp

    def select(t, keep):  # the subtree of `t` whose leaf paths satisfy keep(path)
        out = {}
        for k, v in t.items():
            if isinstance(v, dict):
                sub = select(v, lambda p, k=k: keep((k, *p)))
                if sub:
                    out[k] = sub
            elif keep((k,)):
                out[k] = v
        return out

    def is_experts(p):
        return len(p) == 4 and p[0] == "layers" and p[2:] == ("moe", "experts")

    def read(keep):
        item = select(abstract, keep)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        try:
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ck:
                got = ck.restore(path / "params", args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                                             partial_restore=True))
        except Exception as e:  # orbax raises many types for missing/corrupt files
            raise _corrupted(path, e) from e
        return _cast(got, item, path, target)

    tree = read(lambda p: not is_experts(p))
    for l in cfg.moe_layer_ids:
        stack = read(lambda p, l=l: p == ("layers", str(l), "moe", "experts"))["layers"][str(l)]["moe"]["experts"]
        tree["layers"][str(l)]["moe"]["experts"] = store_experts(l, stack)
        del stack
    return _from_tree(tree, like)


def export_hf(model, out_dir, dtype: str = "float32") -> pathlib.Path:
    """Write `model` (a `moepic_jax.Model`) as a Hugging Face directory that transformers loads as is.

    Files: `config.json` (`cfg.to_hf_dict()`), `model.safetensors` (per-expert tensor names of
    `weights.to_hf_state_dict`, in `dtype`: "float32" or "bfloat16") and the tokenizer files when the model has
    a tokenizer. `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` then loads it with no missing or
    unexpected keys, and `moepic_jax.load(out_dir)` reads it back.

    Raises:
      ValueError: an unsupported export dtype.
    """
    from safetensors.numpy import save_file

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"export dtype {dtype!r} is not supported; use 'float32' or 'bfloat16'")
    _refuse_quantized(model.cfg, "export_hf")
    target = np_dtype(dtype)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    host = jax.tree.map(lambda a: np.asarray(a), model.params)  # experts are pinned jax arrays
    state = {k: np.ascontiguousarray(np.asarray(v).astype(target))
             for k, v in to_hf_state_dict(host, model.cfg).items()}
    cfg = model.cfg.to_hf_dict()
    cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
    return out
