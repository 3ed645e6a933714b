"""Train the embedded default model: a small Qwen3-MoE on Python source.

Nothing can be downloaded here, so the model is trained on text that every machine has. Two corpora
(`--corpus`):

* `stdlib` (default): the `*.py` files of the standard library (`sysconfig.get_paths()["stdlib"]`), a fixed
  sorted list without test folders and site-packages, split by a hash of the relative path (the same on every
  Python version): `sha256(path) % 20 == 0` -> **test** (5 %, the held-out perplexity and the shipped sample),
  `== 1` -> **val** (5 %, model selection during training), the rest -> **train**.
* `installed`: the standard library as above, then every `*.py` under this interpreter's site-packages /
  dist-packages directories (`site.getsitepackages()`, the user site, such `sys.path` entries), `__pycache__` and
  files over `--max-file-kb` left out. A file whose content (sha256) was seen before is dropped, so no text is
  in two splits. Installed files are ordered by their content's sha256 and split by it (mod 20, as above), so
  copies at different paths can never cross splits and `--max-corpus-mb` keeps a uniform sample of the packages.
  The standard library keeps its path split: its held-out files stay those the stdlib-only model never saw, so
  that model can be scored on the new test split (`--baseline`), and the shipped sample stays the same text.

The byte-level BPE tokenizer (`tokenizers`, ~8k vocabulary) is trained on the train split (at most
`--tokenizer-mb`), or reused (`--tokenizer DIR`): keeping the previous model's tokenizer makes the before/after
perplexities per token comparable; bits per byte compare either way.

Training (optax): AdamW, linear warm-up + cosine decay, global-norm clipping, and the Switch/Mixtral
load-balancing loss `E * sum_e f_e * P_e` per MoE layer (f_e: share of the top-k slots routed to e, P_e: mean
router probability; 1 when uniform), averaged over layers, times a small coefficient. The forward pass is
`moepic_jax.model`'s own functions (attention with a cache of length T, `route`, `experts_dense` over all experts),
so training and inference share one definition of the model. Params are float32 masters, compute in
bfloat16 by default. The val split is evaluated every `--eval-every` steps and the best params are kept.
Training ends at `--steps`, at `--minutes`, or when the val loss has not improved by `--min-delta` for `--patience`
evaluations; with `--minutes` the cosine schedule is fitted to the steps the time allows (re-estimated at each
evaluation from the speed so far), so the learning rate has decayed when the time is up. `--schedule plateau`
instead keeps the learning rate constant and scales it by `--plateau-factor` whenever the val loss stays flat for
`--patience` evaluations (optax's `reduce_on_plateau`), and ends training once it stays flat at
`--plateau-min-scale`: training runs until validation stops improving (or `--minutes` is up). The test split is
scored per group (stdlib, installed, all: loss, perplexity, bits per byte), and `--baseline CKPT` scores an
earlier checkpoint on the same files ("before").

Two phases, so the GPU run brings back few files:

  python tools/train_embedded.py --run-dir RUN [--steps N --minutes M ...]      # train (GPU)
  python tools/train_embedded.py --from-run RUN --out checkpoints/stdlib_moe     # assemble (CPU)

The larger-corpus run (one GPU command, about 7 minutes on an H100: corpus ~30 s, encoding ~40 s, compilation
~15 s, training 5 min, test and baseline scoring ~30 s; each phase's time is printed and kept in log.json):

  python tools/train_embedded.py --run-dir RUN --corpus installed --max-corpus-mb 250 \
      --tokenizer checkpoints/stdlib_moe --baseline checkpoints/stdlib_moe --steps 20000 --minutes 5 \
      --patience 4 --lr 1.5e-3 --warmup 200 --eval-every 250 --test-tokens 1000000

`RUN` holds the bf16 weights as a few `params-*.npz` shards, `tokenizer.json`, `log.json` (config, corpus, loss
curve, val curve, test and baseline scores, expert popularity, phase times, versions) and `heldout_sample.txt`.
The assemble phase writes the orbax checkpoint (`checkpoint.save`), measures the float32 perplexity on the shipped
sample (`eval.json`, read by tests/test_embedded.py), plots the loss curve and writes TRAINING.md. With `--out`
and no `--from-run` both phases run in one process (the CPU smoke test does that on a tiny config).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import pathlib
import platform
import shutil
import sys
import sysconfig
import time

import numpy as np

import moepic_jax
from moepic_jax import model as M
from moepic_jax.config import MoEConfig, from_hf_config
from moepic_jax.generate import forward
from moepic_jax.io import checkpoint
from moepic_jax.io.hf import leaf_paths
from moepic_jax.model.params import empty_params

EOT = "<|endoftext|>"
DEFAULT_NAME = "stdlib_moe"
SPLIT_MOD = 20
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
LICENSE_FALLBACK = ("Python standard library source, Copyright (c) 2001 Python Software Foundation; All Rights "
                    "Reserved.\nDistributed under the PSF License Agreement: https://docs.python.org/3/license.html\n")
SAMPLE_CHARS = 300_000
SHARD_BYTES = 14 * 2**20  # the device run brings back files of at most 16 MB
EVAL_TOKENS, EVAL_CHUNK = 2048, 512  # the shipped-sample perplexity (eval.json and tests/test_embedded.py)


# ---------------------------------------------------------------------------------------------- data
def split_of(rel: str) -> str:
    """'train' | 'val' | 'test' from a hash of the relative path (the same on every Python version)."""
    h = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % SPLIT_MOD
    return "test" if h == 0 else "val" if h == 1 else "train"


def stdlib_files(root: str | pathlib.Path | None = None) -> list[tuple[str, pathlib.Path]]:
    """Sorted (relative posix path, path) of the stdlib's `*.py`, without test folders and site-packages."""
    root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        if any(part in EXCLUDED_DIRS for part in rel.split("/")[:-1]) or not p.is_file():
            continue
        out.append((rel, p))
    if not out:
        raise FileNotFoundError(f"no *.py files under {root}; pass --stdlib pointing at a Python Lib directory")
    return sorted(out)


