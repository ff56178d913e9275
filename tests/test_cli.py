"""Tests for dsv4_jax.cli: `dsv4 info` in-process and as `python -m dsv4_jax.cli`."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from dsv4_jax import cli
from dsv4_jax.config import ModelConfig

ROOT = pathlib.Path(__file__).parent.parent
DATA = pathlib.Path(__file__).parent / "data"


def run_json(capsys, *argv) -> dict:
  assert cli.main(["info", *argv, "--json"]) == 0
  return json.loads(capsys.readouterr().out)


def check_flash(r: dict) -> None:
  assert r["context"] == 1048576
  assert round(r["total_params"] / 1e9, 1) == 284.3
  assert round(r["active_params"] / 1e9, 2) == 13.27
  assert round(r["mtp_params"] / 1e9, 1) == 6.6
  assert round(100 * r["kv_ratio_vs_v32"], 1) == 7.3
  assert r["kv_bytes_total"] == pytest.approx(r["kv_bytes_per_token"] * r["context"])
  assert r["schedule"] == "0-1 swa, 2-41 (csa hca)x20, 42 csa" and r["mtp_schedule"] == "43 swa"
  assert r["layer_counts"] == {"swa": 2, "csa": 21, "hca": 20}


def test_info_json_flash_in_process(capsys):
  check_flash(run_json(capsys, "--config", "flash", "--context", "1048576"))


def test_info_json_via_python_m():
  out = subprocess.run([sys.executable, "-m", "dsv4_jax.cli", "info", "--config", "flash", "--context", "1048576",
                        "--json"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
  check_flash(json.loads(out))


def test_info_json_pro_from_hf_file_and_py_config(capsys):
  a = run_json(capsys, "--config", str(DATA / "pro_config.json"))
  b = run_json(capsys, "--config", str(ROOT / "configs" / "model_pro.py"), "--context", "1048576")
  for r in (a, b):
    assert r["context"] == 1048576  # default: max_position_embeddings
    assert round(r["total_params"] / 1e9, 1) == 1573.0
    assert round(r["active_params"] / 1e9, 2) == 48.85
    assert round(r["mtp_params"] / 1e9, 1) == 25.8
    assert round(100 * r["kv_ratio_vs_v32"], 1) == 10.5
  assert {k: v for k, v in a.items() if k != "config"} == {k: v for k, v in b.items() if k != "config"}


def test_info_checkpoint_dir(capsys, tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(ModelConfig.preset("tiny").to_hf()))
  r = run_json(capsys, "--config", str(tmp_path))
  assert r["config_fields"] == ModelConfig.preset("tiny").to_dict()


@pytest.mark.parametrize("name", ["flash", "pro", "flash_base", "pro_base", "tiny"])
def test_config_files_match_presets(name):
  assert cli.load_config(str(ROOT / "configs" / f"model_{name}.py")) == ModelConfig.preset(name.replace("_", "-"))


def test_info_human_output(capsys):
  assert cli.main(["info", "--config", "pro", "--context", "1048576"]) == 0
  out = capsys.readouterr().out
  for s in ("1573.0B", "48.85B", "25.84B", "10.5%", "0-1 hca, 2-59 (csa hca)x29, 60 csa", "mtp 61 swa", "4.92 GiB"):
    assert s in out


def test_info_bf16_kv(capsys):
  r = run_json(capsys, "--config", "pro", "--kv-format", "bf16")
  assert r["kv_entry_bytes"] == 1024 and 9 * 2**30 < r["kv_bytes_total"] < 10 * 2**30


def test_bad_config_exits_with_message(capsys):
  with pytest.raises(SystemExit, match="not a preset .*flash, pro"):
    cli.main(["info", "--config", "nonsense"])
  with pytest.raises(SystemExit, match="no config file"):
    cli.main(["info", "--config", "missing.json"])


def test_schedule_and_human():
  assert cli.schedule((0, 4, 128, 4, 0)) == "0 swa, 1 csa, 2 hca, 3 csa, 4 swa"
  assert cli.schedule((128, 128, 4, 128, 4, 128, 4), 0) == "0-1 hca, 2-5 (csa hca)x2, 6 csa"
  assert cli.schedule((0,), 43) == "43 swa"
  assert cli.human(284_332_240_471) == "284.3B" and cli.human(13_270_101_591) == "13.27B"
  assert cli.human(1_572_997_201_763) == "1573.0B" and cli.human(680_389) == "680.4K"


# ----- dsv4 generate / dsv4 serve -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, model_factory):
  """A tiny random model with a trained BPE (vocabulary = the model's), as `dsv4 train` leaves in WORKDIR/hf."""
  from dsv4_jax import save_pretrained
  from dsv4_jax.tokenizer import train_bpe
  tok = train_bpe(["hello world, the quick brown fox. ", "def f(x): return x ", "café 你好 "] * 8, vocab_size=400)
  cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size)
  path = tmp_path_factory.mktemp("cli") / "hf"
  save_pretrained(model_factory(cfg), cfg, path, progress=False)
  tok.save(path)
  return path


