"""`MoEConfig`: one frozen, hashable description of a Mixture-of-Experts decoder.

Built from a Hugging Face `config.json` (`from_hf_config`) for the families whose
reference code lives in transformers:

| family      | HF class               | reference file                                  |
|-------------|------------------------|-------------------------------------------------|
| `mixtral`   | `MixtralForCausalLM`   | transformers/models/mixtral/modeling_mixtral.py |
| `qwen2_moe` | `Qwen2MoeForCausalLM`  | transformers/models/qwen2_moe/modeling_qwen2_moe.py |
| `qwen3_moe` | `Qwen3MoeForCausalLM`  | transformers/models/qwen3_moe/modeling_qwen3_moe.py |
| `olmoe`     | `OlmoeForCausalLM`     | transformers/models/olmoe/modeling_olmoe.py     |

No arrays live here; the config is a static argument of jitted functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
SUPPORTED_ROPE_TYPES = ("default",)
QUANT_BITS = (8, 4)  # weight-only expert quantization: int8 or int4 codes
DEFAULT_QUANT_GROUP = {8: 128, 4: 64}  # elements per scale along d_model (`ExpertQuant.group`)
QUANT_SCALE_BYTES = 4  # one float32 scale per group


@dataclasses.dataclass(frozen=True)
class ExpertQuant:
    """How routed-expert weights are stored: weight-only, symmetric, group-wise integer codes (`model/quant.py`).

    Every neuron row of the neuron-major stack (gate column, up column, down row; each a vector of length D =
    d_model) is stored as its codes followed by its scales: `bits`-bit codes (int8: one byte each; int4: two per
    byte) and one float32 scale (its 4 bytes) per `group` consecutive elements along D. A row is then
    `row_width(D)` bytes and the stack of a layer `[E, F, 3, row_width(D)]` uint8, so any split of an expert along
    its neurons is still one contiguous slice.
    """

    bits: int  # 8 or 4
    group: int  # elements of D per scale

    def __post_init__(self):
        if self.bits not in QUANT_BITS:
            raise ValueError(f"expert quantization bits={self.bits!r}; supported: {QUANT_BITS} ('int8', 'int4')")
        if not isinstance(self.group, int) or self.group < 2 or self.group % 2:
            raise ValueError(f"quantization group={self.group!r} must be an even int >= 2 (elements per scale)")

    @property
    def name(self) -> str:
        """"int8" or "int4"."""
        return f"int{self.bits}"

    def code_bytes(self, d: int) -> int:
        """Bytes of the codes of one length-d vector."""
        return d * self.bits // 8

    def scale_bytes(self, d: int) -> int:
        """Bytes of the scales of one length-d vector (float32, one per group)."""
        return d // self.group * QUANT_SCALE_BYTES

    def row_width(self, d: int) -> int:
        """Bytes W of one stored length-d vector: codes then scales."""
        return self.code_bytes(d) + self.scale_bytes(d)

    def check(self, d: int) -> None:
        """Raise ValueError unless vectors of length d split into whole groups; the message names the valid sizes."""
        if d % self.group:
            valid = [g for g in range(2, d + 1, 2) if d % g == 0]
            raise ValueError(f"{self.name} quantization group size {self.group} does not divide d_model={d}; "
                             f"valid group sizes: {valid}")


def expert_quant(experts: str | ExpertQuant | None, group: int | None = None) -> ExpertQuant | None:
    """Read the `experts=` option: None / "none" mean not quantized, "int8" / "int4"
    quantized with `group` elements per scale (default `DEFAULT_QUANT_GROUP`: 128 for int8, 64 for int4).

    Raises:
      ValueError: another value, or a group given without quantization.
    """
    if isinstance(experts, ExpertQuant):
        return experts if group is None else ExpertQuant(experts.bits, int(group))
    if experts is None or (isinstance(experts, str) and experts.lower() in ("none", "")):
        if group is not None:
            raise ValueError("a quantization group size needs experts='int8' or 'int4'")
        return None
    if isinstance(experts, str) and experts.lower() in ("int8", "int4"):
        bits = int(experts[3:])
        return ExpertQuant(bits, DEFAULT_QUANT_GROUP[bits] if group is None else int(group))
    raise ValueError(f"experts={experts!r}: use 'int8', 'int4' or None (experts in the model dtype)")


ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Static description of an MoE decoder-only transformer.

    Dims use the legend of `model/layers.py`: D = d_model, F = d_ff (per expert), E = n_experts,
    K = top_k, H = n_heads, G = n_kv_heads, hd = head_dim.
    """

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int  # neurons per routed expert
    n_experts: int
    top_k: int
    moe_layers: tuple[bool, ...]  # [n_layers]; False = dense SwiGLU MLP layer
    dense_d_ff: int = 0  # neurons of the dense MLP in non-MoE layers
    shared_d_ff: int = 0  # neurons of the shared expert (Qwen2-MoE); 0 = none
    norm_topk_prob: bool = True
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2-MoE `qkv_bias`, others `attention_bias`)
    o_bias: bool = False  # bias on the output projection (`attention_bias` of Qwen3-MoE / OLMoE)
    qk_norm: str = "none"  # "none" | "head" (Qwen3-MoE, RMSNorm over hd) | "full" (OLMoE, over H*hd / G*hd)
    clip_qkv: float | None = None  # OLMoE
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    expert_quant: ExpertQuant | None = None  # how the routed experts are stored; None = in the model dtype

    def __post_init__(self):
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"unsupported MoE family {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        if len(self.moe_layers) != self.n_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries, expected n_layers={self.n_layers}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.qk_norm not in ("none", "head", "full"):
            raise ValueError(f"qk_norm={self.qk_norm!r}; expected 'none', 'head' or 'full'")
        if not any(self.moe_layers):
            raise ValueError("the model has no MoE layer; moepic_jax only serves Mixture-of-Experts models")
        if not all(self.moe_layers) and self.dense_d_ff <= 0:
            raise ValueError("dense layers present but dense_d_ff is not set")
        if self.expert_quant is not None:
            self.expert_quant.check(self.d_model)

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.moe_layers) if m)

    @property
    def expert_row_bytes_per_dtype_byte(self) -> int:
        """Elements of one neuron row of an expert (gate column + up column + down row) = 3 * D."""
        return 3 * self.d_model

    @property
    def expert_row_width(self) -> int:
        """Last dim of the stored expert stack [E, F, 3, W]: D, or the packed width of a quantized vector."""
        q = self.expert_quant
        return self.d_model if q is None else q.row_width(self.d_model)

    def expert_store_dtype(self, dtype):
        """The dtype of the stored expert stack: `dtype` (the model's), or uint8 when quantized."""
        import numpy as np

        return np.dtype(np.uint8) if self.expert_quant is not None else dtype

    def expert_row_bytes(self, dtype_bytes: int) -> int:
        """Bytes of one stored neuron row of an expert (gate column, up column, down row): 3 * D * dtype_bytes, or
        3 * W packed bytes when quantized (codes and scales)."""
        if self.expert_quant is not None:
            return 3 * self.expert_row_width
        return 3 * self.d_model * dtype_bytes

    def expert_bytes(self, dtype_bytes: int) -> int:
        """Bytes of one whole stored routed expert (gate + up + down) at `dtype_bytes` per element (quantized: the
        packed bytes, whatever `dtype_bytes`)."""
        return self.d_ff * self.expert_row_bytes(dtype_bytes)

    def total_expert_bytes(self, dtype_bytes: int) -> int:
        """Bytes of all routed experts of all MoE layers."""
        return sum(self.moe_layers) * self.n_experts * self.expert_bytes(dtype_bytes)

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict of this config (inverse of `from_hf_config`)."""
        d: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "num_experts_per_tok": self.top_k,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id) or None,
            "pad_token_id": self.pad_token_id,
        }
        if self.family == "mixtral":
            d.update(num_local_experts=self.n_experts, intermediate_size=self.d_ff, sliding_window=None)
        else:
            d.update(num_experts=self.n_experts, norm_topk_prob=self.norm_topk_prob)
        if self.family in ("qwen2_moe", "qwen3_moe"):
            mlp_only = [i for i, m in enumerate(self.moe_layers) if not m]
            d.update(moe_intermediate_size=self.d_ff, intermediate_size=self.dense_d_ff or self.d_ff,
                     decoder_sparse_step=1, mlp_only_layers=mlp_only, use_sliding_window=False)
        if self.family == "qwen2_moe":
            d.update(shared_expert_intermediate_size=self.shared_d_ff, qkv_bias=self.qkv_bias)
        if self.family in ("qwen3_moe", "olmoe"):
            d.update(attention_bias=self.qkv_bias)
        if self.family == "olmoe":
            d.update(intermediate_size=self.d_ff, clip_qkv=self.clip_qkv)
        return d

    def identity(self) -> str:
        """A short stable hash of this config, used to tie profiles and plans to a model."""
        d = dataclasses.asdict(self)
        if d["expert_quant"] is None:  # unquantized configs keep the identity they had before the field existed
            del d["expert_quant"]
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rope_theta(d: dict[str, Any]) -> float:
    """Read RoPE from either transformers 5.x `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    for block in (params, scaling):
        if isinstance(block, dict):
            # transformers 5 may nest per layer type: {"full_attention": {...}}
            if "rope_type" not in block and "type" not in block and len(block) and all(
                isinstance(v, dict) for v in block.values()
            ):
                block = next(iter(block.values()))
            rtype = block.get("rope_type", block.get("type", "default"))
            if rtype not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"unsupported RoPE type {rtype!r} (rope_scaling/rope_parameters); supported: "
                    f"{', '.join(SUPPORTED_ROPE_TYPES)}. Remove the scaling from config.json or use a model without it."
                )
    if isinstance(params, dict):
        inner = params if "rope_theta" in params else next((v for v in params.values() if isinstance(v, dict)), {})
        if "rope_theta" in inner:
            return float(inner["rope_theta"])
    return float(d.get("rope_theta", 10000.0))


def _eos(v) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(x) for x in v)


def _n_experts(d: dict[str, Any]) -> int:
    # transformers releases differ in which name they write (attribute_map aliases them)
    for k in ("num_experts", "num_local_experts"):
        if d.get(k) is not None:
            return int(d[k])
    raise ValueError("config.json has neither num_experts nor num_local_experts")


def from_hf_config(d: dict[str, Any] | Any) -> MoEConfig:
    """Build a `MoEConfig` from a Hugging Face config (a `config.json` dict or a `PretrainedConfig`).

    Raises:
      ValueError: unsupported `model_type`, RoPE scaling type, or sliding-window attention; the message
        lists what is supported.
    """
    if not isinstance(d, dict):
        d = d.to_dict()
    family = d.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"unsupported model_type {family!r}; supported MoE families: {', '.join(SUPPORTED_FAMILIES)} "
            f"({', '.join(ARCHITECTURES.values())})"
        )
    if d.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden_act {d.get('hidden_act')!r}; supported: silu")
    sliding = d.get("sliding_window")
    uses_sliding = d.get("use_sliding_window", family in ("mixtral",) and sliding is not None)
    if family == "mixtral" and sliding is not None:
        uses_sliding = True
    if uses_sliding and sliding:
        raise ValueError(
            f"sliding-window attention (sliding_window={sliding}) is not supported; supported: full attention. "
            "Set use_sliding_window=false / sliding_window=null in config.json if the model was trained without it."
        )
    layer_types = d.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types) and uses_sliding:
        raise ValueError(f"layer_types {sorted(set(layer_types))} include sliding attention; supported: full_attention")
    n_layers = int(d["num_hidden_layers"])
    d_model = int(d["hidden_size"])
    n_heads = int(d["num_attention_heads"])
    head_dim = d.get("head_dim") or d_model // n_heads
    common = dict(
        family=family,
        vocab_size=int(d["vocab_size"]),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim),
        top_k=int(d["num_experts_per_tok"]),
        rms_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(d),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=_eos(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
    )
    if family == "mixtral":
        return MoEConfig(**common, d_ff=int(d["intermediate_size"]), n_experts=_n_experts(d),
                         moe_layers=(True,) * n_layers, norm_topk_prob=True)
    n_experts = _n_experts(d)
    if family in ("qwen2_moe", "qwen3_moe"):
        step = int(d.get("decoder_sparse_step", 1) or 1)
        mlp_only = set(d.get("mlp_only_layers") or [])
        moe = tuple((i not in mlp_only) and n_experts > 0 and (i + 1) % step == 0 for i in range(n_layers))
        extra = dict(d_ff=int(d["moe_intermediate_size"]), dense_d_ff=int(d.get("intermediate_size", 0)),
                     n_experts=n_experts, moe_layers=moe, norm_topk_prob=bool(d.get("norm_topk_prob", False)))
        if family == "qwen2_moe":
            return MoEConfig(**common, **extra, shared_d_ff=int(d.get("shared_expert_intermediate_size", 0)),
                             qkv_bias=bool(d.get("qkv_bias", True)))
        bias = bool(d.get("attention_bias", False))
        return MoEConfig(**common, **extra, qkv_bias=bias, o_bias=bias, qk_norm="head")
    bias = bool(d.get("attention_bias", False))
    return MoEConfig(**common, d_ff=int(d["intermediate_size"]), n_experts=n_experts, moe_layers=(True,) * n_layers,
                     norm_topk_prob=bool(d.get("norm_topk_prob", False)), qkv_bias=bias, o_bias=bias,
                     qk_norm="full", clip_qkv=d.get("clip_qkv"))


def load_hf_config(path) -> MoEConfig:
    """Read `<path>/config.json` and build a `MoEConfig` (see `from_hf_config`)."""
    import pathlib

    p = pathlib.Path(path) / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: point at a Hugging Face model directory (config.json + *.safetensors)")
    return from_hf_config(json.loads(p.read_text()))