def read_split(files, split: str, limit_bytes: int | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of the files of `split`, in order, up to `limit_bytes` characters in all."""
    out, n = [], 0
    for rel, p in files:
        if split_of(rel) != split:
            continue
        text = p.read_bytes().decode("utf-8", errors="replace")
        out.append((rel, text))
        n += len(text)
        if limit_bytes is not None and n >= limit_bytes:
            break
    return out


def split_of_content(sha: str) -> str:
    """'train' | 'val' | 'test' from a file's content sha256 (hex), mod 20 as `split_of`: files with the same
    content always land in the same split, whatever their paths."""
    h = int(sha[:8], 16) % SPLIT_MOD
    return "test" if h == 0 else "val" if h == 1 else "train"


def installed_roots() -> list[pathlib.Path]:
    """This interpreter's site-packages / dist-packages directories (`site.getsitepackages()`, the user site and
    such entries of `sys.path`) that exist, resolved, sorted."""
    import site

    cands = list(site.getsitepackages()) + [site.getusersitepackages()]
    cands += [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    return sorted({pathlib.Path(c).resolve() for c in cands if c and pathlib.Path(c).is_dir()})


@dataclasses.dataclass(frozen=True)
class Doc:
    """One source file of the corpus."""

    group: str  # "stdlib" | "installed"
    rel: str  # path relative to its root (posix); installed files are prefixed with the root's index, "2:numpy/.."
    split: str  # "train" | "val" | "test"
    sha: str  # sha256 of the file's bytes (hex)
    text: str


def _read(path: pathlib.Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def gather_corpus(corpus: str, stdlib: str | pathlib.Path | None = None, max_file_bytes: int = 1_000_000,
                  max_chars: int | None = None, workers: int = 16) -> tuple[list[Doc], dict]:
    """The corpus as a list of `Doc`, in a fixed order, deduplicated by content, and what was skipped.

    `stdlib`: the standard library's `*.py` (`stdlib_files`: no test folders), split by relative path (`split_of`),
    so its held-out files are those the stdlib-only model held out. `installed`: the stdlib first, then every
    `*.py` of the `installed_roots()` (no `__pycache__`), files over `max_file_bytes` skipped, a file whose content
    was already seen dropped (its first copy is kept, the stdlib's first), sorted by content sha256 and split by it
    (`split_of_content`): a uniform sample of the installed packages, whatever `max_chars` keeps.
    `max_chars`: keep files in that order until this many characters in all (None = all).
    Returns (docs, stats: files and characters per group and split, duplicates and large files skipped, seconds).
    """
    from concurrent.futures import ThreadPoolExecutor

    if corpus not in ("stdlib", "installed"):
        raise ValueError(f"unknown corpus {corpus!r}; use 'stdlib' or 'installed'")
    t0 = time.time()
    files = [("stdlib", rel, p) for rel, p in stdlib_files(stdlib)]
    skipped_large = 0
    roots = installed_roots() if corpus == "installed" else []
    for i, root in enumerate(roots):
        for p in sorted(root.rglob("*.py")):
            rel = p.relative_to(root).as_posix()
            if "__pycache__" in rel.split("/") or not p.is_file():
                continue
            if p.stat().st_size > max_file_bytes:
                skipped_large += 1
                continue
            files.append(("installed", f"{i}:{rel}", p))
    with ThreadPoolExecutor(workers) as ex:
        blobs = list(ex.map(_read, [p for _, _, p in files]))
    seen, dups, docs = set(), 0, []
    for (group, rel, _), b in zip(files, blobs):
        if b is None:
            continue
        sha = hashlib.sha256(b).hexdigest()
        if sha in seen:
            dups += 1
            continue
        seen.add(sha)
        split = split_of(rel) if group == "stdlib" else split_of_content(sha)
        docs.append(Doc(group, rel, split, sha, b.decode("utf-8", errors="replace")))
    del blobs
    docs = [d for d in docs if d.group == "stdlib"] + sorted((d for d in docs if d.group != "stdlib"),
                                                              key=lambda d: d.sha)
    available = len(docs)
    if max_chars is not None:
        n, keep = 0, []
        for d in docs:
            if n >= max_chars:
                break
            keep.append(d)
            n += len(d.text)
        docs = keep
    stats = {"corpus": corpus, "stdlib": str(stdlib or sysconfig.get_paths()["stdlib"]),
             "roots": [str(r) for r in roots], "max_file_bytes": max_file_bytes, "max_chars": max_chars,
             "files_available": available, "duplicates_dropped": dups, "large_files_skipped": skipped_large,
             "files": {}, "chars": {}, "seconds": round(time.time() - t0, 1)}
    for d in docs:
        key = f"{d.group}/{d.split}"
        stats["files"][key] = stats["files"].get(key, 0) + 1
        stats["chars"][key] = stats["chars"].get(key, 0) + len(d.text)
    return docs, stats


def limit_docs(docs: list[Doc], split: str, limit_chars: int | None = None) -> list[Doc]:
    """The docs of `split`, in order, up to `limit_chars` characters in all (the one that crosses it included)."""
    out, n = [], 0
    for d in docs:
        if d.split != split:
            continue
        if limit_chars is not None and n >= limit_chars:
            break
        out.append(d)
        n += len(d.text)
    return out


def license_text(root: str | pathlib.Path | None = None) -> str:
    root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    for cand in (root / "LICENSE.txt", root / "LICENSE"):
        if cand.exists():
            return cand.read_text(encoding="utf-8", errors="replace")
    return LICENSE_FALLBACK


def heldout_sample(files, root=None, chars: int = SAMPLE_CHARS) -> tuple[str, int]:
    """The shipped held-out sample: the Python license notice, then test-split files (whole files, in order)
    until `chars` characters. Returns (text, offset of the first source character)."""
    head = ("This file holds source files of the Python standard library (the held-out test split of "
            "moepic_jax.train), under the license below.\n\n" + license_text(root).rstrip() + "\n\n" + "=" * 79
            + "\n\n")
    parts, n = [], 0
    for rel, text in read_split(files, "test"):
        parts.append(f"# ---- Lib/{rel} ----\n{text}\n")
        n += len(parts[-1])
        if n >= chars:
            break
    return head + "".join(parts), len(head)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (`tokenizers`) trained on `texts`, with `<|endoftext|>` as special token 0 and a
    post-processor that starts every encoded text with it (documents are separated by it in training)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B",
                                                       special_tokens=[(EOT, tok.token_to_id(EOT))])
    return tok


def wrap_tokenizer(tok):
    """A transformers `PreTrainedTokenizerFast` around a `tokenizers.Tokenizer` (bos = eos = `<|endoftext|>`)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=None,
                                   model_max_length=1 << 30, clean_up_tokenization_spaces=False)


def encode_docs(tok, texts: list[str], chunk: int = 2000) -> np.ndarray:
    """One token stream: `<|endoftext|>` before every document. uint16 when the vocabulary fits. Encoded `chunk`
    documents at a time (tokenizers' Python lists of ids are large; a few hundred MB of text at once is not)."""
    dt = np.uint16 if tok.get_vocab_size() < 2**16 else np.int32
    parts = []
    for i in range(0, len(texts), chunk):
        enc = tok.encode_batch(texts[i:i + chunk])  # the post-processor puts EOT first
        parts += [np.asarray(e.ids, dt) for e in enc]
    return np.concatenate(parts) if parts else np.zeros(0, dt)


