"""The `moepic-jax` command on the embedded model: the README's main command path, plan, and errors."""

import pytest

from moepic_jax import cli


def test_generate_streams_and_summarises(capsys):
    rc = cli.main(["generate", "def fibonacci(n):", "--policy", "moepic", "--vram-budget", "80%",
                   "--max-new-tokens", "6", "--prefetch", "on", "--adapt-to-prompt"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.startswith("def fibonacci(n):") and len(out.strip()) > len("def fibonacci(n):")
    assert "policy=moepic" in err and "TPOT=" in err and "H2D=" in err
    assert "recall=" in err and "recall=nan" not in err  # --prefetch on: the predictor ran and was scored


def test_plan_prints_every_layer(capsys):
    assert cli.main(["plan", "--vram-budget", "80%", "--policy", "moepic", "--prefetch", "off"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 6  # one row per decoder layer of the embedded model
    assert "predicted TPOT" in out and "next-layer prefetch off" in out


@pytest.mark.parametrize("direct", ["on", "off"])
def test_plan_prices_the_copy_step_it_runs(direct, capsys, caplog):
    """`plan --direct on|off` solves with the hardware profile of that copy step (the factory warns when they
    differ), for the engine that runs that step."""
    import jax

    from moepic_jax.offload import transfer

    if direct == "on" and not transfer.available(jax.devices()[0]):
        pytest.skip("direct copies need a C++ compiler")
    with caplog.at_level("WARNING", logger="moepic_jax"):
        assert cli.main(["plan", "--vram-budget", "80%", "--policy", "moepic", "--direct", direct]) == 0
    assert "prices the wrong copies" not in caplog.text
    step = "direct copies" if direct == "on" else "the conditional copy step"
    out = capsys.readouterr().out
    assert f"(decoding with {step}, on unmeasured H200 defaults; `moepic-jax profile --out P`" in out


def test_budget_below_minimum_is_a_clean_error(capsys):
    assert cli.main(["generate", "x", "--vram-budget", "1MB", "--max-new-tokens", "2"]) == 2
    assert "below the minimum" in capsys.readouterr().err


def test_more_devices_than_present_is_a_clean_error(capsys):
    # This process has one CPU device: --devices 2 reaches the engine and is refused with what to pass instead.
    assert cli.main(["generate", "x", "--devices", "2", "--max-new-tokens", "2"]) == 2
    assert "this process sees 1 device(s)" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_replays_a_routing_trace(dtype, capsys, tmp_path):
    """`bench --routing`: every decode token routes to experts 0 and 1 in every layer, so once lru has admitted them
    (the warm-up call on the same engine) the timed call hits every time, and ondemand misses every time; in both
    dtypes the warm-up re-plan leaves lru a cache."""
    import numpy as np

    import moepic_jax

    cfg = moepic_jax.load(None).cfg
    T, L, K = 8, cfg.n_layers, cfg.top_k
    ids = np.tile(np.arange(K, dtype=np.int32), (T, L, 1))
    pred = ids.copy()
    pred[:, 0] = -1
    np.savez(tmp_path / "trace.npz", ids=ids, weights=np.full((T, L, K), 1 / K, np.float32), predicted=pred)
    assert cli.main(["bench", "--routing", str(tmp_path / "trace.npz"), "--policies", "ondemand,lru", "--budgets",
                     "0.25", "--max-new-tokens", "4", "--dtype", dtype]) == 0
    rows = {line.split("|")[2].strip(): line.split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 25%")}
    assert float(rows["lru"][6]) == 1.0 and float(rows["lru"][8]) == 0.0  # full hit, miss
    assert float(rows["ondemand"][6]) == 0.0 and float(rows["ondemand"][8]) == 1.0


def test_corrupt_shard_and_config_name_the_file_and_the_fix(capsys, tmp_path, hf_dirs):
    import shutil

    for broken in ("shard", "config"):
        d = tmp_path / broken
        shutil.copytree(hf_dirs["mixtral"], d)
        target = next(d.glob("*.safetensors")) if broken == "shard" else d / "config.json"
        target.write_bytes(target.read_bytes()[:100])  # truncated
        assert cli.main(["generate", "1 2 3", "--model", str(d), "--max-new-tokens", "2"]) == 2
        err = capsys.readouterr().err
        assert target.name in err and ("download it again" if broken == "shard" else "re-download") in err


def test_default_command_offloads_and_caches(capsys):
    """The README's main command with no flags: 'auto' on the CPU offloads (minimum + 25 % of the expert bytes)
    and the cache holds experts that decoding hits; a budget error comes on its own line, before any text (the
    prompt is echoed with the first new text)."""
    assert cli.main(["generate", "import os", "--max-new-tokens", "8"]) == 0
    err = capsys.readouterr().err
    hit = float(err.split("hit=")[1].split("%")[0])
    assert "policy=moepic" in err and hit > 0 and "nan" not in err
    assert cli.main(["generate", "import os", "--vram-budget", "1MB", "--max-new-tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "...]\nerror: VRAM budget 1.000MB" in err
    assert "pass at least" in err and "MB" in err.split("pass at least")[1].split(",")[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("policy", ["lru", "static", "moepic"])
def test_every_policy_caches_at_a_share_budget(dtype, policy):
    """A share of the experts on top of the minimum is what the cache gets, whatever the compiled steps' temporaries
    turn out to be (the budget follows the minimum): every caching policy holds experts and hits them."""
    import moepic_jax

    m = moepic_jax.load(None, dtype=dtype)
    res = moepic_jax.generate("import os", model=m, max_new_tokens=8, policy=policy, vram_budget="25%")
    eng = next(iter(moepic_jax.ENGINES.engines.values()))
    assert eng.cache_bytes() > 0.2 * m.expert_bytes()  # 25 %, less the rounding to whole slots
    assert res.stats.full_hit_rate + res.stats.top_only_hit_rate > 0


def test_a_too_long_request_fails_before_the_weights_load(capsys, monkeypatch):
    """The prompt length is checked against the context from config.json and the tokenizer alone."""
    import moepic_jax.io.loading as loading

    def no_load(*a, **k):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(loading, "load", no_load)
    monkeypatch.setattr("moepic_jax.load", no_load)
    assert cli.main(["generate", "x = 1 " * 50, "--max-new-tokens", "1020"]) == 2
    err = capsys.readouterr().err
    assert "exceeds the model's context of 1024 tokens" in err and "error:" in err
