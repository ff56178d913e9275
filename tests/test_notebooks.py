"""The notebooks in notebooks/: stored without outputs, and each executes top to bottom on the CPU in its small
mode (DSV4_NOTEBOOK_SMALL=1); a cell that raises fails the test with the cell's traceback."""

from __future__ import annotations

import os
import pathlib

import nbclient  # the dev extra installs these four: a missing one is an error, not a skip
import nbformat
import pytest

import ipykernel  # noqa: F401  (the kernel the notebooks run in)
import matplotlib  # noqa: F401

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = {"quickstart.ipynb", "official_checkpoint.ipynb", "long_context.ipynb"}
TIMEOUT_S = 600  # per cell


def test_the_three_notebooks_exist():
  assert EXPECTED <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  dirty = [i for i, c in enumerate(nb.cells)
           if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
  assert not dirty, f"{path.name}: cells {dirty} store outputs or execution counts; strip them before committing"


def execute(path: pathlib.Path, workdir: pathlib.Path, env: dict[str, str]):
  """Runs the notebook in `workdir` with `env` added to the kernel's environment; returns the executed notebook."""
  nb = nbformat.read(path, as_version=4)
  saved = dict(os.environ)
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()
  finally:
    os.environ.clear()
    os.environ.update(saved)
  return nb


def test_a_failing_cell_fails_the_run(tmp_path):
  """The guard behind "a notebook that errors fails CI": execute() raises on the first error, later cells never
  run."""
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                       nbformat.v4.new_code_cell("raise ValueError('poisoned cell')"),
                                       nbformat.v4.new_code_cell("print('not reached')")])
  path = tmp_path / "poisoned.ipynb"
  nbformat.write(nb, path)
  with pytest.raises(nbclient.exceptions.CellExecutionError, match="poisoned cell"):
    execute(path, tmp_path, {})


def images(nb) -> int:
  return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "image/png" in o.get("data", {}))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_on_the_cpu(path, tmp_path):
  nb = execute(path, tmp_path, {"DSV4_NOTEBOOK_SMALL": "1", "JAX_PLATFORMS": "cpu"})
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors  # nbclient raises CellExecutionError first; this guards allow_errors
  assert images(nb) >= 1, f"{path.name} drew no figure"
  if os.environ.get("DSV4_NOTEBOOK_EXPORT"):  # spot-check: write the executed notebook and its PNGs
    out = pathlib.Path(os.environ["DSV4_NOTEBOOK_EXPORT"])
    out.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out / path.name)
    import base64
    k = 0
    for c in nb.cells:
      for o in c.get("outputs", []):
        if "image/png" in o.get("data", {}):
          (out / f"{path.stem}_{k}.png").write_bytes(base64.b64decode(o["data"]["image/png"]))
          k += 1