def token_bytes(tok) -> np.ndarray:
    """[V] bytes of text each token stands for (byte-level BPE: one character of the token string per byte);
    0 for special tokens. Sums over targets give the bytes scored, for bits per byte."""
    special = set(tok.get_added_tokens_decoder()) if hasattr(tok, "get_added_tokens_decoder") else {0}
    return np.asarray([0 if i in special else len(tok.id_to_token(i) or "") for i in range(tok.get_vocab_size())],
                      np.int64)


def load_tokenizer_file(path: str | pathlib.Path):
    """A saved `tokenizers.Tokenizer` (a tokenizer.json, or a directory holding one) to reuse instead of training
    one; it must have `<|endoftext|>` as token 0, as `train_tokenizer` makes it."""
    from tokenizers import Tokenizer

    path = pathlib.Path(path)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a tokenizer.json")
    tok = Tokenizer.from_file(str(path))
    if tok.token_to_id(EOT) != 0:
        raise ValueError(f"{path}: {EOT} must be token 0 (as train_tokenizer makes it)")
    return tok


# --------------------------------------------------------------------------------------------- model
def make_config(vocab_size: int, tiny: bool = False, max_pos: int = 1024):
    """The embedded model: Qwen3-MoE layout, E=16, top-2, 6 layers, D=256, 4/2 heads of 64, d_ff 256."""
    if tiny:
        L, D, H, G, hd, F, E = 2, 32, 2, 1, 16, 32, 4
    else:
        L, D, H, G, hd, F, E = 6, 256, 4, 2, 64, 256, 16
    return MoEConfig(family="qwen3_moe", vocab_size=vocab_size, d_model=D, n_layers=L, n_heads=H, n_kv_heads=G,
                     head_dim=hd, d_ff=F, n_experts=E, top_k=2, moe_layers=(True,) * L, dense_d_ff=F,
                     norm_topk_prob=True, rms_eps=1e-6, rope_theta=10000.0, max_position_embeddings=max_pos,
                     tie_word_embeddings=False, qk_norm="head", bos_token_id=0, eos_token_id=(0,))


def init_params(cfg, seed: int):
    """Host float32 `Params`: norms 1, linear weights N(0, 0.02), output projections (attention out, expert
    down rows) scaled by 1/sqrt(2 L) (GPT-2 style)."""
    params = empty_params(cfg, "float32")
    rng = np.random.default_rng(seed)
    std, out_std = 0.02, 0.02 / math.sqrt(2 * cfg.n_layers)
    for path, a in leaf_paths(params):
        name = path[-1]
        if name in ("attn_norm", "mlp_norm", "final_norm", "q_norm", "k_norm"):
            a[...] = 1.0
        elif name in ("bq", "bk", "bv", "bo"):
            a[...] = 0.0
        elif name == "experts":  # [E, F, 3, D]: gate, up, down rows
            a[...] = rng.normal(0.0, std, a.shape)
            a[:, :, 2] *= out_std / std
        else:
            a[...] = rng.normal(0.0, out_std if name in ("wo", "w_down") else std, a.shape)
    return params


def train_forward(params, cfg, tokens, compute_dtype):
    """Training forward over [B, T] tokens with `model.decoder_layer`; every expert computed densely.

    Returns (logits [B, T, V] float32, aux [n_moe] load-balancing losses, counts [n_moe, E] routed slots).
    """
    import jax
    import jax.numpy as jnp

    p = jax.tree.map(lambda a: a.astype(compute_dtype), params)
    B, T = tokens.shape
    E, K = cfg.n_experts, cfg.top_k
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    valid = jnp.ones((B, T), bool)
    start = jnp.zeros((), jnp.int32)
    kv = jnp.zeros((1, B, T, cfg.n_kv_heads, cfg.head_dim), compute_dtype)  # a one-layer cache of length T
    h = M.embed(p, tokens)
    pos = M.Positions(positions, valid, start)
    aux, counts = [], []
    for l, lp in enumerate(p.layers):
        def ffn(x, h_mid, lp=lp, is_moe=cfg.moe_layers[l]):
            x = x.reshape(B * T, -1)
            if not is_moe:
                return M.mlp(x, lp.mlp).reshape(B, T, -1), None
            ids, w = M.route(x, lp.moe.w_router, cfg)
            probs = jax.nn.softmax((x @ lp.moe.w_router).astype(jnp.float32), axis=-1)  # [N, E]
            y = M.experts_dense(x, lp.moe.experts, ids, w).astype(x.dtype) + M.shared_expert(x, lp.moe)
            slots = jnp.sum(jax.nn.one_hot(ids, E, dtype=jnp.float32), axis=1)  # [N, E], K ones per row
            f = jnp.mean(slots, axis=0) / K
            return y.reshape(B, T, -1), (E * jnp.sum(f * jnp.mean(probs, axis=0)), jnp.sum(slots, axis=0))

        h, _, _, out = M.decoder_layer(lp, h, kv, kv, 0, pos, cfg, ffn)  # a one-layer cache, not kept
        if out is not None:
            aux.append(out[0])
            counts.append(out[1])
    return M.lm_head(p, h, cfg), jnp.stack(aux), jnp.stack(counts)


