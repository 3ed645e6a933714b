"""benchmarks/explore.ipynb runs from top to bottom, so the committed notebook cannot rot.

The notebook checks itself: it asserts that every policy gives the resident model's greedy tokens under a VRAM
budget below the model's size, and that the offloading policies really copied experts. The kernel is this test's
own interpreter (a kernel spec written to a temporary JUPYTER_PATH), never a `python3` kernel registered elsewhere
on the machine; it inherits the environment, so under pytest JAX runs on the CPU (tests/conftest.py).
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "benchmarks" / "explore.ipynb"
KERNEL = "moepic-jax-test"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return KERNEL


def test_explore_notebook_runs(kernel_name):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 5
    src = "\n".join(c.source for c in code)
    assert "assert r.token_ids == ref" in src, "the notebook's own check of the policies is gone"
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=300,
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError (with the cell's traceback) if any cell fails
    for c in code:
        assert c.execution_count is not None
        errors = [o for o in c.outputs if o.output_type == "error"]
        assert not errors, errors
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert "policies gave the same" in text
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), "no plot was produced"
