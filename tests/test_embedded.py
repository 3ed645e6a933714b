"""The embedded default model (checkpoints/stdlib_moe, made by tools/train_embedded.py): it loads with no path, its
held-out perplexity has not regressed, every policy reproduces the resident greedy tokens under a VRAM budget
below the model's size, its Hugging Face export agrees with transformers, a damaged checkpoint is a clear
ValueError, and the training script runs on CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import shutil

import numpy as np
import pytest

import moepic_jax
from moepic_jax.io import checkpoint
from moepic_jax.runtime.factory import make_engine
from tools import train_embedded as train

PROMPT = "def fibonacci(n):"
NEW = 16
KW = {"granule": 32, "max_batch": 1, "max_seq_len": 64}


@pytest.fixture(scope="module")
def ckpt_dir() -> pathlib.Path:
    return checkpoint.default_checkpoint_dir()


@pytest.fixture(scope="module")
def model32():
    """float32 copy for the resident reference, the perplexity and the export (never given to an OffloadEngine)."""
    return moepic_jax.load(dtype="float32")


def test_default_checkpoint_loads(ckpt_dir):
    m = moepic_jax.load()  # no path: the embedded model
    assert pathlib.Path(m.path) == ckpt_dir
    cfg = m.cfg
    assert cfg.family == "qwen3_moe"
    assert cfg.n_experts >= 16 and cfg.n_layers >= 6 and cfg.d_ff >= 256 and cfg.top_k in (2, 4)
    assert cfg.d_ff % 32 == 0 and cfg.d_ff // 32 >= 8  # several split points at a granule of 32
    assert m.tokenizer is not None and m.tokenizer.eos_token == train.EOT
    assert m.dtype == "bfloat16"
    size = sum(f.stat().st_size for f in ckpt_dir.rglob("*") if f.is_file())
    assert size <= 64 * 2**20, f"checkpoint is {size / 2**20:.1f} MiB"
    for name in ("config.json", "tokenizer.json", "TRAINING.md", "loss_curve.png", "eval.json", "heldout_sample.txt"):
        assert (ckpt_dir / name).is_file(), name


def test_heldout_perplexity(ckpt_dir, model32):
    ev = json.loads((ckpt_dir / "eval.json").read_text())
    text = (ckpt_dir / ev["sample"]).read_text(encoding="utf-8")
    assert hashlib.sha256(text.encode()).hexdigest() == ev["sample_sha256"], "the shipped sample was modified"
    assert "Python Software Foundation" in text[: ev["offset_chars"]]  # the license notice comes first
    assert 100_000 <= len(text.encode()) <= 1_000_000
    assert f"{ev['ppl']:.4f}" in (ckpt_dir / "TRAINING.md").read_text()
    ppl = train.sample_perplexity(model32, text[ev["offset_chars"]:], ev["n_tokens"], ev["chunk"])
    assert math.isfinite(ppl)
    assert ppl <= ev["ppl"] * 1.05, f"held-out perplexity {ppl:.3f} > 1.05 x recorded {ev['ppl']:.3f}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_policy_matches_resident(model32, dtype):
    """bfloat16 too: with XLA's excess precision off (conftest.py, cli.py) tokens are identical, not just close."""
    model = model32 if dtype == "float32" else moepic_jax.load(dtype=dtype)
    ref = moepic_jax.generate(PROMPT, model=model, max_new_tokens=NEW, policy="resident")
    assert len(ref.token_ids[0]) == NEW
    m = moepic_jax.load(dtype=dtype)  # an offload engine pins this copy's experts
    total = m.weight_bytes()  # before an engine pins the experts
    budget = make_engine(m, policy="ondemand", **KW).fixed_bytes + int(0.3 * m.expert_bytes())
    assert budget < total, "the budget must be below the model's size"
    for policy in ("ondemand", "lru", "static", "moepic"):
        res = moepic_jax.generate(PROMPT, model=m, max_new_tokens=NEW, policy=policy, vram_budget=budget, **KW)
        assert res.token_ids == ref.token_ids, policy
        assert res.text == ref.text, policy
        assert res.stats.h2d_bytes_per_token > 0, policy  # experts really were offloaded


