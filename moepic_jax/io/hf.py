"""Hugging Face safetensors -> host (NumPy) parameter pytrees, with experts packed neuron-major.

A tensor name is mapped by a regex table per family to a slot of the `model.Params` tree with an
expected shape; a name that matches nothing, a slot filled twice, a slot never filled or a shape
that differs is an error naming the tensor (the JAX-LLM `chkpt_utils.py` discipline). Shards are
read one at a time through safetensors' memory map, so the host never holds more than the packed
result plus one tensor. HF `nn.Linear` weights are `[out, in]`; they are transposed here to
`[in, out]` so the model computes `x @ W`.

Experts become `[E, F, 3, D]` per layer: row j of expert e is (gate column j, up column j,
down row j) — see `model.py`. Both checkpoint layouts transformers writes are accepted:
per-expert tensors (`experts.{e}.gate_proj.weight` / Mixtral's `w1,w3,w2`) and fused tensors
(`experts.gate_up_proj [E, 2F, D]`, `experts.down_proj [E, D, F]`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable

import numpy as np
from safetensors import safe_open

from moepic_jax import model as M
from moepic_jax.model.params import empty_params
from moepic_jax.config import MoEConfig, from_hf_config

# A rule: (regex, function(match) -> list of (target path, source->target transform, expected HF shape)).
# Targets are paths into the Params tree: ("layers", l, "attn", "wq") or for experts
# ("layers", l, "moe", "experts", e, part) with part in {0: gate, 1: up, 2: down}.


def _rules(cfg: MoEConfig) -> list[tuple[re.Pattern, Callable]]:
    D, H, G, hd, E, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_experts, cfg.d_ff
    moe = "block_sparse_moe" if cfg.family == "mixtral" else "mlp"
    names = {"w1": 0, "w3": 1, "w2": 2} if cfg.family == "mixtral" else {"gate_proj": 0, "up_proj": 1, "down_proj": 2}
    T = np.transpose
    ident = np.asarray
    L = r"model\.layers\.(\d+)\."
    qn = {"head": (hd,), "full": (H * hd,)}.get(cfg.qk_norm)
    kn = {"head": (hd,), "full": (G * hd,)}.get(cfg.qk_norm)

    def lin(path, shape):  # a Linear weight [out, in] -> [in, out]
        return lambda m: [(("layers", int(m[1]), *path), T, shape)]

    def vec(path, shape):
        return lambda m: [(("layers", int(m[1]), *path), ident, shape)]

    r = [
        (r"model\.embed_tokens\.weight", lambda m: [(("embed",), ident, (cfg.vocab_size, D))]),
        (r"model\.norm\.weight", lambda m: [(("final_norm",), ident, (D,))]),
        (L + r"input_layernorm\.weight", vec(("attn_norm",), (D,))),
        (L + r"post_attention_layernorm\.weight", vec(("mlp_norm",), (D,))),
        (L + r"self_attn\.q_proj\.weight", lin(("attn", "wq"), (H * hd, D))),
        (L + r"self_attn\.k_proj\.weight", lin(("attn", "wk"), (G * hd, D))),
        (L + r"self_attn\.v_proj\.weight", lin(("attn", "wv"), (G * hd, D))),
        (L + r"self_attn\.o_proj\.weight", lin(("attn", "wo"), (D, H * hd))),
    ]
    if not cfg.tie_word_embeddings:
        r.append((r"lm_head\.weight", lambda m: [(("lm_head",), T, (cfg.vocab_size, D))]))
    if cfg.qkv_bias:
        r += [(L + r"self_attn\.q_proj\.bias", vec(("attn", "bq"), (H * hd,))),
              (L + r"self_attn\.k_proj\.bias", vec(("attn", "bk"), (G * hd,))),
              (L + r"self_attn\.v_proj\.bias", vec(("attn", "bv"), (G * hd,)))]
    if cfg.o_bias:
        r.append((L + r"self_attn\.o_proj\.bias", vec(("attn", "bo"), (D,))))
    if qn:
        r += [(L + r"self_attn\.q_norm\.weight", vec(("attn", "q_norm"), qn)),
              (L + r"self_attn\.k_norm\.weight", vec(("attn", "k_norm"), kn))]
    r.append((L + moe + r"\.gate\.weight", lin(("moe", "w_router"), (E, D))))

    def per_expert(m):
        part = names[m[3]]
        # gate/up [F, D]: neuron j is row j. down [D, F]: neuron j is column j -> transpose.
        return [(("layers", int(m[1]), "moe", "experts", int(m[2]), part), T if part == 2 else ident,
                 (D, F) if part == 2 else (F, D))]

    r.append((L + moe + r"\.experts\.(\d+)\.(" + "|".join(names) + r")\.weight", per_expert))

    def fused_gate_up(m):
        l = int(m[1])
        return [(("layers", l, "moe", "experts", None, 0), lambda a: a[:, :F], (E, 2 * F, D)),
                (("layers", l, "moe", "experts", None, 1), lambda a: a[:, F:], (E, 2 * F, D))]

    r.append((L + moe + r"\.experts\.gate_up_proj", fused_gate_up))
    r.append((L + moe + r"\.experts\.down_proj",
              lambda m: [(("layers", int(m[1]), "moe", "experts", None, 2), lambda a: np.transpose(a, (0, 2, 1)),
                          (E, D, F))]))
    if cfg.shared_d_ff:
        S = cfg.shared_d_ff
        r += [(L + r"mlp\.shared_expert\.gate_proj\.weight", lin(("moe", "shared", "w_gate"), (S, D))),
              (L + r"mlp\.shared_expert\.up_proj\.weight", lin(("moe", "shared", "w_up"), (S, D))),
              (L + r"mlp\.shared_expert\.down_proj\.weight", lin(("moe", "shared", "w_down"), (D, S))),
              (L + r"mlp\.shared_expert_gate\.weight", lin(("moe", "w_shared_gate"), (1, D)))]
    if not all(cfg.moe_layers):
        Fd = cfg.dense_d_ff
        r += [(L + r"mlp\.gate_proj\.weight", lin(("mlp", "w_gate"), (Fd, D))),
              (L + r"mlp\.up_proj\.weight", lin(("mlp", "w_up"), (Fd, D))),
              (L + r"mlp\.down_proj\.weight", lin(("mlp", "w_down"), (D, Fd)))]
    return [(re.compile(p + r"$"), f) for p, f in r]


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


def load_hf_params(path: str | pathlib.Path, cfg: MoEConfig, dtype="bfloat16", progress: bool = False) -> M.Params:
    """Read a Hugging Face safetensors checkpoint into a host `Params` tree (NumPy, `dtype`).

    Streams one shard at a time. Experts are packed neuron-major `[E, F, 3, D]`.

    Raises:
      FileNotFoundError: no shards, or a shard listed in the index is missing.
      ValueError: an unexpected tensor, a tensor seen twice, a missing tensor, or a wrong shape (the
        message names the tensor and the expected shape).
    """
    path = pathlib.Path(path)
    params = empty_params(cfg, dtype)
    rules = _rules(cfg)
    filled: set[tuple] = set()
    files = _shard_files(path)
    if progress:
        from tqdm.auto import tqdm

        files = tqdm(files, desc="loading shards", unit="shard")
    for file in files:
        with safe_open(str(file), framework="np") as f:
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
                    _store(params, cfg, target, transform(arr), name, filled)
    missing = _expected_slots(cfg, params) - filled
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
    dst = _get(params, target)
    dst[...] = value.astype(dst.dtype)


def read_config_and_params(path, dtype="bfloat16", progress: bool = False) -> tuple[MoEConfig, M.Params]:
    """Read `config.json` and the safetensors shards of a Hugging Face directory."""
    path = pathlib.Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: point at a Hugging Face model directory "
                                "(config.json + *.safetensors) or a moepic_jax checkpoint")
    cfg = from_hf_config(json.loads(cfg_file.read_text()))
    return cfg, load_hf_params(path, cfg, dtype, progress)


def to_hf_state_dict(params: M.Params, cfg: MoEConfig) -> dict[str, np.ndarray]:
    """Inverse of `load_hf_params`: HF tensor names -> arrays (per-expert layout), for export."""
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": params.embed, "model.norm.weight": params.final_norm}
    if params.lm_head is not None:
        out["lm_head.weight"] = params.lm_head.T
    moe = "block_sparse_moe" if cfg.family == "mixtral" else "mlp"
    names = ("w1", "w3", "w2") if cfg.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for l, lp in enumerate(params.layers):
        p = f"model.layers.{l}."
        out[p + "input_layernorm.weight"] = lp.attn_norm
        out[p + "post_attention_layernorm.weight"] = lp.mlp_norm
        a = lp.attn
        for n, w in (("q", a.wq), ("k", a.wk), ("v", a.wv), ("o", a.wo)):
            out[p + f"self_attn.{n}_proj.weight"] = w.T
        for n, b in (("q", a.bq), ("k", a.bk), ("v", a.bv), ("o", a.bo)):
            if b is not None:
                out[p + f"self_attn.{n}_proj.bias"] = b
        if a.q_norm is not None:
            out[p + "self_attn.q_norm.weight"] = a.q_norm
            out[p + "self_attn.k_norm.weight"] = a.k_norm
        if lp.moe is not None:
            out[p + f"{moe}.gate.weight"] = lp.moe.w_router.T
            for e in range(cfg.n_experts):
                ex = lp.moe.experts[e]  # [F, 3, D]
                out[p + f"{moe}.experts.{e}.{names[0]}.weight"] = ex[:, 0]
                out[p + f"{moe}.experts.{e}.{names[1]}.weight"] = ex[:, 1]
                out[p + f"{moe}.experts.{e}.{names[2]}.weight"] = ex[:, 2].T
            if lp.moe.shared is not None:
                s = lp.moe.shared
                out[p + "mlp.shared_expert.gate_proj.weight"] = s.w_gate.T
                out[p + "mlp.shared_expert.up_proj.weight"] = s.w_up.T
                out[p + "mlp.shared_expert.down_proj.weight"] = s.w_down.T
                out[p + "mlp.shared_expert_gate.weight"] = lp.moe.w_shared_gate.T
        else:
            out[p + "mlp.gate_proj.weight"] = lp.mlp.w_gate.T
            out[p + "mlp.up_proj.weight"] = lp.mlp.w_up.T
            out[p + "mlp.down_proj.weight"] = lp.mlp.w_down.T
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
