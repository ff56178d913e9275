"""Training input pipeline: readers, held-out split, packing, sharding, checkpointable iterator, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsv4_jax.tokenizer import train_bpe
from dsv4_jax.train import data

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _text(i: int) -> str:
  """Document i: lengths from a few tokens to several rows of 32."""
  n = 1 + (i * 7) % 23 + (40 if i % 5 == 0 else 0)
  return " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n)) + f" #{i}\nünïcødé ✓ {i * 31}"


TEXTS = [_text(i) for i in range(24)]


@pytest.fixture(scope="module")
def tok():
  return train_bpe(TEXTS, vocab_size=320)


@pytest.fixture
def corpus(tmp_path):
  """TEXTS as .txt files; returns the glob."""
  for i, t in enumerate(TEXTS):
    (tmp_path / f"doc{i:02d}.txt").write_text(t, encoding="utf-8")
  return str(tmp_path / "*.txt")


def _cfg(source, **overrides):
  cfg = data.default_config()
  cfg.source = source
  cfg.seq_len, cfg.global_batch, cfg.eval_fraction, cfg.vocab_size = 32, 4, 0.0, 320
  cfg.update(overrides)
  return cfg


def _expected(tok, docs):
  return [[tok.bos_id, *tok.encode(d.text), tok.eos_id] for d in docs]


def _rows(it, num_tokens):
  """Rows from IT until they hold NUM_TOKENS tokens; returns (tokens, segment_ids, positions) [rows, seq]."""
  got = []
  while sum(b["tokens"].size for b in got) < num_tokens:
    got.append(next(it))
  return tuple(np.concatenate([b[k] for b in got]) for k in ("tokens", "segment_ids", "positions"))


def _pieces(stream, bos):
  """Splits a flat token stream into documents at each BOS."""
  starts = [i for i, t in enumerate(stream) if t == bos] + [len(stream)]
  assert starts[0] == 0
  return [list(stream[a:b]) for a, b in zip(starts, starts[1:])]


def _check_layout(tokens, seg, pos, bos):
  """segment_ids / positions follow from the tokens: a piece starts at column 0 or at a BOS (padding: 0, 0)."""
  for t, s, p in zip(tokens, seg, pos):
    n = int((s > 0).sum())
    assert (s[n:] == 0).all() and (p[n:] == 0).all()
    t, s, p = t[:n], s[:n], p[:n]
    new = (t == bos) | (np.arange(len(t)) == 0)
    np.testing.assert_array_equal(s, np.cumsum(new))
    starts = np.maximum.accumulate(np.where(new, np.arange(len(t)), 0))
    np.testing.assert_array_equal(p, np.arange(len(t)) - starts)


# ----- packing -------------------------------------------------------------------------------------------------
def test_packing_one_epoch_every_token_once_in_order(tok, corpus):
  cfg = _cfg(corpus)
  expected = _expected(tok, data.split_documents(cfg, "train"))
  total = sum(map(len, expected))
  it = data.train_iterator(cfg, tok, 0, 1)
  tokens, seg, pos = _rows(it, 2 * total)
  assert tokens.dtype == seg.dtype == pos.dtype == np.int32 and tokens.shape[1] == 32
  assert (seg > 0).all(), "train rows are never padded"
  _check_layout(tokens, seg, pos, tok.bos_id)
  assert max(map(len, expected)) > 32 and seg.max() >= 2  # docs span rows, rows hold several docs
  stream = tokens.reshape(-1)
  epoch1, epoch2 = _pieces(stream[:total], tok.bos_id), _pieces(stream[total:2 * total], tok.bos_id)
  for epoch in (epoch1, epoch2):
    assert sorted(epoch) == sorted(expected) and len(epoch) == len(expected)
  assert epoch1 != expected, "shuffled"
  assert epoch1 != epoch2, "reshuffled each epoch"


def test_seed_changes_order_and_is_deterministic(tok, corpus):
  a = next(data.train_iterator(_cfg(corpus, seed=1), tok, 0, 1))["tokens"]
  b = next(data.train_iterator(_cfg(corpus, seed=1), tok, 0, 1))["tokens"]
  c = next(data.train_iterator(_cfg(corpus, seed=2), tok, 0, 1))["tokens"]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_tokenized_documents_are_cached(tok, corpus):
  docs = data.split_documents(_cfg(corpus), "train")
  assert data.tokenize_documents(tok, docs) is data.tokenize_documents(tok, docs)


# ----- held-out split ------------------------------------------------------------------------------------------
def test_eval_train_disjoint_and_covering(corpus):
  cfg = _cfg(corpus, eval_fraction=0.25)
  train, held = data.split_documents(cfg, "train"), data.split_documents(cfg, "eval")
  everything = data.load_documents(cfg.source)
  assert train and held
  assert {d.name for d in train}.isdisjoint(d.name for d in held)
  assert sorted(d.name for d in train + held) == sorted(d.name for d in everything)
  assert all(data.is_held_out(d.text, 0.25) for d in held)  # users' documents: keyed by their text


def test_eval_batches_one_pass_padding_at_ends(tok, corpus):
  cfg = _cfg(corpus, eval_fraction=0.25)
  expected = _expected(tok, data.split_documents(cfg, "eval"))
  batches = data.eval_batches(cfg, tok)
  assert all(b["tokens"].shape == (4, 32) for b in batches)
  tokens, seg, pos = (np.concatenate([b[k] for b in batches]) for k in ("tokens", "segment_ids", "positions"))
  for t, s in zip(tokens, seg):
    real = int((s > 0).sum())
    assert (s[:real] > 0).all() and (s[real:] == 0).all(), "padding only at row ends"
    assert (t[real:] == tok.pad_id).all()
  _check_layout(tokens, seg, pos, tok.bos_id)
  real_rows = seg[:, 0] > 0
  stream = tokens[seg > 0]
  assert _pieces(stream, tok.bos_id) == expected, "source order, each document once"
  rows = -(-len(stream) // 32)
  assert int(real_rows.sum()) == rows and len(batches) == -(-rows // 4)
  first = data.eval_batches(cfg, tok, 1)
  assert len(first) == 1 and all(np.array_equal(first[0][k], batches[0][k]) for k in first[0])


def test_eval_split_empty_is_an_error(tok, corpus):
  with pytest.raises(ValueError, match="eval split is empty"):
    data.eval_batches(_cfg(corpus, eval_fraction=0.0), tok, 1)


def test_stdlib_default_corpus(tmp_path):
  """The real default: stdlib modules, fixed held-out modules, a small BPE, one batch."""
  cfg = data.default_config()
  cfg.vocab_size, cfg.seq_len, cfg.global_batch = 600, 128, 2
  train, held = data.split_documents(cfg, "train"), data.split_documents(cfg, "eval")
  names = [d.name for d in data.stdlib_documents()]
  assert names == sorted(names) and len(names) > 100
  assert not any(n.split("/")[0] in data.STDLIB_SKIP_DIRS for n in names)
  assert not any(n.startswith("_sysconfigdata") for n in names)
  assert 0.005 < len(held) / len(names) < 0.05
  assert {d.name for d in train}.isdisjoint(d.name for d in held)
  assert all(data.is_held_out(d.name, cfg.eval_fraction) for d in held)
  tok = data.build_tokenizer(cfg, tmp_path)
  assert (tmp_path / "tokenizer.json").is_file() and tok.vocab_size == 600
  batch = next(data.train_iterator(cfg, tok))
  assert {k: v.shape for k, v in batch.items()} == {k: (2, 128) for k in ("tokens", "segment_ids", "positions")}
  assert len(data.eval_batches(cfg, tok, 2)) == 2


# ----- tokenizer for a run -------------------------------------------------------------------------------------
def test_build_tokenizer_trains_on_train_split_then_reuses(corpus, tmp_path):
  cfg = _cfg(corpus, eval_fraction=0.25)
  workdir = tmp_path / "run"
  tok = data.build_tokenizer(cfg, workdir)
  texts = [d.text for d in data.split_documents(cfg, "train")]
  assert tok.tokenizer.to_str() == train_bpe(texts, 320).tokenizer.to_str()
  assert data.build_tokenizer(cfg, workdir).tokenizer.to_str() == tok.tokenizer.to_str()
  other = train_bpe(TEXTS, vocab_size=300)
  other.save(tmp_path / "other.json")
  cfg.tokenizer = str(tmp_path / "other.json")
  assert data.build_tokenizer(cfg, workdir).vocab_size == 300


# ----- sharding ------------------------------------------------------------------------------------------------
def test_shards_disjoint_and_covering(tok, corpus):
  cfg = _cfg(corpus, global_batch=6)
  expected = sorted(_expected(tok, data.split_documents(cfg, "train")))
  seen = []
  for shard in range(3):
    it = data.train_iterator(cfg, tok, shard, 3)
    assert next(data.train_iterator(cfg, tok, shard, 3))["tokens"].shape == (2, 32)
    total = it.meta["num_tokens"]
    tokens, _, _ = _rows(it, total)
    seen += _pieces(tokens.reshape(-1)[:total], tok.bos_id)
  assert sorted(seen) == expected


def test_default_shard_is_this_process(tok, corpus):
  assert data.train_iterator(_cfg(corpus), tok).meta["shard_count"] == 1


def test_shard_errors(tok, corpus):
  with pytest.raises(ValueError, match="global_batch = 4 is not divisible by shard_count = 3"):
    data.train_iterator(_cfg(corpus), tok, 0, 3)
  with pytest.raises(ValueError, match="shard_index < shard_count"):
    data.train_iterator(_cfg(corpus), tok, 2, 2)
  with pytest.raises(ValueError, match="has no train documents"):
    data.train_iterator(_cfg(corpus, global_batch=32), tok, 31, 32)


# ----- checkpointing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefetch,num_threads", [(0, 0), (2, 2)])
def test_iterator_state_round_trip(tok, corpus, prefetch, num_threads):
  """A state saved after any step (through two epochs) restores the same following batches."""
  cfg = _cfg(corpus, prefetch=prefetch, num_threads=num_threads)
  it = data.train_iterator(cfg, tok, 0, 1)
  steps = 2 * it.meta["num_tokens"] // (4 * 32) + 2
  states, batches = [], []
  for _ in range(steps + 3):
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it))
  for step in range(steps):
    restored = data.train_iterator(cfg, tok, 0, 1)
    restored.set_state(states[step])
    for want in batches[step:step + 3]:
      got = next(restored)
      for k in ("tokens", "segment_ids", "positions"):
        np.testing.assert_array_equal(got[k], want[k])
    restored.close()
  it.close()
  with pytest.raises(ValueError, match="closed"):
    next(it)


def test_iterator_state_mismatch(tok, corpus):
  state = data.train_iterator(_cfg(corpus), tok, 0, 1).get_state()
  with pytest.raises(ValueError, match="seq_len = 32"):
    data.train_iterator(_cfg(corpus, seq_len=16), tok, 0, 1).set_state(state)
  with pytest.raises(ValueError, match="expected a dict from TrainIterator.get_state"):
    data.train_iterator(_cfg(corpus), tok, 0, 1).set_state({"next_index": 3})


# ----- readers -------------------------------------------------------------------------------------------------
def test_txt_reader(tmp_path):
  (tmp_path / "a.txt").write_text("first ✓", encoding="utf-8")
  (tmp_path / "b.txt").write_text("second", encoding="utf-8")
  (tmp_path / "empty.txt").write_text("")
  docs = data.load_documents(str(tmp_path / "*.txt"))
  assert [(d.name.split("/")[-1], d.text) for d in docs] == [("a.txt", "first ✓"), ("b.txt", "second")]
  # A file matched twice (comma-separated entries) is read once; entries keep their order.
  docs = data.load_documents(f"{tmp_path / 'b.txt'}, {tmp_path / '*.txt'}")
  assert [d.text for d in docs] == ["second", "first ✓"]


def test_jsonl_reader(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"content": "one", "id": 1}\n\n{"content": "two\\nlines ✓"}\n{"content": ""}\n', encoding="utf-8")
  docs = data.load_documents([str(path)], text_field="content")
  assert [(d.name, d.text) for d in docs] == [(f"{path}:1", "one"), (f"{path}:3", "two\nlines ✓")]


def test_array_record_reader(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter

  path = str(tmp_path / "d.array_record")
  writer = ArrayRecordWriter(path, "group_size:1")
  for record in ["plain text ✓", json.dumps({"text": "from json", "x": 1}), "{ not json", ""]:
    writer.write(record.encode("utf-8"))
  writer.close()
  docs = data.load_documents(path)
  assert [(d.name, d.text) for d in docs] == [(f"{path}#0", "plain text ✓"), (f"{path}#1", "from json"),
                                              (f"{path}#2", "{ not json")]


def test_mixed_sources_feed_the_pipeline(tok, tmp_path):
  (tmp_path / "a.txt").write_text(TEXTS[0])
  (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[1:6]))
  cfg = _cfg([str(tmp_path / "a.txt"), str(tmp_path / "*.jsonl")])
  it = data.train_iterator(cfg, tok, 0, 1)
  assert it.meta["num_docs"] == 6
  assert next(it)["tokens"].shape == (4, 32)


# ----- errors --------------------------------------------------------------------------------------------------
def test_reader_errors(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": oops}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:3: invalid JSON"):
    data.load_documents(str(bad))
  missing = tmp_path / "missing.jsonl"
  missing.write_text('{"text": "ok"}\n{"body": "no text"}\n')
  with pytest.raises(ValueError, match=r"missing.jsonl:2: no field 'text' \(fields: 'body'\)"):
    data.load_documents(str(missing))
  wrong = tmp_path / "wrong.jsonl"
  wrong.write_text('{"text": 3}\n[1, 2]\n')
  with pytest.raises(ValueError, match=r"wrong.jsonl:1: field 'text' is int"):
    data.load_documents(str(wrong))
  wrong.write_text('[1, 2]\n')
  with pytest.raises(ValueError, match=r"wrong.jsonl:1: expected a JSON object"):
    data.load_documents(str(wrong))
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
    data.load_documents(str(tmp_path / "latin1.txt"))


def test_source_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="matched no files"):
    data.load_documents(str(tmp_path / "*.jsonl"))
  with pytest.raises(ValueError, match="is a directory"):
    data.load_documents(str(tmp_path))
  (tmp_path / "x.csv").write_text("a,b")
  with pytest.raises(ValueError, match="unsupported type"):
    data.load_documents(str(tmp_path / "x.csv"))
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="holds no documents"):
    data.load_documents(str(tmp_path / "empty.txt"))
  with pytest.raises(ValueError, match="source is empty"):
    data.load_documents(" , ")


def test_config_errors(tok, corpus):
  with pytest.raises(ValueError, match=r"seed = 4294967296: must be an integer in \[0, 2\*\*32\)"):
    data.train_iterator(_cfg(corpus, seed=2**32), tok, 0, 1)
  with pytest.raises(ValueError, match="seq_len = 1"):
    data.train_iterator(_cfg(corpus, seq_len=1), tok, 0, 1)
  with pytest.raises(ValueError, match="train split is empty"):
    data.split_documents(_cfg(corpus, eval_fraction=0.999999), "train")
