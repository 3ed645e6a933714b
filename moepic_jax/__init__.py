"""moepic_jax: MoE LLM inference in JAX with experts offloaded to host memory (MoEpic, arXiv 2509.08342).

Imports run one way: config -> model -> io -> offload -> planning -> runtime -> stats -> generate -> cli.
"""
import os

# Direct copies (offload/transfer.py) make XLA's stream wait on the device for a flag that the copy stream writes;
# with fewer CUDA hardware queues than streams both may share one, and the copies would wait behind that wait. The
# driver reads this when JAX starts its GPU backend, which is after this import in the usual order; a value the
# user set wins.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

from moepic_jax.config import MoEConfig, from_hf_config
from moepic_jax.generate import ENGINES, GenerateResult, forward, generate
from moepic_jax.io.loading import Model, load
from moepic_jax.offload.policies import POLICIES
from moepic_jax.runtime.compile_cache import use_compile_cache
from moepic_jax.runtime.engine import Engine, OffloadEngine, ResidentEngine
from moepic_jax.runtime.factory import EngineCache, make_engine
from moepic_jax.stats import GenerateStats

__all__ = ["ENGINES", "POLICIES", "Engine", "EngineCache", "GenerateResult", "GenerateStats", "MoEConfig", "Model",
           "OffloadEngine", "ResidentEngine", "forward", "from_hf_config", "generate", "load", "make_engine",
           "use_compile_cache"]
__version__ = "0.1.0"