def _ce(logits, targets):
    import jax.numpy as jnp
    import optax

    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def make_optimizer(weight_decay: float, clip: float, params):
    """AdamW without its learning rate (b1 0.9, b2 0.95, decoupled weight decay on matrices, global-norm clipping):
    the training step multiplies the update by -lr itself (`lr_at`), so the schedule's length can be set once the
    speed of the step is known, without recompiling."""
    import jax
    import optax

    mask = jax.tree.map(lambda a: a.ndim >= 2, params)  # no decay on norms
    return optax.chain(optax.clip_by_global_norm(clip), optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8),
                       optax.add_decayed_weights(weight_decay, mask))


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up from 0 over `warmup` steps, then cosine decay to 10 % of `peak` at step `total` (optax's
    `warmup_cosine_decay_schedule(0, peak, warmup, total, end_value=0.1 * peak)`)."""
    warmup = max(1, warmup)
    if step < warmup:
        return peak * step / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 * peak + 0.9 * peak * 0.5 * (1.0 + math.cos(math.pi * frac))


def _windows(tokens: np.ndarray, T: int, limit: int | None = None) -> np.ndarray:
    """Non-overlapping [n, T+1] windows (targets included) of a token stream; with `limit`, at most limit // T of
    them, spread evenly over the stream (a capped val or test set then samples every part of its split, not only
    its first files)."""
    n_all = max(0, (len(tokens) - 1) // T)
    idx = np.arange(n_all)
    if limit is not None and n_all > max(1, limit // T):
        idx = np.linspace(0, n_all - 1, max(1, limit // T)).round().astype(int)
    if not len(idx):
        return np.zeros((0, T + 1), np.int32)
    return np.stack([tokens[i * T: i * T + T + 1] for i in idx]).astype(np.int32)


@functools.cache
def _eval_fn(cfg, dtype_name: str):
    """Jitted (params, windows [b, T+1]) -> (sum of target NLL in nats, routed slots [n_moe, E])."""
    import jax
    import jax.numpy as jnp
    import optax

    @jax.jit
    def fn(p, batch):
        logits, _, counts = train_forward(p, cfg, batch[:, :-1], jnp.dtype(dtype_name))
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])), counts

    return fn


def nll_windows(params, cfg, windows: np.ndarray, dtype_name: str = "float32", bs: int = 32):
    """(sum of NLL over every target in nats, number of targets, routed slots [n_moe, E] or None) of `windows`."""
    import jax.numpy as jnp

    fn = _eval_fn(cfg, dtype_name)
    tot, n, cnt = 0.0, 0, None
    for i in range(0, len(windows), bs):
        w = windows[i:i + bs]
        s, c = fn(params, jnp.asarray(w))
        tot += float(s)
        n += w.shape[0] * (w.shape[1] - 1)
        cnt = np.asarray(c) if cnt is None else cnt + np.asarray(c)
    return tot, n, cnt


def score_groups(params, cfg, tok, groups: dict[str, list[str]], T: int, limit: int | None = None):
    """Held-out scores of `params` per group of texts (float32 compute, full-precision matmuls): each group's
    texts encoded by `tok` into one stream, cut into windows of T (at most `limit` tokens per group).

    Returns ({group: {loss (nats/token), ppl, tokens, bytes, bits_per_byte}} with "all" summed over the groups,
    routed slots [n_moe, E] of all of them). Bits per byte compare models whose tokenizers differ.
    """
    import jax

    tb = token_bytes(tok)
    out, counts = {}, None
    tot = {"nll": 0.0, "tokens": 0, "bytes": 0}
    with jax.default_matmul_precision("highest"):
        for g, texts in groups.items():
            if not texts:
                continue
            w = _windows(encode_docs(tok, texts), T, limit)
            if not len(w):
                continue
            nll, n, c = nll_windows(params, cfg, w)
            nbytes = int(tb[w[:, 1:]].sum())
            out[g] = {"loss": nll / n, "ppl": math.exp(nll / n), "tokens": n, "bytes": nbytes,
                      "bits_per_byte": nll / math.log(2) / max(nbytes, 1)}
            tot["nll"] += nll
            tot["tokens"] += n
            tot["bytes"] += nbytes
            counts = c if counts is None else counts + c
    if tot["tokens"]:
        out["all"] = {"loss": tot["nll"] / tot["tokens"], "ppl": math.exp(tot["nll"] / tot["tokens"]),
                      "tokens": tot["tokens"], "bytes": tot["bytes"],
                      "bits_per_byte": tot["nll"] / math.log(2) / max(tot["bytes"], 1)}
    return out, counts


def _phase(log: dict, name: str, t0: float) -> float:
    """Record and print the seconds since t0 as phase `name`; returns now."""
    now = time.time()
    log["phases_s"][name] = round(now - t0, 1)
    print(f"[time] {name}: {now - t0:.1f} s", flush=True)
    return now


# ------------------------------------------------------------------------------------------ training
def train(args) -> pathlib.Path:
    """Phase 1: data, tokenizer, training; writes the run directory (see module docstring)."""
    import jax
    import jax.numpy as jnp
    import optax

    t_start = t = time.time()
    run = pathlib.Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    log = {"phases_s": {}}
    max_chars = None if args.max_corpus_mb is None else int(args.max_corpus_mb * 1e6)
    docs, corpus = gather_corpus(args.corpus, args.stdlib, int(args.max_file_kb * 1000), max_chars)
    limit = args.data_limit_bytes
    train_docs = limit_docs(docs, "train", limit)
    val_docs = limit_docs(docs, "val", None if limit is None else max(limit // 10, 1))
    test_docs = limit_docs(docs, "test", None if limit is None else max(limit // 10, 1))
    print(f"[data] corpus {args.corpus}: {corpus['files_available']} files after deduplication "
          f"({corpus['duplicates_dropped']} duplicates, {corpus['large_files_skipped']} files over "
          f"{args.max_file_kb:g} kB skipped); kept {corpus['files']}; chars {corpus['chars']}", flush=True)
    print(f"[data] using train {len(train_docs)} files ({sum(len(d.text) for d in train_docs) / 1e6:.1f} M chars), "
          f"val {len(val_docs)}, test {len(test_docs)}", flush=True)
    t = _phase(log, "corpus", t)
    if args.tokenizer:
        tok = load_tokenizer_file(args.tokenizer)
    else:
        budget, texts = (None if args.tokenizer_mb is None else args.tokenizer_mb * 1e6), []
        for d in train_docs:
            if budget is not None and sum(map(len, texts)) >= budget:
                break
            texts.append(d.text)
        tok = train_tokenizer(texts, args.vocab)
    tok.save(str(run / "tokenizer.json"))
    V = tok.get_vocab_size()
    t = _phase(log, "tokenizer", t)
    train_ids = encode_docs(tok, [d.text for d in train_docs])
    val_ids = encode_docs(tok, [d.text for d in val_docs])
    test_groups = {g: [d.text for d in test_docs if d.group == g] for g in ("stdlib", "installed")}
    print(f"[tokens] vocab {V}; train {len(train_ids):,} val {len(val_ids):,} tokens", flush=True)
    t = _phase(log, "encode", t)
    files = stdlib_files(args.stdlib)
    sample, offset = heldout_sample(files, args.stdlib, args.sample_chars)
    (run / "heldout_sample.txt").write_text(sample, encoding="utf-8")

    cfg = make_config(V, tiny=args.tiny, max_pos=args.max_pos)
    T, B = args.seq, args.batch
    if T > cfg.max_position_embeddings:
        raise ValueError(f"--seq {T} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    if len(train_ids) < T + 2:
        raise ValueError(f"only {len(train_ids)} training tokens for --seq {T}; use more data or a shorter --seq")
    compute = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.compute_dtype]
    params = jax.device_put(init_params(cfg, args.seed))
    opt = make_optimizer(args.weight_decay, args.clip, params)
    opt_state = opt.init(params)
    data = jnp.asarray(train_ids.astype(np.int32))
    n_data = data.shape[0]
    base_key = jax.random.PRNGKey(args.seed)

    def loss_fn(p, batch):
        logits, aux, _ = train_forward(p, cfg, batch[:, :-1], compute)
        ce = _ce(logits, batch[:, 1:])
        a = jnp.mean(aux)
        return ce + args.aux_coef * a, (ce, a)

    def step_fn(p, s, step, lr):
        key = jax.random.fold_in(base_key, step)
        starts = jax.random.randint(key, (B,), 0, n_data - T - 1)
        batch = jax.vmap(lambda st: jax.lax.dynamic_slice_in_dim(data, st, T + 1))(starts)
        (loss, (ce, a)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch)
        gnorm = optax.global_norm(g)
        upd, s = opt.update(g, s, p)
        upd = jax.tree.map(lambda u: -lr * u, upd)
        return optax.apply_updates(p, upd), s, jnp.stack([loss, ce, a, gnorm])

    step_jit = jax.jit(step_fn, donate_argnums=(0, 1))
    val_w = _windows(val_ids, T, args.val_tokens)
    argv = [("RUN_DIR" if a == args.run_dir else a) for a in (args.argv or [])]
    log.update({"config": cfg.to_hf_dict(), "args": vars(args),
                "command": " ".join(["python tools/train_embedded.py"] + argv),
                "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
                "n_devices": jax.device_count(), "versions": _versions(),
                "date_utc": datetime.datetime.now(datetime.UTC).isoformat(),
                "data": {**corpus, "python": platform.python_version(), "train_tokens": len(train_ids),
                         "val_tokens": len(val_ids), "sample_offset_chars": offset,
                         "tokenizer": f"reused from `{args.tokenizer}`" if args.tokenizer else
                         "trained on the train split"},
                "train": [], "val": []})
    print(f"[model] {sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params)):,} params; batch {B} x {T}; "
          f"up to {args.steps} steps; device {log['device']}", flush=True)
    best = (float("inf"), -1, None)
    t0 = time.time()
    deadline = t0 + 60 * args.minutes if args.minutes else None
    total = args.steps  # the schedule's length; with --minutes, re-estimated from the speed of the steps
    hist, step, stop, since_best, t_first = [], 0, None, 0, None
    plateau = args.schedule == "plateau"
    if plateau:  # optax's ReduceLROnPlateau on the val loss: the lr scale halves after --patience flat evaluations
        import optax

        rop = optax.contrib.reduce_on_plateau(factor=args.plateau_factor, patience=args.patience, rtol=0.0,
                                              atol=args.min_delta, min_scale=args.plateau_min_scale)
        rop_state, scale, since_change = rop.init({}), 1.0, 0
    for step in range(args.steps):
        lr = (args.lr * min(1.0, step / max(1, args.warmup)) * scale if plateau
              else lr_at(step, args.lr, args.warmup, total))
        params, opt_state, m = step_jit(params, opt_state, jnp.int32(step), jnp.float32(lr))
        if step == 0:
            jax.block_until_ready(m)
            t_first = time.time()
            print(f"[time] first step (compilation): {t_first - t0:.1f} s", flush=True)
        hist.append(m)
        last = step == args.steps - 1
        if (step + 1) % args.log_every == 0 or last:
            ms = np.asarray(jnp.stack(hist))
            hist = []
            el = time.time() - t0
            rec = {"step": step + 1, "loss": float(ms[:, 0].mean()), "ce": float(ms[:, 1].mean()),
                   "aux": float(ms[:, 2].mean()), "grad_norm": float(ms[:, 3].mean()), "lr": lr,
                   "elapsed_s": round(el, 2)}
            log["train"].append(rec)
            print(f"[train] step {step + 1}/{total} ce {rec['ce']:.4f} aux {rec['aux']:.4f} "
                  f"gnorm {rec['grad_norm']:.3f} lr {rec['lr']:.2e} {el:.0f} s", flush=True)
            if deadline and time.time() > deadline and not last:
                stop = "minutes"
        if ((step + 1) % args.eval_every == 0 or last or stop) and len(val_w):
            vl = nll_windows(params, cfg, val_w, args.compute_dtype)
            vl = vl[0] / vl[1]
            log["val"].append({"step": step + 1, "loss": vl, "ppl": math.exp(vl), "elapsed_s": round(time.time() - t0,
                                                                                                     2)})
            print(f"[val] step {step + 1} loss {vl:.4f} ppl {math.exp(vl):.2f}", flush=True)
            if vl < best[0] - args.min_delta:
                since_best = 0
            else:
                since_best += 1
            if vl < best[0]:
                best = (vl, step + 1, jax.tree.map(lambda a: a.copy(), params))
            if plateau:  # stop when the loss stays flat for --patience evaluations at the smallest scale
                _, rop_state = rop.update({}, rop_state, value=jnp.float32(vl))
                new_scale = float(rop_state.scale)
                since_change = 0 if (since_best == 0 or new_scale != scale) else since_change + 1
                if new_scale != scale:
                    print(f"[train] val loss flat for {args.patience} evaluations: lr scale {new_scale:g}", flush=True)
                    log.setdefault("lr_reductions", []).append({"step": step + 1, "scale": new_scale})
                scale = new_scale
                if scale <= args.plateau_min_scale and since_change >= args.patience and not stop:
                    stop = "plateau"
                    print(f"[train] val loss has not improved by {args.min_delta} for {args.patience} evaluations at "
                          f"the smallest lr scale {scale:g}; stopping", flush=True)
            elif args.patience and since_best >= args.patience and not stop:
                stop = "patience"
                print(f"[train] val loss has not improved by {args.min_delta} for {args.patience} evaluations; "
                      "stopping", flush=True)
            if deadline and step + 1 > args.warmup and not plateau:  # the schedule ends when the time does
                per_step = (time.time() - t_first) / step
                total = min(args.steps, step + 1 + int(max(0.0, deadline - time.time()) / per_step))
        if stop:
            if stop == "minutes":
                print(f"[train] --minutes {args.minutes} reached at step {step + 1}; stopping", flush=True)
            break
    stop = stop or "steps"
    train_s = time.time() - t0
    t = _phase(log, "training", t)
    final = best[2] if best[2] is not None else params
    # What ships: bfloat16 weights. Evaluate those (float32 compute, full-precision matmuls).
    import ml_dtypes

    host = jax.tree.map(lambda a: np.asarray(a, np.float32).astype(ml_dtypes.bfloat16), final)
    log.update(steps_run=step + 1, stopped_early=stop != "steps", stopped_by=stop, schedule_steps=total,
               train_seconds=round(train_s, 1), tokens_seen=(step + 1) * B * T, best_val_step=best[1],
               best_val_loss=best[0], epochs=round((step + 1) * B * T / max(len(train_ids), 1), 2))
    p32 = jax.device_put(jax.tree.map(lambda a: a.astype(np.float32), host))
    log["test"], cnt = score_groups(p32, cfg, tok, test_groups, T, args.test_tokens)
    log["test"].update(seq=T, weights="bfloat16", compute="float32")
    log["popularity"] = popularity_stats(cnt)
    for g in ("stdlib", "installed", "all"):
        if g in log["test"]:
            r = log["test"][g]
            print(f"[test] {g}: {r['tokens']:,} tokens: loss {r['loss']:.4f} ppl {r['ppl']:.3f} "
                  f"bits/byte {r['bits_per_byte']:.4f}", flush=True)
    for row in log["popularity"]:
        print(f"[popularity] layer {row['layer']}: entropy/uniform {row['norm_entropy']:.3f} max share "
              f"{row['max_share']:.3f} min share {row['min_share']:.4f}", flush=True)
    t = _phase(log, "test", t)
    if args.baseline:
        log["baseline"] = score_baseline(args.baseline, tok, test_groups, T, args.test_tokens)
        t = _phase(log, "baseline", t)
    save_shards(run, host)
    log["total_seconds"] = round(time.time() - t_start, 1)
    (run / "log.json").write_text(json.dumps(log, indent=1))
    print(f"[done] run files in {run} ({log['total_seconds']} s)", flush=True)
    return run


def score_baseline(path: str | pathlib.Path, tok, test_groups: dict[str, list[str]], T: int,
                   limit: int | None = None) -> dict:
    """The held-out scores (`score_groups`) of an earlier checkpoint on the same test texts, encoded by its own
    tokenizer; `same_tokenizer` says whether that is this run's (then loss and perplexity per token compare;
    bits per byte always do). Prints one line per group beside this run's."""
    import jax

    base = moepic_jax.load(path, dtype="float32", pin_experts=False)
    btok = load_tokenizer_file(path)
    scores, _ = score_groups(jax.device_put(base.params), base.cfg, btok, test_groups, T, limit)
    same = btok.to_str() == tok.to_str()
    for g in ("stdlib", "installed", "all"):
        if g in scores:
            r = scores[g]
            print(f"[baseline] {g}: {r['tokens']:,} tokens: loss {r['loss']:.4f} ppl {r['ppl']:.3f} "
                  f"bits/byte {r['bits_per_byte']:.4f}{'' if same else ' (its own tokenizer)'}", flush=True)
    return {"checkpoint": str(path), "same_tokenizer": same, **scores}


