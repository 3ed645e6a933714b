"""The policy benchmark end to end on a tiny config (CPU): a direct-copy row and a conditional-step row, each planned
with the hardware profile measured for its own copy step, and the target efficiency max(floor, resident TPOT) / TPOT."""
import json

import pytest

from benchmarks import bench_policies
from moepic_jax.offload import transfer


def test_bench_rows_price_their_own_copy_step(tmp_path):
    import jax

    if not transfer.available(jax.devices()[0]):
        pytest.skip("direct copies need a C++ compiler")
    rc = bench_policies.main(["--tiny", "--model", "qwen15", "--routing", "calibrated", "--policies", "lru,resident",
                              "--budgets", "0.25", "--pairs", "lru:0.25:direct,lru:0.25:cond", "--hw", "measured",
                              "--new-tokens", "4", "--out-dir", str(tmp_path), "--name", "smoke"])
    assert rc == 0
    d = json.loads((tmp_path / "smoke.json").read_text())
    steps = d["meta"]["hardware_profile"]["by_step"]
    assert json.loads(steps["direct"])["direct"] is True and json.loads(steps["conditional"])["direct"] is False
    rows = {(r["policy"], r.get("direct")): r for r in d["rows"]}
    assert rows[("lru", True)]["direct_mode"] == "cpu" and "direct_mode" not in rows[("lru", False)]
    resident = rows[("resident", None)]["tpot_ms"]
    for key in (("lru", True), ("lru", False)):
        r = rows[key]
        assert r["efficiency_target"] == pytest.approx(max(r["floor_ms"], resident) / r["tpot_ms"])
