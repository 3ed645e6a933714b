"""JAX's persistent compilation cache in a user cache directory: a second process with the same model, policy and
budget loads its compiled steps instead of compiling them again (the command line turns it on unless
`--no-compile-cache`; from Python call `moepic_jax.use_compile_cache()` once before the first `generate`)."""

from __future__ import annotations

import os


def default_dir() -> str:
    """`$XDG_CACHE_HOME/moepic_jax/xla`, or `~/.cache/moepic_jax/xla`."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moepic_jax", "xla")


def use_compile_cache(path: str | None = None, min_compile_s: float = 0.5) -> str:
    """Point JAX's persistent compilation cache at `path` (default `default_dir()`), keeping programs that took at
    least `min_compile_s` seconds to compile. Sets process-wide JAX options (`jax_compilation_cache_dir`,
    `jax_persistent_cache_min_compile_time_secs`). Returns the directory used."""
    import jax

    path = path or default_dir()
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    return path