def popularity_stats(counts: np.ndarray) -> list[dict]:
    """Per MoE layer: routed-slot shares per expert and their entropy normalised by log(E) (1 = uniform)."""
    out = []
    for l, c in enumerate(np.asarray(counts, np.float64)):
        p = c / max(c.sum(), 1)
        nz = p[p > 0]
        ent = float(-(nz * np.log(nz)).sum() / math.log(len(p)))
        out.append({"layer": l, "norm_entropy": ent, "max_share": float(p.max()), "min_share": float(p.min()),
                    "top3": [int(e) for e in np.argsort(-p, kind="stable")[:3]], "shares": [float(x) for x in p]})
    return out


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "tokenizers", "transformers", "numpy"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = getattr(m, "__version__", "?")
        except ImportError:
            pass
    return out


# ------------------------------------------------------------------------------------ shards / assemble
def _flat(params) -> dict[str, np.ndarray]:
    return {"/".join(map(str, path)): a for path, a in leaf_paths(params)}


def save_shards(run: pathlib.Path, params) -> None:
    """bf16 params as `params-XX.npz` shards of at most SHARD_BYTES (stored as uint16 bit patterns)."""
    shards, cur, size = [], {}, 0
    for name, a in _flat(params).items():
        if cur and size + a.nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = np.ascontiguousarray(a).view(np.uint16)
        size += a.nbytes
    if cur:
        shards.append(cur)
    for i, s in enumerate(shards):
        np.savez(run / f"params-{i:02d}.npz", **s)