def test_export_hf_matches_transformers(model32, tmp_path):
    import torch
    import transformers

    out = checkpoint.export_hf(model32, tmp_path / "hf")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True,
                                                                 dtype=torch.float32)
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = np.asarray([tok.encode("import os\n\n\ndef fibonacci(n):\n    if n < 2:\n        return n\n")], np.int64)
    assert ids[0, 0] == tok.bos_token_id and ids.shape[1] > 16
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.float().numpy()
    ours = moepic_jax.forward(model32, ids)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel <= 1e-4, rel
    back = moepic_jax.load(out, dtype="float32")  # our loader reads the export too
    np.testing.assert_allclose(moepic_jax.forward(back, ids), ours, atol=1e-6, rtol=0)


@pytest.mark.parametrize("damage", ["delete", "truncate", "zero_bytes", "delete_metadata"])
def test_damaged_checkpoint_is_a_clear_error(ckpt_dir, tmp_path, damage):
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, dst)
    data = max((f for f in (dst / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    if damage == "delete":
        data.unlink()
    elif damage == "truncate":
        b = data.read_bytes()
        data.write_bytes(b[: len(b) // 2])
    elif damage == "zero_bytes":  # same size, altered content: orbax alone would load wrong weights
        b = bytearray(data.read_bytes())
        b[len(b) // 2: len(b) // 2 + 4096] = bytes(4096)
        data.write_bytes(bytes(b))
    else:
        (dst / "params" / "_METADATA").unlink()
    with pytest.raises(ValueError, match="truncated or corrupted"):
        moepic_jax.load(dst)


def test_train_smoke_cpu(tmp_path):
    """Two phases of train.py on a tiny config and a little data: 3 steps, then the checkpoint directory."""
    out = tmp_path / "tiny"
    train.main(["--out", str(out), "--tiny", "--steps", "3", "--batch", "2", "--seq", "32", "--vocab", "400",
                "--data-limit-bytes", "100000", "--sample-chars", "20000", "--val-tokens", "256",
                "--test-tokens", "2048", "--log-every", "1", "--eval-every", "3", "--warmup", "1",
                "--compute-dtype", "float32"])
    log = json.loads((tmp_path / "tiny.run" / "log.json").read_text())
    assert [r["step"] for r in log["train"]] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in log["train"])
    assert len(log["popularity"]) == 2 and all(0 < r["norm_entropy"] <= 1 for r in log["popularity"])
    ev = json.loads((out / "eval.json").read_text())
    assert math.isfinite(ev["ppl"]) and ev["ppl"] > 1
    for name in ("TRAINING.md", "loss_curve.png", "heldout_sample.txt", "tokenizer.json", "config.json"):
        assert (out / name).is_file(), name
    m = moepic_jax.load(out)
    assert m.cfg.vocab_size == 400 and m.cfg.n_experts == 4 and m.tokenizer is not None


def test_train_plateau_schedule_stops_when_validation_stops_improving(tmp_path):
    """--schedule plateau: with an improvement threshold no evaluation after the first can meet, the lr scale halves
    at each flat evaluation (patience 1) down to 1/8, and training stops at the next flat one: step 5 of 50."""
    run = tmp_path / "run"
    train.main(["--run-dir", str(run), "--tiny", "--steps", "50", "--batch", "2", "--seq", "32", "--vocab", "400",
                "--data-limit-bytes", "100000", "--sample-chars", "20000", "--val-tokens", "256",
                "--test-tokens", "512", "--log-every", "1", "--eval-every", "1", "--warmup", "1", "--lr", "1e-3",
                "--compute-dtype", "float32", "--schedule", "plateau", "--patience", "1", "--min-delta", "10"])
    log = json.loads((run / "log.json").read_text())
    assert log["stopped_by"] == "plateau" and log["steps_run"] == 5
    assert [(r["step"], r["scale"]) for r in log["lr_reductions"]] == [(2, 0.5), (3, 0.25), (4, 0.125)]
    # the lr of step s (1-based) is 1e-3 times the scale after the evaluation of step s - 1
    assert [round(r["lr"] / 1e-3, 6) for r in log["train"]] == [0.0, 1.0, 0.5, 0.25, 0.125]
    with pytest.raises(SystemExit):
        train.parse_args(["--run-dir", str(run), "--schedule", "plateau"])  # no --patience: refused


def test_split_is_by_path_hash():
    """The split depends only on the relative path: the same files are held out on every Python version."""
    assert train.split_of("ast.py") == "test"
    files = train.stdlib_files()
    rels = [r for r, _ in files]
    assert rels == sorted(rels) and not any("/test/" in f"/{r}" or "site-packages" in r for r in rels)
    shares = {s: sum(train.split_of(r) == s for r in rels) / len(rels) for s in ("train", "val", "test")}
    assert shares["test"] + shares["val"] >= 0.05 and shares["test"] >= 0.03 and shares["train"] >= 0.85


def test_installed_corpus_dedups_and_splits_by_content(tmp_path, monkeypatch):
    """`--corpus installed`: the stdlib first (split by path), then installed files deduplicated by content, sorted
    and split by their content's hash; large files and __pycache__ left out; the character cap keeps a prefix."""
    std, site = tmp_path / "lib", tmp_path / "site-packages"
    (std / "json").mkdir(parents=True)
    (std / "test").mkdir()
    (std / "json" / "__init__.py").write_text("import os\n")
    (std / "test" / "test_x.py").write_text("assert True\n")  # a stdlib test folder: excluded
    for i in range(40):
        (site / f"pkg{i}").mkdir(parents=True)
        (site / f"pkg{i}" / "mod.py").write_text(f"x = {i}\n")
    (site / "pkg0" / "copy.py").write_text("x = 0\n")  # same content as pkg0/mod.py: dropped
    (site / "pkg1" / "copy_of_stdlib.py").write_text("import os\n")  # same as a stdlib file: dropped
    (site / "pkg2" / "__pycache__").mkdir()
    (site / "pkg2" / "__pycache__" / "c.py").write_text("y = 1\n")
    (site / "pkg3" / "big.py").write_text("z = 1\n" * 400)  # 2.4 kB > max_file_bytes
    monkeypatch.setattr(train, "installed_roots", lambda: [site])
    docs, stats = train.gather_corpus("installed", std, max_file_bytes=1000)
    assert [d.rel for d in docs[:1]] == ["json/__init__.py"] and docs[0].group == "stdlib"
    inst = docs[1:]
    assert len(inst) == 40 and stats["duplicates_dropped"] == 2 and stats["large_files_skipped"] == 1
    assert [d.sha for d in inst] == sorted(d.sha for d in inst)
    assert all(d.split == train.split_of_content(d.sha) for d in inst)
    assert {d.text for d in inst} == {f"x = {i}\n" for i in range(40)}
    capped, _ = train.gather_corpus("installed", std, max_file_bytes=1000, max_chars=len("import os\n") + 12)
    assert [d.text for d in capped] == [docs[0].text] + [d.text for d in inst[:2]]
    assert [d.rel for d in train.gather_corpus("stdlib", std)[0]] == ["json/__init__.py"]


def test_train_smoke_installed_corpus_with_baseline(tmp_path):
    """The larger-corpus path on CPU: installed files, the embedded model's tokenizer reused, early stopping, and
    the embedded model scored on the same test files (same tokenizer, so per-token numbers compare)."""
    run = tmp_path / "run"
    train.main(["--run-dir", str(run), "--tiny", "--corpus", "installed", "--max-corpus-mb", "2",
                "--tokenizer", str(checkpoint.default_checkpoint_dir()), "--baseline",
                str(checkpoint.default_checkpoint_dir()), "--steps", "6", "--batch", "2", "--seq", "32",
                "--sample-chars", "20000", "--val-tokens", "256", "--test-tokens", "512", "--log-every", "1",
                "--eval-every", "1", "--patience", "1", "--min-delta", "100", "--warmup", "1",
                "--compute-dtype", "float32"])
    log = json.loads((run / "log.json").read_text())
    assert log["stopped_by"] == "patience" and log["steps_run"] == 2  # no improvement of 100 nats after step 1
    assert log["data"]["corpus"] == "installed" and log["config"]["vocab_size"] == 8192
    for scores in (log["test"], log["baseline"]):
        assert scores["all"]["tokens"] == sum(scores[g]["tokens"] for g in ("stdlib", "installed") if g in scores)
        assert all(math.isfinite(scores[g]["bits_per_byte"]) and scores[g]["bits_per_byte"] > 0
                   for g in scores if isinstance(scores[g], dict))
    assert log["baseline"]["same_tokenizer"]
    assert log["baseline"]["all"]["ppl"] < log["test"]["all"]["ppl"]  # the trained model beats 2 tiny steps
    assert set(log["phases_s"]) >= {"corpus", "tokenizer", "encode", "training", "test", "baseline"}
