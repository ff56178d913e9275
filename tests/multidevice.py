"""Checks that need several (CPU) devices run in a child process: its XLA_FLAGS set before jax starts (the parent's
jax already runs on one device), one JSON report on the last line of its stdout, the pytest tests read it."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time


def run_report(script: str | pathlib.Path, timeout: int = 600) -> dict:
  """Runs `python script` with XLA_FLAGS cleared (the script sets its own device count); its last stdout line."""
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, check=False,
                        env={**os.environ, "XLA_FLAGS": ""})
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_checks(checks) -> None:
  """The child's main: each check(report) fills the report (timed), printed as one JSON line; float32 matmuls
  at full precision so comparisons across meshes see reduction order only."""
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  report = {"devices": len(jax.devices()), "seconds": {}}
  for check in checks:
    start = time.perf_counter()
    check(report)
    report["seconds"][check.__name__] = round(time.perf_counter() - start, 1)
  print(json.dumps(report))