def load_shards(run: pathlib.Path, cfg):
    """Inverse of `save_shards`: a host bf16 `Params` tree; every leaf must be present with its shape."""
    import ml_dtypes

    params = empty_params(cfg, "bfloat16")
    want = {"/".join(map(str, p)): a for p, a in leaf_paths(params)}
    seen = set()
    for f in sorted(run.glob("params-*.npz")):
        with np.load(f) as z:
            for name in z.files:
                if name not in want:
                    raise ValueError(f"{f}: unexpected tensor {name}")
                a = z[name].view(ml_dtypes.bfloat16)
                if a.shape != want[name].shape:
                    raise ValueError(f"{f}: {name} has shape {a.shape}, expected {want[name].shape}")
                want[name][...] = a
                seen.add(name)
    missing = set(want) - seen
    if missing:
        raise ValueError(f"{run}: missing tensors {sorted(missing)[:5]} (incomplete run directory)")
    return params


def sample_tokens(tokenizer, text: str, n_tokens: int = EVAL_TOKENS) -> np.ndarray:
    """The first `n_tokens` tokens of `text` (no special tokens)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < n_tokens:
        raise ValueError(f"the sample has only {len(ids)} tokens, fewer than {n_tokens}")
    return np.asarray(ids[:n_tokens], np.int32)


def sample_perplexity(model, text: str, n_tokens: int = EVAL_TOKENS, chunk: int = EVAL_CHUNK) -> float:
    """Perplexity of `model` (resident `moepic_jax.forward`) on the first `n_tokens` tokens of `text`, in
    independent chunks of `chunk` tokens (each chunk predicts its own tokens 1..chunk-1), full-precision
    matmuls. The measure of eval.json and of tests/test_embedded.py."""
    import jax

    ids = sample_tokens(model.tokenizer, text, n_tokens).reshape(-1, chunk)
    with jax.default_matmul_precision("highest"):
        logits = forward(model, ids).astype(np.float64)  # [n, chunk, V]
    logits = logits[:, :-1]
    m = logits.max(-1, keepdims=True)
    lse = (m[..., 0] + np.log(np.exp(logits - m).sum(-1)))
    tgt = np.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    return float(np.exp(np.mean(lse - tgt)))


def assemble(run: str | pathlib.Path, out: str | pathlib.Path, notes: str | pathlib.Path | None = None) -> pathlib.Path:
    """Phase 2: the run directory -> a checkpoint directory (orbax + config + tokenizer + TRAINING.md + eval.json
    + heldout_sample.txt + loss_curve.png + training_log.json). `notes`: a markdown file appended to TRAINING.md."""
    from tokenizers import Tokenizer

    run, out = pathlib.Path(run), pathlib.Path(out)
    log = json.loads((run / "log.json").read_text())
    cfg = from_hf_config(log["config"])
    params = load_shards(run, cfg)
    tok = wrap_tokenizer(Tokenizer.from_file(str(run / "tokenizer.json")))
    if out.exists():
        shutil.rmtree(out)
    checkpoint.save(out, cfg, params, "bfloat16", tokenizer=tok)
    shutil.copyfile(run / "heldout_sample.txt", out / "heldout_sample.txt")
    shutil.copyfile(run / "log.json", out / "training_log.json")
    model = moepic_jax.load(out, dtype="float32")
    text = (out / "heldout_sample.txt").read_text(encoding="utf-8")
    offset = log["data"]["sample_offset_chars"]
    ppl = sample_perplexity(model, text[offset:])
    ev = {"sample": "heldout_sample.txt", "sample_sha256": hashlib.sha256(text.encode()).hexdigest(),
          "offset_chars": offset, "n_tokens": EVAL_TOKENS, "chunk": EVAL_CHUNK, "weights": "bfloat16",
          "compute": "float32 (moepic_jax.load(dtype='float32'), forward, matmul precision highest)", "ppl": ppl,
          "measured_on": f"{platform.machine()} CPU, jax {_versions().get('jax')}"}
    (out / "eval.json").write_text(json.dumps(ev, indent=1))
    _plot(log, out / "loss_curve.png")
    _training_md(log, ev, out, None if notes is None else pathlib.Path(notes).read_text())
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"[assemble] {out}: {size / 2**20:.1f} MiB; sample ppl {ppl:.3f}", flush=True)
    print("[assemble] the wheel ships checkpoints/ file by file: list the new files in pyproject.toml's "
          "[tool.setuptools.data-files] (tests/test_layout.py checks the list)", flush=True)
    return out


def _plot(log: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    tr = log["train"]
    ax.plot([r["step"] for r in tr], [r["ce"] for r in tr], label="train CE", lw=1)
    if log["val"]:
        ax.plot([r["step"] for r in log["val"]], [r["loss"] for r in log["val"]], "o-", ms=3, label="val CE")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("stdlib MoE: training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _training_md(log: dict, ev: dict, out: pathlib.Path, notes: str | None = None) -> None:
    c, a, d = log["config"], log["args"], log["data"]
    last = log["train"][-1]
    schedule = "cosine decay to 10 %"
    if a.get("schedule") == "plateau":
        red = ", ".join(f"{r['scale']:g} at step {r['step']}" for r in log.get("lr_reductions", [])) or "none"
        schedule = (f"a constant lr, scaled by {a['plateau_factor']} after {a['patience']} evaluations without an "
                    f"improvement of {a['min_delta']} (optax.contrib.reduce_on_plateau; scales: {red}), until the val "
                    f"loss stayed flat at scale {a['plateau_min_scale']}")
    pop = "\n".join(f"| {r['layer']} | {r['norm_entropy']:.3f} | {r['max_share']:.3f} | {r['min_share']:.4f} | "
                    f"{', '.join(map(str, r['top3']))} |" for r in log["popularity"])
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    installed = d.get("corpus") == "installed"
    source = ("Python source: the standard library and the packages installed on the training machine" if installed
              else "the Python standard library's source")
    if installed:
        data = (f"Data (`--corpus installed`): `{d['stdlib']}` (Python {d['python']}) and {len(d['roots'])} "
                f"package directories ({', '.join(f'`{r}`' for r in d['roots'])}); {d['files_available']:,} `*.py` "
                f"files after dropping {d['duplicates_dropped']:,} duplicates (same sha256) and "
                f"{d['large_files_skipped']:,} files over {d['max_file_bytes'] / 1e3:g} kB"
                + (f", kept up to {d['max_chars'] / 1e6:g} M characters" if d.get("max_chars") else "")
                + f". Files per group/split: {d['files']}; characters: {d['chars']}. The standard library is split"
                " by sha256 of the relative path (as before: its held-out files are those the stdlib-only model"
                " held out), installed files by sha256 of their content (mod 20: 0 = test, 1 = val).")
    else:
        data = (f"Data: `{d['stdlib']}` (Python {d['python']}), files per split {d.get('files')} (test folders and "
                "site-packages excluded; split by sha256 of the relative path mod 20: 0 = test, 1 = val).")
    tokenizer = d.get("tokenizer", "trained on the train split")
    test = log["test"]
    t_all = test.get("all", test)  # runs before per-group scores kept one flat record
    groups = "\n".join(f"| {g} | {r['tokens']:,} | {r['loss']:.4f} | {r['ppl']:.3f} | {r['bits_per_byte']:.4f} |"
                        + ("" if "baseline" not in log or g not in log["baseline"] else
                           f" {log['baseline'][g]['ppl']:.3f} | {log['baseline'][g]['bits_per_byte']:.4f} |")
                        for g, r in test.items() if isinstance(r, dict))
    base_head = (" before: ppl | before: bits/byte |" if "baseline" in log else "")
    base_note = ("" if "baseline" not in log else
                 f"\n\"Before\" is `{log['baseline']['checkpoint']}` scored on the same test files"
                 + (" with the same tokenizer (perplexities compare per token)." if log['baseline']['same_tokenizer']
                    else " with its own tokenizer (compare bits per byte).") + "\n")
    md = f"""# {out.name}: the embedded default model

