"""Hugging Face safetensors -> host (NumPy) parameter pytrees, with experts packed neuron-major.

A tensor name is mapped by one two-way table per family (`name_table`: load and export) to a slot of the
`model.Params` tree with an
expected shape; a name that matches nothing, a slot filled twice, a slot never filled or a shape
that differs is an error naming the tensor (the JAX-LLM `chkpt_utils.py` discipline). Shards are
read one at a time through safetensors' memory map, so the host never holds more than the packed
result plus one tensor. HF `nn.Linear` weights are `[out, in]`; they are transposed here to
`[in, out]` so the model computes `x @ W`.

Experts become `[E, F, 3, D]` per layer: row j of expert e is (gate column j, up column j,
down row j) — see `model/layers.py`. Both checkpoint layouts transformers writes are accepted:
per-expert tensors (`experts.{e}.gate_proj.weight` / Mixtral's `w1,w3,w2`) and fused tensors
(`experts.gate_up_proj [E, 2F, D]`, `experts.down_proj [E, D, F]`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from safetensors import safe_open

from moepic_jax import model as M
from moepic_jax.config import MoEConfig, from_hf_config
from moepic_jax.model.params import empty_params


class Name(NamedTuple):
    """One row of the two-way name table: an HF tensor name and the `Params` leaf it is.

    `hf` and `path` may hold the placeholders "{l}" (layer) and "{e}" (expert). Expert paths end in the part
    (0 gate, 1 up, 2 down) of the neuron-major stack: the leaf is `experts[e][:, part]`, [F, D].
    """

    hf: str  # e.g. "model.layers.{l}.self_attn.q_proj.weight"
    path: tuple  # e.g. ("layers", "{l}", "attn", "wq")
    transpose: bool  # the HF tensor is the leaf transposed (nn.Linear weights are [out, in])
    hf_shape: tuple  # the HF tensor's shape


def name_table(cfg: MoEConfig) -> list[Name]:
    """Every HF tensor name of `cfg`'s family and the leaf it maps to: read by `load_hf_params` and written by
    `to_hf_state_dict` (per-expert layout). Source: transformers/models/{mixtral,qwen2_moe,qwen3_moe,olmoe}/
    modeling_*.py parameter names."""
    D, H, G, hd, E, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_experts, cfg.d_ff
    moe = "block_sparse_moe" if cfg.family == "mixtral" else "mlp"
    parts = ("w1", "w3", "w2") if cfg.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    L, A = "model.layers.{l}.", "model.layers.{l}.self_attn."
    lay = ("layers", "{l}")
    t = [Name("model.embed_tokens.weight", ("embed",), False, (cfg.vocab_size, D)),
         Name("model.norm.weight", ("final_norm",), False, (D,)),
         Name(L + "input_layernorm.weight", (*lay, "attn_norm"), False, (D,)),
         Name(L + "post_attention_layernorm.weight", (*lay, "mlp_norm"), False, (D,)),
         Name(A + "q_proj.weight", (*lay, "attn", "wq"), True, (H * hd, D)),
         Name(A + "k_proj.weight", (*lay, "attn", "wk"), True, (G * hd, D)),
         Name(A + "v_proj.weight", (*lay, "attn", "wv"), True, (G * hd, D)),
         Name(A + "o_proj.weight", (*lay, "attn", "wo"), True, (D, H * hd))]
    if not cfg.tie_word_embeddings:
        t.append(Name("lm_head.weight", ("lm_head",), True, (cfg.vocab_size, D)))
    if cfg.qkv_bias:
        t += [Name(A + f"{n}_proj.bias", (*lay, "attn", f"b{n}"), False, (w,))
              for n, w in (("q", H * hd), ("k", G * hd), ("v", G * hd))]
    if cfg.o_bias:
        t.append(Name(A + "o_proj.bias", (*lay, "attn", "bo"), False, (D,)))
    if cfg.qk_norm in ("head", "full"):
        qn, kn = {"head": (hd, hd), "full": (H * hd, G * hd)}[cfg.qk_norm]
        t += [Name(A + "q_norm.weight", (*lay, "attn", "q_norm"), False, (qn,)),
              Name(A + "k_norm.weight", (*lay, "attn", "k_norm"), False, (kn,))]
    if any(cfg.moe_layers):
        t.append(Name(L + moe + ".gate.weight", (*lay, "moe", "w_router"), True, (E, D)))
        # gate/up [F, D]: neuron j is row j. down [D, F]: neuron j is column j -> transposed.
        t += [Name(L + moe + ".experts.{e}." + n + ".weight", (*lay, "moe", "experts", "{e}", part), part == 2,
                   (D, F) if part == 2 else (F, D)) for part, n in enumerate(parts)]
    if cfg.shared_d_ff:
        S = cfg.shared_d_ff
        t += [Name(L + "mlp.shared_expert.gate_proj.weight", (*lay, "moe", "shared", "w_gate"), True, (S, D)),
              Name(L + "mlp.shared_expert.up_proj.weight", (*lay, "moe", "shared", "w_up"), True, (S, D)),
              Name(L + "mlp.shared_expert.down_proj.weight", (*lay, "moe", "shared", "w_down"), True, (D, S)),
              Name(L + "mlp.shared_expert_gate.weight", (*lay, "moe", "w_shared_gate"), True, (1, D))]
    if not all(cfg.moe_layers):
        Fd = cfg.dense_d_ff
        t += [Name(L + "mlp.gate_proj.weight", (*lay, "mlp", "w_gate"), True, (Fd, D)),
              Name(L + "mlp.up_proj.weight", (*lay, "mlp", "w_up"), True, (Fd, D)),
              Name(L + "mlp.down_proj.weight", (*lay, "mlp", "w_down"), True, (D, Fd))]
    return t


# A load rule: (regex, function(match) -> list of (target path, source->target transform, expected HF shape)).
# Targets are paths into the Params tree: ("layers", l, "attn", "wq") or for experts
# ("layers", l, "moe", "experts", e, part) with part in {0: gate, 1: up, 2: down}; e None = every expert.


def _rules(cfg: MoEConfig) -> list[tuple[re.Pattern, Callable]]:
    """The load rules: every row of `name_table`, plus the fused expert layout transformers also writes
    (`experts.gate_up_proj [E, 2F, D]`, `experts.down_proj [E, D, F]`), which is read but never exported."""
    E, F, D = cfg.n_experts, cfg.d_ff, cfg.d_model
    rules = []
    for row in name_table(cfg):
        rx = re.escape(row.hf).replace(r"\{l\}", r"(?P<l>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")

        def fn(m, row=row):
            fill = {"{l}": "l", "{e}": "e"}
            target = tuple(int(m[fill[p]]) if p in fill else p for p in row.path)
            return [(target, np.transpose if row.transpose else np.asarray, row.hf_shape)]

        rules.append((rx, fn))
    moe = "block_sparse_moe" if cfg.family == "mixtral" else "mlp"
    L = r"model\.layers\.(?P<l>\d+)\." + moe

    def fused_gate_up(m):
        l = int(m["l"])
        return [(("layers", l, "moe", "experts", None, 0), lambda a: a[:, :F], (E, 2 * F, D)),
                (("layers", l, "moe", "experts", None, 1), lambda a: a[:, F:], (E, 2 * F, D))]

    rules.append((L + r"\.experts\.gate_up_proj", fused_gate_up))
    rules.append((L + r"\.experts\.down_proj",
                  lambda m: [(("layers", int(m["l"]), "moe", "experts", None, 2),
                              lambda a: np.transpose(a, (0, 2, 1)), (E, D, F))]))
    return [(re.compile(p + r"$"), f) for p, f in rules]


def _get(tree, path):
    for p in path:
        tree = tree[p] if isinstance(p, int) and isinstance(tree, (tuple, list)) else getattr(tree, p)
    return tree


def _expected_slots(cfg: MoEConfig, params: M.Params) -> set[tuple]:
    """Every leaf slot that must be filled (experts: one slot per (layer, expert, part))."""
    slots = set()
    for path, _ in leaf_paths(params):
        if len(path) >= 4 and path[2] == "moe" and path[3] == "experts":
            for e in range(cfg.n_experts):
                for part in range(3):
                    slots.add((*path, e, part))
        else:
            slots.add(path)
    return slots


def leaf_paths(tree, prefix=()):
    if isinstance(tree, np.ndarray):
        yield prefix, tree
    elif isinstance(tree, tuple):
        for i, t in enumerate(tree):
            yield from leaf_paths(t, (*prefix, i))
    elif dataclasses.is_dataclass(tree):
        for f in dataclasses.fields(tree):
            v = getattr(tree, f.name)
            if v is not None:
                yield from leaf_paths(v, (*prefix, f.name))


def _shard_files(path: pathlib.Path) -> list[pathlib.Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        files = sorted(set(wm.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise FileNotFoundError(f"shard(s) {missing} listed in {index} are missing from {path}; "
                                    "download the complete checkpoint")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}; expected a Hugging Face checkpoint directory")
    return files


def load_hf_params(path: str | pathlib.Path, cfg: MoEConfig, dtype="bfloat16", progress: bool = False,
                   store_experts: Callable[[int, np.ndarray], Any] | None = None) -> M.Params:
    """Read a Hugging Face safetensors checkpoint into a host `Params` tree (NumPy, `dtype`).

    Streams one shard at a time. Experts are packed neuron-major `[E, F, 3, D]`.
    store_experts: when given, called as `store_experts(layer, stack [E, F, 3, D])` as soon as every tensor of a
      layer's experts has been read; the tree keeps what it returns (e.g. the quantized, pinned stack) and the
      full-precision stack is dropped. The stacks are zero-filled allocations that the OS commits only as they are
      written, so the host holds at full precision only the layers whose tensors are still being read.

    Raises:
      FileNotFoundError: no shards, or a shard listed in the index is missing.
      ValueError: an unexpected tensor, a tensor seen twice, a missing tensor, or a wrong shape (the
        message names the tensor and the expected shape).
    """
    path = pathlib.Path(path)
    params = empty_params(cfg, dtype)
    rules = _rules(cfg)
    filled: set[tuple] = set()
    expected = _expected_slots(cfg, params)
    per_layer = {l: 0 for l in cfg.moe_layer_ids}  # expert slots filled per layer (store_experts)
    files = _shard_files(path)
    if progress:
        from tqdm.auto import tqdm

        files = tqdm(files, desc="loading shards", unit="shard")
    for file in files:
        try:
            f = safe_open(str(file), framework="np")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a bad header
            raise ValueError(f"shard {file} is unreadable ({type(e).__name__}: {e}): the file is truncated or "
                             "corrupt; download it again") from e
        with f:
            for name in f.keys():
                match = None
                for rx, fn in rules:
                    m = rx.match(name)
                    if m:
                        match = fn(m)
                        break
                if match is None:
                    raise ValueError(f"unexpected tensor {name!r} in {file.name} for a {cfg.family} model "
                                     f"with this config.json; is config.json from the same checkpoint?")
                shape = tuple(f.get_slice(name).get_shape())
                for target, transform, want in match:
                    if shape != tuple(want):
                        raise ValueError(f"tensor {name!r} has shape {shape}, expected {tuple(want)}")
                    if len(target) > 1 and target[1] >= cfg.n_layers:
                        raise ValueError(f"tensor {name!r} is for layer {target[1]} but n_layers={cfg.n_layers}")
                arr = f.get_tensor(name)
                for target, transform, want in match:
                    n_before = len(filled)
                    _store(params, cfg, target, transform(arr), name, filled)
                    l = target[1] if len(target) >= 4 and target[2:4] == ("moe", "experts") else None
                    if store_experts is not None and l is not None:
                        per_layer[l] += len(filled) - n_before
                        if per_layer[l] == 3 * cfg.n_experts:  # the layer is complete: store it, drop the stack
                            lp = params.layers[l]
                            kept = store_experts(l, lp.moe.experts)
                            layers = list(params.layers)
                            layers[l] = lp.replace(moe=lp.moe.replace(experts=kept))
                            params = params.replace(layers=tuple(layers))
                            del lp
    missing = expected - filled
    if missing:
        m = sorted(missing, key=str)[:5]
        raise ValueError(f"checkpoint {path} is missing {len(missing)} tensor(s), e.g. {[_slot_name(s) for s in m]}")
    return params


def _slot_name(slot) -> str:
    return ".".join(str(s) for s in slot)


def _store(params: M.Params, cfg: MoEConfig, target, value: np.ndarray, name: str, filled: set) -> None:
    if len(target) >= 3 and isinstance(target[1], int) and getattr(params.layers[target[1]], target[2]) is None:
        kind = "an MoE" if target[2] == "moe" else "a dense"
        raise ValueError(f"tensor {name!r} is for {kind} layer but config.json makes layer {target[1]} "
                         f"{'dense' if target[2] == 'moe' else 'MoE'} (mlp_only_layers / decoder_sparse_step); "
                         "is config.json from the same checkpoint?")
    if len(target) >= 4 and target[2] == "moe" and target[3] == "experts":
        l, e, part = target[1], target[4], target[5]
        if e is not None and e >= cfg.n_experts:
            raise ValueError(f"tensor {name!r} is for expert {e} but config.json has n_experts={cfg.n_experts}")
        stack = params.layers[l].moe.experts  # [E, F, 3, D]
        es = range(cfg.n_experts) if e is None else [e]
        for ee in es:
            slot = (*target[:4], ee, part)
            if slot in filled:
                raise ValueError(f"tensor {name!r} fills layer {l} expert {ee} part {part} a second time")
            filled.add(slot)
        if e is None:  # fused: value [E, F, D] (gate/up) or [E, F, D] after the down transpose
            stack[:, :, part, :] = value.astype(stack.dtype)
        else:
            stack[e, :, part, :] = value.astype(stack.dtype)
        return
    if target in filled:
        raise ValueError(f"tensor {name!r} fills {_slot_name(target)} a second time")
    filled.add(target)
    _assign(_get(params, target), value)


_BLOCK = 256  # columns per block of a transposed copy


def _assign(dst: np.ndarray, value: np.ndarray) -> None:
    """`dst[...] = value` cast to dst's dtype. A large transposed 2-D view (an HF `[out, in]` weight read as
    `[in, out]`) is copied `_BLOCK` columns at a time: one strided copy of a whole matrix misses the cache on every
    element (Qwen1.5-MoE's lm_head [2048, 151936] in bfloat16: 6.3 s at once, 1.3 s in blocks, on a CPU VM)."""
    if value.ndim == 2 and value.flags.f_contiguous and not value.flags.c_contiguous and value.shape[1] > _BLOCK:
        for i in range(0, value.shape[1], _BLOCK):
            dst[:, i:i + _BLOCK] = value[:, i:i + _BLOCK].astype(dst.dtype, copy=False)
        return
    dst[...] = value.astype(dst.dtype, copy=False)  # no copy when the dtypes agree


def read_config_and_params(path, dtype="bfloat16", progress: bool = False,
                           store_experts: Callable[[int, np.ndarray], Any] | None = None) -> tuple[MoEConfig, M.Params]:
    """Read `config.json` and the safetensors shards of a Hugging Face directory (store_experts: see
    `load_hf_params`)."""
    path = pathlib.Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: point at a Hugging Face model directory "
                                "(config.json + *.safetensors) or a moepic_jax checkpoint")
    try:
        d = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file} is unreadable ({type(e).__name__}: {e}); re-download config.json with the "
                         "checkpoint") from e
    cfg = from_hf_config(d)
    return cfg, load_hf_params(path, cfg, dtype, progress, store_experts)


def to_hf_state_dict(params: M.Params, cfg: MoEConfig) -> dict[str, np.ndarray]:
    """Inverse of `load_hf_params`: HF tensor names -> arrays (per-expert layout), for export (`name_table`)."""
    out: dict[str, np.ndarray] = {}
    for row in name_table(cfg):
        layers = range(cfg.n_layers) if "{l}" in row.hf else [None]
        for l in layers:
            path = tuple(l if p == "{l}" else p for p in row.path)
            if "{e}" in row.hf:
                lp = params.layers[l]
                if lp.moe is None:
                    continue
                for e in range(cfg.n_experts):
                    v = lp.moe.experts[e][:, path[-1]]  # [F, D]
                    out[row.hf.format(l=l, e=e)] = v.T if row.transpose else v
                continue
            if l is not None and getattr(params.layers[l], path[2]) is None:
                continue  # an MoE row on a dense layer, or the reverse
            v = _get(params, path)
            out[row.hf.format(l=l)] = v.T if row.transpose else v
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def load_tokenizer(path):
    """The tokenizer of a model directory (transformers fast tokenizer), or None when it has none."""
    path = pathlib.Path(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (path / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
