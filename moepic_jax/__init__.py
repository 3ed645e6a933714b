"""moepic_jax: MoE LLM inference in JAX with experts offloaded to host memory (MoEpic, arXiv 2509.08342)."""

from moepic_jax.config import MoEConfig, from_hf_config
from moepic_jax.engine import POLICIES
from moepic_jax.engine import make_engine as Engine
from moepic_jax.generate import GenerateResult, GenerateStats, forward, generate
from moepic_jax.weights import Model, load

__all__ = ["POLICIES", "Engine", "GenerateResult", "GenerateStats", "MoEConfig", "Model", "forward",
           "from_hf_config", "generate", "load"]
__version__ = "0.1.0"
