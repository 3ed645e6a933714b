"""moepic_jax: MoE LLM inference in JAX with experts offloaded to host memory (MoEpic, arXiv 2509.08342).

Imports run one way: config -> model -> io -> offload -> planning -> runtime -> stats -> generate -> cli.
"""

from moepic_jax.config import MoEConfig, from_hf_config
from moepic_jax.generate import ENGINES, GenerateResult, forward, generate
from moepic_jax.io.loading import Model, load
from moepic_jax.offload.policies import POLICIES
from moepic_jax.runtime.engine import Engine, OffloadEngine, ResidentEngine
from moepic_jax.runtime.factory import EngineCache, make_engine
from moepic_jax.stats import GenerateStats

__all__ = ["ENGINES", "POLICIES", "Engine", "EngineCache", "GenerateResult", "GenerateStats", "MoEConfig", "Model",
           "OffloadEngine", "ResidentEngine", "forward", "from_hf_config", "generate", "load", "make_engine"]
__version__ = "0.1.0"