A Qwen3-MoE-layout model (`model_type: qwen3_moe`) trained from scratch by `tools/train_embedded.py` on
{source}. Data split, tokenizer, objective and the two phases are described in that module's docstring.

## Model

| | |
|---|---|
| layers | {c['num_hidden_layers']} (all MoE) |
| d_model | {c['hidden_size']} |
| heads / kv heads / head_dim | {c['num_attention_heads']} / {c['num_key_value_heads']} / {c['head_dim']} |
| experts / top-k / d_ff per expert | {c['num_experts']} / {c['num_experts_per_tok']} / {c['moe_intermediate_size']} |
| vocab (byte-level BPE) | {c['vocab_size']} |
| context | {c['max_position_embeddings']} |
| tied embeddings | {c['tie_word_embeddings']} |
| on disk (this directory) | {size / 2**20:.1f} MiB (bfloat16 weights, orbax) |

## How it was made

Training (on `{log['device']}`, {log['date_utc'][:19]} UTC):

```
{log['command']}
```

then, on a CPU machine, the run directory it wrote was turned into this checkpoint:

```
python tools/train_embedded.py --from-run RUN_DIR --out checkpoints/{out.name}{' --notes NOTES.md' if notes else ''}
```
{'(NOTES.md: the Notes section at the end.)' if notes else ''}

