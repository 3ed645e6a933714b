"""`load()`: a Hugging Face directory, a moepic_jax checkpoint or the embedded default model -> a host `Model`."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax

from moepic_jax import model as M
from moepic_jax.config import MoEConfig, from_hf_config
from moepic_jax.io import checkpoint
from moepic_jax.io.hf import load_tokenizer, read_config_and_params
from moepic_jax.model.params import np_dtype


@dataclasses.dataclass
class Model:
    """A model on the host: config, weights, optional tokenizer.

    The routed experts are `jax.Array` stacks [E, F, 3, D] (neuron-major) in the `pinned_host` memory kind, the rest
    NumPy arrays. Nothing is on the device; an engine (`make_engine`) places the weights for one policy and VRAM
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
        """Bytes of all routed experts."""
        return self.cfg.total_expert_bytes(self.dtype_bytes)


def load(path: str | pathlib.Path | None = None, dtype: str = "bfloat16", progress: bool = False,
         pin_experts: bool = True) -> Model:
    """Load a model onto the host.

    Args:
      path: a Hugging Face directory (config.json + safetensors shards, optional tokenizer files), a
        moepic_jax orbax checkpoint directory, or None for the embedded default model (`checkpoints/`).
      dtype: "bfloat16" (default), "float32" or "float16": every weight is cast to it.
      pin_experts: move the expert stacks to pinned host memory as they are read, one layer at a time, so the
        host holds one copy of them (False: keep NumPy stacks).
    Returns:
      `Model` (nothing on the device).
    Raises:
      FileNotFoundError / ValueError: see `read_config_and_params`; unsupported dtype.
    """
    np_dtype(dtype)
    if path is None:
        path = checkpoint.default_checkpoint_dir()
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if checkpoint.is_orbax_checkpoint(path):
        cfg, params = checkpoint.restore(path, dtype)
    else:
        cfg, params = read_config_and_params(path, dtype, progress)
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
