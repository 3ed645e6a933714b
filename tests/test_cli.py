"""The `moepic-jax` command on the embedded model: the README's main command path, plan, and errors."""

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


def test_budget_below_minimum_is_a_clean_error(capsys):
    assert cli.main(["generate", "x", "--vram-budget", "1MB", "--max-new-tokens", "2"]) == 2
    assert "below the minimum" in capsys.readouterr().err


def test_more_devices_than_present_is_a_clean_error(capsys):
    # This process has one CPU device: --devices 2 reaches the engine and is refused with what to pass instead.
    assert cli.main(["generate", "x", "--devices", "2", "--max-new-tokens", "2"]) == 2
    assert "this process sees 1 device(s)" in capsys.readouterr().err