Versions of the training run: {', '.join(f'{k} {v}' for k, v in log['versions'].items())}.
{data}
Tokenizer: {tokenizer}. Tokens: train {d['train_tokens']:,}, val {d['val_tokens']:,}, test {t_all['tokens']:,}.

Optimiser: AdamW (b1 0.9, b2 0.95, weight decay {a['weight_decay']} on matrices), peak lr {a['lr']},
{a['warmup']} warm-up steps then {schedule}, global-norm clipping {a['clip']}; load-balancing loss
coefficient {a['aux_coef']}; batch {a['batch']} x {a['seq']} tokens; compute {a['compute_dtype']}, float32
master weights; seed {a['seed']}. Steps run: {log['steps_run']} of {a['steps']} in {log['train_seconds']} s
({log['tokens_seen']:,} tokens, {log['epochs']} epochs){f" - stopped by {log.get('stopped_by', '--minutes')}" if
log['stopped_early'] else ''}{f"; the cosine schedule was fitted to {log['schedule_steps']} steps" if
log.get('schedule_steps', a['steps']) != a['steps'] else ''};
the whole command (data, tokenizer, compilation, training, evaluation) took {log['total_seconds']} s{' (' + ', '.join(f'{k} {v} s' for k, v in log['phases_s'].items()) + ')' if log.get('phases_s') else ''}.
The parameters kept are those of the best validation loss (step {log['best_val_step']}).
Reproduce with the same command; GPU reductions are not bitwise deterministic, so numbers may differ slightly.

## Results

- final training cross-entropy: {last['ce']:.4f} (mean of the last {a['log_every']} steps), load-balancing
  loss {last['aux']:.4f} (1.0 = uniform)
- best validation loss: {log['best_val_loss']:.4f} (ppl {math.exp(log['best_val_loss']):.2f})
- **held-out (test split) perplexity: {t_all['ppl']:.3f}** over {t_all['tokens']:,} tokens in
  windows of {test['seq']}, bfloat16 weights, float32 compute{'' if 'bits_per_byte' not in t_all else
  f" ({t_all['bits_per_byte']:.4f} bits per byte)"}
- **shipped sample perplexity: {ev['ppl']:.4f}** — `heldout_sample.txt` (Python license notice, then test-split
  files), source text from character {ev['offset_chars']}, first {ev['n_tokens']} tokens in {ev['n_tokens'] //
  ev['chunk']} independent chunks of {ev['chunk']}, float32, measured by `train.sample_perplexity` on
  {ev['measured_on']}; the same number is in `eval.json`, and tests/test_embedded.py requires at most 1.05 x it.

| test files | tokens | loss (nats/token) | ppl | bits/byte |{base_head}
|---|---|---|---|---|{'---|---|' if base_head else ''}
{groups}
{base_note}
![loss curve](loss_curve.png)

## Expert popularity (test split, routed top-{c['num_experts_per_tok']} slots)

Normalised entropy = H(shares) / log(E): 1 is uniform, lower is more skewed.

| layer | entropy / uniform | max share | min share | top-3 experts |
|---|---|---|---|---|
{pop}

Uniform share would be {1 / c['num_experts']:.4f}. `training_log.json` holds the whole run log (loss and val
curves, per-expert shares).
"""
    if notes:
        md += "\n## Notes\n\n" + notes.strip() + "\n"
    (out / "TRAINING.md").write_text(md)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python tools/train_embedded.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="checkpoint directory to write (e.g. checkpoints/stdlib_moe)")
    ap.add_argument("--run-dir", help="where the training run writes its files (default OUT/../OUT.run)")
    ap.add_argument("--from-run", help="skip training: assemble OUT from this run directory")
    ap.add_argument("--notes", help="a markdown file appended to TRAINING.md (assemble)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--minutes", type=float, default=0.0, help="stop training after this many minutes (0 = off)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--max-pos", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--val-tokens", type=int, default=200_000, help="val tokens evaluated (in windows of --seq)")
    ap.add_argument("--test-tokens", type=int, help="test tokens evaluated at the end (default: all)")
    ap.add_argument("--sample-chars", type=int, default=SAMPLE_CHARS)
    ap.add_argument("--stdlib", help="Python Lib directory to read (default: this interpreter's)")
    ap.add_argument("--corpus", choices=("stdlib", "installed"), default="stdlib",
                    help="stdlib: the standard library's *.py; installed: that plus every *.py of this interpreter's "
                         "site-/dist-packages, deduplicated by content (see the module docstring)")
    ap.add_argument("--max-corpus-mb", type=float, help="keep the corpus to this many million characters (all splits)")
    ap.add_argument("--max-file-kb", type=float, default=1000, help="skip installed files larger than this (kB)")
    ap.add_argument("--tokenizer", help="reuse this tokenizer.json (or a checkpoint directory's) instead of training "
                                        "one; with --baseline using the same, per-token perplexities compare")
    ap.add_argument("--tokenizer-mb", type=float, default=64,
                    help="train the tokenizer on at most this many million characters of the train split")
    ap.add_argument("--patience", type=int, default=0,
                    help="stop after this many evaluations without a val loss improvement of --min-delta (0 = off)")
    ap.add_argument("--min-delta", type=float, default=0.0, help="nats/token that count as an improvement")
    ap.add_argument("--schedule", choices=("cosine", "plateau"), default="cosine",
                    help="cosine: decay to 10 %% at --steps (or at --minutes); plateau: constant lr, scaled by "
                         "--plateau-factor after --patience evaluations without an improvement of --min-delta "
                         "(optax.contrib.reduce_on_plateau), training stops once the val loss stays flat at "
                         "--plateau-min-scale: it runs until validation stops improving")
    ap.add_argument("--plateau-factor", type=float, default=0.5)
    ap.add_argument("--plateau-min-scale", type=float, default=0.125)
    ap.add_argument("--baseline", help="a checkpoint directory to score on the same test split (before/after)")
    ap.add_argument("--data-limit-bytes", type=int, help="use only this many characters of training text (smoke)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not args.out and not args.run_dir:
        ap.error("give --out (train + assemble), --run-dir (train only) or --from-run with --out")
    if args.from_run and not args.out:
        ap.error("--from-run needs --out")
    if args.schedule == "plateau" and args.patience < 1:
        ap.error("--schedule plateau needs --patience N (evaluations without improvement before the lr is scaled)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.from_run:
        assemble(args.from_run, args.out, args.notes)
        return
    if not args.run_dir:
        o = pathlib.Path(args.out)
        args.run_dir = str(o.parent / (o.name + ".run"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    run = train(args)
    if args.out:
        assemble(run, args.out, args.notes)


if __name__ == "__main__":
    main()
