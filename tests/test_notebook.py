"""The digits notebook runs cleanly, top to bottom, in a kernel of this interpreter."""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import NATIVE_KERNEL_NAME
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "digits.ipynb"


def outputs(cell, mime: str) -> list[str]:
    return [o["data"][mime] for o in cell.get("outputs", []) if mime in o.get("data", {})]


def test_digits_notebook_trains_with_a_live_plot_and_shows_the_result():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Which python ran it: the native kernel is this interpreter (jupyter_client launches
    # "python" as sys.executable); checked rather than assumed.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    NotebookClient(nb, timeout=180, kernel_name=NATIVE_KERNEL_NAME,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    errors = [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable
    html = [h for c in nb.cells for h in outputs(c, "text/html")]
    assert any("/individual-daskbelief" in h for h in html), html   # the dashboard link
    assert any("daskbelief TrainResult" in h and "<svg" in h for h in html)
    live = next(c for c in nb.cells if "LivePlot(client" in c.source)
    assert outputs(live, "image/png"), live.outputs   # the live plot, drawn from real events
