"""`load()`: a Hugging Face directory, a moepic_jax checkpoint or the embedded default model -> a host `Model`."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax

from moepic_jax import model as M
from moepic_jax.config import ExpertQuant, MoEConfig, expert_quant, from_hf_config
from moepic_jax.io import checkpoint
from moepic_jax.io.hf import load_tokenizer, read_config_and_params
from moepic_jax.model.params import np_dtype
from moepic_jax.model.quant import quantize_rows


@dataclasses.dataclass
class Model:
    """A model on the host: config, weights, optional tokenizer.

    The routed experts are `jax.Array` stacks [E, F, 3, D] (neuron-major) in the `pinned_host` memory kind, the rest
    NumPy arrays. With quantized experts (`cfg.expert_quant`) each stack is [E, F, 3, W] uint8 (`model/quant.py`). Nothing is on the device; an engine (`make_engine`) places the weights for one policy and VRAM
    budget, and reads the experts where they are (one host copy, whatever the policy).
    """

    cfg: MoEConfig
    params: M.Params  # NumPy leaves; experts pinned_host jax.Array
    tokenizer: Any = None  # a transformers PreTrainedTokenizerFast, or None
    dtype: str = "bfloat16"
    path: str | None = None

    @property
    def dtype_bytes(self) -> int:
        return np_dtype(self.dtype).itemsize

    def weight_bytes(self) -> int:
        """Bytes of every weight (resident part + experts), wherever they live (NumPy or pinned_host arrays)."""
        return sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(self.params))

    def expert_bytes(self) -> int:
        """Bytes of all routed experts as stored (packed codes and scales when quantized)."""
        return self.cfg.total_expert_bytes(self.dtype_bytes)

    @property
    def expert_quant(self) -> ExpertQuant | None:
        """How the experts are stored (None: in `dtype`)."""
        return self.cfg.expert_quant


def load(path: str | pathlib.Path | None = None, dtype: str = "bfloat16", progress: bool = False,
         pin_experts: bool = True, experts: str | ExpertQuant | None = None, group: int | None = None) -> Model:
    """Load a model onto the host.

    Args:
      path: a Hugging Face directory (config.json + safetensors shards, optional tokenizer files), a
        moepic_jax orbax checkpoint directory, or None for the embedded default model (`checkpoints/`).
      dtype: "bfloat16" (default), "float32" or "float16": every weight is cast to it.
      pin_experts: move the expert stacks to pinned host memory as they are read, one layer at a time, so the
        host holds one copy of them (False: keep NumPy stacks).
      experts: None (experts in `dtype`), "int8" or "int4": weight-only, group-wise quantized experts
        (`model/quant.py`), quantized layer by layer as they are read and then pinned, so the host never holds
        every layer's experts at full precision at once. Every other weight stays in `dtype`; the engines
        dequantize on the device, inside the expert matmuls.
      group: elements of d_model per scale (default 128 for int8, 64 for int4); must divide d_model.
    Returns:
      `Model` (nothing on the device); with experts=, `cfg.expert_quant` says how the experts are stored.
    Raises:
      FileNotFoundError / ValueError: see `read_config_and_params`; unsupported dtype; an unknown `experts` value
        or a group size that does not divide d_model (the message lists the valid sizes).
    """
    np_dtype(dtype)
    quant = expert_quant(experts, group)
    if path is None:
        path = checkpoint.default_checkpoint_dir()
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    store = None
    if quant is not None:
        if (path / "config.json").exists():  # a bad group size is an error before any weight is read
            quant.check(from_hf_config(json.loads((path / "config.json").read_text())).d_model)
        sh = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")

        def store(layer: int, stack):  # one layer: quantize on the host, pin, and drop the full-precision stack
            packed = quantize_rows(stack, quant)
            if not pin_experts:
                return packed
            pinned = jax.device_put(packed, sh)
            pinned.block_until_ready()
            return pinned
    if checkpoint.is_orbax_checkpoint(path):
        cfg, params = checkpoint.restore(path, dtype, store)
    else:
        cfg, params = read_config_and_params(path, dtype, progress, store)
    if quant is not None:
        cfg = dataclasses.replace(cfg, expert_quant=quant)
    if pin_experts:
        params = pinned_experts(params)
    return Model(cfg=cfg, params=params, tokenizer=load_tokenizer(path), dtype=dtype, path=str(path))


def peek(path: str | pathlib.Path | None = None) -> tuple[MoEConfig, Any]:
    """(config, tokenizer or None) of a model directory without reading its weights: enough to check a request
    (prompt length against the context) before a long load. Raises as `load` does for a missing or bad path."""
    path = checkpoint.default_checkpoint_dir() if path is None else pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    cfg_file = path / "config.json"
    try:
        cfg = from_hf_config(json.loads(cfg_file.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"{cfg_file} not found: point at a Hugging Face model directory (config.json + "
                                "*.safetensors) or a moepic_jax checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file} is unreadable ({type(e).__name__}: {e}); re-download config.json with the "
                         "checkpoint") from e
    return cfg, load_tokenizer(path)


def pinned_experts(params: M.Params) -> M.Params:
    """`params` with every expert stack moved to the `pinned_host` memory of the default device, layer by layer: each
    NumPy stack can be freed as soon as its pinned copy exists, so the host never holds two copies of all experts."""
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    layers = list(params.layers)
    for l, lp in enumerate(layers):
        if lp.moe is not None and not isinstance(lp.moe.experts, jax.Array):
            pinned = jax.device_put(lp.moe.experts, sh)
            pinned.block_until_ready()
            layers[l] = lp.replace(moe=lp.moe.replace(experts=pinned))
    return params.replace(layers=tuple(layers))
