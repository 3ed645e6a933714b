"""Expert rows to the device by DMA on a private stream, with no conditional in the compiled program.

XLA 0.11 cannot overlap an expert copy with compute by itself: a copy whose source depends on device data (the
routed ids) runs as a kernel on the compute stream, and one inside a conditional also makes the host wait for the
branch index (docs/notes/2026-12-07-copy-overlap-probes.md: overlap 0.1 for traced slices, 0.5 for whole-buffer
arguments, 0.9 for `cudaMemcpyAsync` on a private stream). So the decode step computes a copy *plan* on the device
and two XLA FFI calls (`h2d.cc`, built here with g++ on first use) carry it out:

  start(plan0, src0, tops0, plan1, src1, tops1) -> (dst0, dst1)   queue the plans' reads and hand the layer to a
                                                                   worker thread that queues its copies on the
                                                                   private stream; return at once
  wait(dst, plan, src, tops, group) -> dst                         XLA's stream waits on the device for that
                                                                   group's copies (a stream memory operation)

The host never waits for the GPU inside a step: it queues every layer's kernels ahead of the copies, and the GPU
idles between a layer's router and its first copy only for the worker's reaction (read the plan, queue the copies).
Where the driver has no stream memory operations (or MOEPIC_JAX_DIRECT_SYNC=1), `start` reads the plans itself and
waits for them, one host round trip per layer (`mode`). The worker checks every plan row before copying; a bad row
(or a CUDA error) is reported by the next `start` or `wait`, which first makes XLA's stream wait for every copy
queued so far, so that none runs into a buffer XLA frees when it abandons the run. The copy stream must not share a
hardware queue with XLA's stream (CUDA_DEVICE_MAX_CONNECTIONS=32, set by `import moepic_jax`).

A plan row is (source, index, first_row, n_rows): source 0 = the pinned host stack (index: expert), 1 = the layer's
cache of top rows on the device (index: slot); rows [first_row, first_row + n_rows) land at the same rows of the
destination expert, so a destination [n, F, 3, D] comes out whole: misses from the host, a top hit's top rows from
its cache slot and its bottom from the host. Rows that no plan row writes are undefined (callers never read them).
Group 0 is this layer's experts, group 1 the next layer's predicted experts (a prefetch, waited for a layer later).

On the CPU the same plans run with memcpy at `wait`, where a GPU's copies have landed by, so that a program that
read a destination before its wait, or wrote cache rows that a started copy still reads, fails the CPU tests too.
The engines use direct copies on one GPU by default (`make_engine(direct="auto")`); they need a C++ compiler
(`available`).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("h2d.cc")
PLAN_COLS = 4  # (source, index, first_row, n_rows)
FROM_HOST, FROM_CACHE = 0, 1
_TARGETS = {"cpu": ("moepic_h2d_start_cpu", "moepic_h2d_wait_cpu"),
            "gpu": ("moepic_h2d_start_cuda", "moepic_h2d_wait_cuda")}


def cache_dir() -> pathlib.Path:
    """Where the built library is kept: $MOEPIC_JAX_CACHE or ~/.cache/moepic_jax, folder ffi/."""
    root = os.environ.get("MOEPIC_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moepic_jax")
    return pathlib.Path(root) / "ffi"


def _build(platform: str) -> pathlib.Path:
    """Compile h2d.cc for `platform` ("cpu" or "gpu") once per source and jaxlib version; returns the .so path.
    Raises RuntimeError with the compiler's message when the build fails."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + jax.__version__.encode() + platform.encode()).hexdigest()[:16]
    out = cache_dir() / f"h2d_{platform}_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = ["-DMOEPIC_CUDA", "-pthread"] if platform == "gpu" else []
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = pathlib.Path(tmp) / out.name
        res = subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", *flags, "-I", jax.ffi.include_dir(),
                              str(SOURCE), "-o", str(tmp_so), *(["-ldl"] if platform == "gpu" else [])],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed:\n{res.stderr[-2000:]}")
        os.replace(tmp_so, out)  # atomic: another process building the same file sees a whole library or none
    return out


def _load_cudart() -> None:
    """Make the CUDA runtime's symbols global, so that the library's cuda* calls resolve to jaxlib's runtime."""
    found = sorted(p for d in sys.path for p in glob.glob(os.path.join(d, "nvidia", "**", "libcudart.so*"),
                                                          recursive=True))
    ctypes.CDLL(found[0] if found else "libcudart.so", mode=ctypes.RTLD_GLOBAL)