def test_generate_modes_and_streaming(tiny_ckpt, capsys):
  base = ["generate", "--checkpoint", str(tiny_ckpt), "--max-new-tokens", "6", "--dtype", "float32"]
  outs = {}
  for mode in ("raw", "chat", "thinking"):
    for stream in ([], ["--stream"]):
      argv = base + ["--prompt", "hello world", "--mode", mode, "--temperature", "0.8", "--seed", "3"] + stream
      assert cli.main(argv) == 0
      outs[mode, bool(stream)] = capsys.readouterr().out
    assert outs[mode, True] == outs[mode, False]  # streamed text == the whole text
  assert outs["raw", False].startswith("hello world") and len(outs["raw", False]) > len("hello world\n")
  assert outs["thinking", False].startswith("<think>") and not outs["chat", False].startswith("<think>")
  assert outs["raw", False] != outs["chat", False]
  with pytest.raises(SystemExit, match="max_position_embeddings"):
    cli.main(base[:3] + ["--prompt", "x", "--max-new-tokens", "100000"])
  with pytest.raises(SystemExit, match="top_p"):
    cli.main(base + ["--prompt", "x", "--top-p", "0"])
  with pytest.raises(SystemExit, match="not a directory"):
    cli.main(["generate", "--checkpoint", str(tiny_ckpt / "nope"), "--prompt", "x"])


def test_serve_subprocess_end_to_end(tiny_ckpt):
  import signal
  import urllib.request
  proc = subprocess.Popen([sys.executable, "-m", "dsv4_jax.cli", "serve", "--checkpoint", str(tiny_ckpt), "--port",
                           "0", "--slots", "2", "--max-len", "64", "--dtype", "float32", "--model-name", "tiny"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    line = proc.stdout.readline()
    assert "on http://127.0.0.1:" in line, line + proc.stderr.read()[-3000:]
    url = line.split(" on ")[1].split()[0]
    assert json.loads(urllib.request.urlopen(url + "/health", timeout=60).read())["status"] == "ok"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "seed": 1}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    r = json.loads(urllib.request.urlopen(req, timeout=120).read())
    assert r["object"] == "chat.completion" and r["usage"]["completion_tokens"] <= 3
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert "stopped" in proc.stdout.read()
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.stdout.close()
    proc.stderr.close()


def test_train_flags_accept_model_overrides(tmp_path):
  """--config.model_overrides.FIELD=VALUE sets any ModelConfig field (as a Python literal); unknown fields exit."""
  from dsv4_jax.cli import parse_train_flags
  cfg, workdir = parse_train_flags(["--config", "configs/train_tiny.py", "--workdir", str(tmp_path),
                                    "--config.model_overrides.hidden_size=96", "--config.steps=3",
                                    "--config.model_overrides.dtype", "bfloat16",
                                    "--config.model_overrides.compress_ratios=(0, 4, 128, 4, 0)"])
  assert workdir == str(tmp_path) and cfg.steps == 3
  assert dict(cfg.model_overrides) == {"hidden_size": 96, "dtype": "bfloat16", "compress_ratios": (0, 4, 128, 4, 0)}
  with pytest.raises(SystemExit, match="ModelConfig has no field 'hiden_size'"):
    parse_train_flags(["--config", "configs/train_tiny.py", "--workdir", str(tmp_path),
                       "--config.model_overrides.hiden_size=96"])