@functools.cache  # a shared library and its FFI targets are process-wide: build, load and register once
def _library(platform: str) -> tuple[ctypes.CDLL | None, str | None]:
    """Build, load and register the FFI targets for `platform`: (the library, None), or (None, why not)."""
    if platform not in _TARGETS:
        return None, f"no direct copies on platform {platform!r}"
    try:
        so = _build(platform)
        if platform == "gpu":
            _load_cudart()
        lib = ctypes.CDLL(str(so))
    except (RuntimeError, OSError) as e:
        return None, str(e)
    start, wait = _TARGETS[platform]
    xla_platform = "CUDA" if platform == "gpu" else "cpu"
    jax.ffi.register_ffi_target(start, jax.ffi.pycapsule(lib.MoepicH2DStart), platform=xla_platform)
    jax.ffi.register_ffi_target(wait, jax.ffi.pycapsule(lib.MoepicH2DWait), platform=xla_platform)
    return lib, None


def _register(platform: str) -> str | None:
    """Register the FFI targets for `platform`; None when that works, else the reason it does not."""
    return _library(platform)[1]


def mode(platform: str) -> str:
    """How this process's direct copies on `platform` run: "async" (a worker queues the copies; XLA's stream waits
    on the device), "sync" (each start waits on the host for its plans), "cpu" (memcpy at wait), or "unused" (no
    copy has started yet, or the library cannot be built)."""
    lib, _ = _library(platform)
    if lib is None:
        return "unused"
    if platform != "gpu":
        return "cpu"
    return {-1: "unused", 0: "sync", 1: "async"}[lib.MoepicH2DMode()]


def available(device) -> bool:
    """Whether direct copies work on `device` (builds and registers the library on first call).
    MOEPIC_JAX_DIRECT_COPIES=0 makes them unavailable (an engine asked for them then refuses)."""
    if os.environ.get("MOEPIC_JAX_DIRECT_COPIES", "1") == "0":
        return False
    return _register(device.platform) is None


def unavailable_reason(device) -> str | None:
    """Why `available(device)` is False (None when it is True)."""
    if os.environ.get("MOEPIC_JAX_DIRECT_COPIES", "1") == "0":
        return "MOEPIC_JAX_DIRECT_COPIES=0"
    return _register(device.platform)


def host_address(stack: jax.Array) -> np.ndarray:
    """[2] int32: the address of a pinned_host stack's buffer as two 32-bit words (low, high), the `src` of a plan.
    The stack must stay alive (and unmoved) while programs that read it run: engines hold their stacks."""
    a = stack.unsafe_buffer_pointer()
    return np.array([a & 0xFFFFFFFF, a >> 32], np.uint32).view(np.int32)


class Group(NamedTuple):
    """One group of copies: plan [n, S, 4] int32 (S plan rows per destination expert), src [2] int32
    (`host_address`), tops [slots, r, 3, D] (the cache's top rows; no slots when nothing is cached). The group's
    destination is [n, F, 3, D]."""

    plan: jax.Array
    src: jax.Array
    tops: jax.Array


def start(platform: str, groups: tuple[Group, Group], rows: int, row_shape: tuple[int, ...], n_experts: int, dtype,
          tag: int):
    """Queue the copies of two groups; returns their destinations ([n_g, rows, *row_shape] of `dtype`, the stack's
    row shape and dtype; undefined rows where no plan row writes). `tag` (static, e.g. the layer) names the call
    site: its `wait`s name it too.
    Raises RuntimeError when direct copies are unavailable on `platform` (`available`)."""
    reason = _register(platform)
    if reason is not None:
        raise RuntimeError(f"direct copies are unavailable on {platform}: {reason}")
    row_bytes = int(np.prod(row_shape)) * jnp.dtype(dtype).itemsize
    out = tuple(jax.ShapeDtypeStruct((g.plan.shape[0], rows, *row_shape), dtype) for g in groups)
    call = jax.ffi.ffi_call(_TARGETS[platform][0], out, has_side_effect=True)
    args = [x for g in groups for x in (g.plan.astype(jnp.int32), g.src, g.tops)]
    return call(*args, rows=np.int64(rows), row_bytes=np.int64(row_bytes), n_experts=np.int64(n_experts),
                tag=np.int64(tag))


def wait(platform: str, dst: jax.Array, group: Group, tag: int, index: int) -> jax.Array:
    """`dst` once group number `index` (0 or 1) of the `start` tagged `tag` has landed: XLA's stream waits on the
    device, the host does not. `group` is the `Group` that start copied: its plan, src and tops are operands here so
    that XLA keeps their memory until the copies that read them are done."""
    call = jax.ffi.ffi_call(_TARGETS[platform][1], jax.ShapeDtypeStruct(dst.shape, dst.dtype), has_side_effect=True,
                            input_output_aliases={0: 0})
    return call(dst, group.plan.astype(jnp.int32), group.src, group.tops, tag=np.int64(tag), group=np.int64(index))
