"""Training input: corpus sources, the tokenizer for a run, and the packed, sharded, checkpointable grain pipeline.

  cfg = data.default_config()
  tok = data.build_tokenizer(cfg, workdir)        # cfg.tokenizer, else workdir/tokenizer.json, else a new BPE
  it = data.train_iterator(cfg, tok)             # infinite; it.get_state() / it.set_state(state)
  batch = next(it)                               # {"tokens", "segment_ids", "positions"}: int32 [batch, seq_len]
  evals = data.eval_batches(cfg, tok, 10)        # the held-out split, same list on every process

Sources (`cfg.source`: one entry, a list, or a comma-separated string; entries are read in the order given):
* "stdlib": the `.py` files of this Python's standard library (`sysconfig.get_paths()["stdlib"]`), sorted by
  relative path, one document per file, skipping the directories in `STDLIB_SKIP_DIRS` (the big `test/` tree,
  IDLE, lib2to3, the generated codec tables in `encodings/`, ...) and the machine-specific `_sysconfigdata*`.
  The corpus depends on the Python version (3.12.1: 402 files, 9.0 MB, 2.27 M tokens with the default
  8192-token BPE; 9 files held out).
* a path or glob (`**` recursive) of `.txt` (one document per file), `.jsonl` (one JSON object per line, the
  text in `cfg.text_field`) or `.array_record` files (each record UTF-8 text, or a JSON object holding
  `cfg.text_field`). Files matched by several entries are read once; empty documents are skipped.

Held-out split (fixed, disjoint from train): a document is held out iff
`sha256("dsv4-eval:" + key)`, read as a fraction of 2**64, is below `cfg.eval_fraction`. The key is the
relative path for stdlib modules (the same modules are held out on every Python version that has them) and
the text itself for users' documents (the split survives moving files; duplicates land on the same side).

Packing: each document becomes [BOS] + ids + [EOS]; documents are shuffled (a new order each epoch, from
`cfg.seed`), concatenated and cut into rows of exactly `seq_len` tokens (grain's concat-then-split). A row may
hold several documents, and a document may continue on the next row. `segment_ids` number the pieces of a
row 1, 2, 3, ... and `positions` restart at 0 at every piece, so a continued document restarts its positions
at 0 (the model sees the continuation as a new document, without BOS). Train rows are never padded.
Eval rows are padded at the very end (the last row, then whole rows to fill the last batch): padding has
`segment_ids` 0 and `tokens` = pad id. The next-token loss mask is therefore
`(segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)`.

Sharding: process `shard_index` of `shard_count` reads the train documents `shard_index::shard_count` and
yields `global_batch // shard_count` rows per batch.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import logging
import os
import pathlib
import sysconfig
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, ThreadPrefetchIterDataset
from tqdm.auto import tqdm

from dsv4_jax.tokenizer import Tokenizer, train_bpe

log = logging.getLogger(__name__)

STDLIB = "stdlib"
# Directories (any path component) left out of the stdlib corpus: tests, IDLE, lib2to3, demos, bundled wheels,
# generated codec tables, caches, third-party packages.
STDLIB_SKIP_DIRS = frozenset({
  "site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "encodings", "__pycache__",
})
FILE_SUFFIXES = (".txt", ".jsonl", ".array_record")
_EVAL_SALT = "dsv4-eval:"
_TOKENIZE_CHUNK = 64  # documents per encode_batch call (progress granularity)
_CACHE_ENTRIES = 4    # tokenized corpora kept in memory
STATE_VERSION = 1


def default_config() -> ml_collections.ConfigDict:
  """The data config; fields documented inline."""
  cfg = ml_collections.ConfigDict()
  # "stdlib", a path/glob, a comma-separated string of them, or a list (any type may be assigned).
  cfg.source = ml_collections.FieldReference(STDLIB, field_type=object)
  cfg.text_field = "text"        # JSON field holding the text (.jsonl, JSON array_record records)
  cfg.seq_len = 512              # tokens per row
  cfg.global_batch = 8           # rows per step over all processes
  cfg.seed = 0                   # shuffle seed, in [0, 2**32)
  cfg.vocab_size = 8192          # BPE size when a tokenizer is trained (an upper bound; specials included)
  cfg.tokenizer = ml_collections.config_dict.placeholder(str)  # tokenizer.json (or its directory), or None
  cfg.eval_fraction = 0.02       # share of documents held out (see the module docstring for the rule)
  cfg.num_threads = 0            # grain read threads (documents are in-memory slices: 0 = read inline)
  cfg.prefetch = 0               # batches prepared ahead on a background thread (0 = none; a batch takes ~1 ms)
  return cfg


# ----- documents -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Document:
  name: str       # where it came from, for messages ("path", "path:line", "path#record", stdlib relative path)
  text: str
  split_key: str  # what the held-out rule hashes


def _source_entries(source: Any) -> list[str]:
  if isinstance(source, (str, os.PathLike)):
    entries = [e.strip() for e in os.fspath(source).split(",")]
  elif isinstance(source, Iterable):
    entries = [os.fspath(e).strip() for e in source]
  else:
    raise TypeError(f"data config field source: expected 'stdlib', a path/glob or a list of them, got {source!r}")
  entries = [e for e in entries if e]
  if not entries:
    raise ValueError(f"data config field source is empty ({source!r}); use 'stdlib' or paths/globs")
  return entries


def stdlib_documents() -> list[Document]:
  """The standard library's `.py` files (see the module docstring), sorted by relative path."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  docs = []
  for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
    rel = path.relative_to(root)
    if any(p in STDLIB_SKIP_DIRS or p.startswith("config-") for p in rel.parts[:-1]):
      continue
    if rel.name.startswith("_sysconfigdata") or not path.is_file():
      continue
    text = path.read_bytes().decode("utf-8", errors="replace")
    if text:
      docs.append(Document(rel.as_posix(), text, rel.as_posix()))
  if not docs:
    raise ValueError(f"data source stdlib: no .py files found under {root}")
  return docs


def _decode(raw: bytes, where: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{where}: not UTF-8 text ({e})") from e


def _json_text(obj: Any, text_field: str, where: str) -> str:
  if not isinstance(obj, dict):
    raise ValueError(f"{where}: expected a JSON object with field {text_field!r}, got {type(obj).__name__}")
  if text_field not in obj:
    raise ValueError(f"{where}: no field {text_field!r} (fields: {', '.join(map(repr, obj)) or 'none'}); "
                     f"set the data config field text_field")
  text = obj[text_field]
  if not isinstance(text, str):
    raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
  return text


def read_txt(path: str) -> list[Document]:
  """One document: the whole file."""
  with open(path, "rb") as f:
    text = _decode(f.read(), path)
  return [Document(path, text, text)] if text else []


def read_jsonl(path: str, text_field: str = "text") -> list[Document]:
  """One document per non-blank line: `json.loads(line)[text_field]`."""
  docs = []
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      where = f"{path}:{n}"
      line = _decode(raw, where).strip()
      if not line:
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
      text = _json_text(obj, text_field, where)
      if text:
        docs.append(Document(where, text, text))
  return docs


def read_array_record(path: str, text_field: str = "text") -> list[Document]:
  """One document per record: UTF-8 text, or (if the record parses as a JSON object) its `text_field`."""
  from array_record.python.array_record_module import ArrayRecordReader

  try:
    reader = ArrayRecordReader(path)
  except Exception as e:
    raise ValueError(f"{path}: cannot open as an ArrayRecord file ({e})") from e
  try:
    records = reader.read_all()
  finally:
    reader.close()
  docs = []
  for n, raw in enumerate(records):
    where = f"{path}#{n}"
    text = _decode(raw, where)
    if text.lstrip().startswith("{"):
      try:
        obj = json.loads(text)
      except json.JSONDecodeError:
        obj = None  # plain text that starts with "{"
      if isinstance(obj, dict):
        text = _json_text(obj, text_field, where)
    if text:
      docs.append(Document(where, text, text))
  return docs


_READERS = {".txt": read_txt, ".jsonl": read_jsonl, ".array_record": read_array_record}


def _expand(pattern: str) -> list[str]:
  """Files of one source entry: the path itself, or the sorted matches of a glob."""
  if os.path.isdir(pattern):
    raise ValueError(f"data source {pattern!r} is a directory; give files or a glob such as "
                     f"{os.path.join(pattern, '**', '*.jsonl')!r}")
  paths = [pattern] if os.path.isfile(pattern) else sorted(p for p in glob.glob(pattern, recursive=True)
                                                           if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(f"data source {pattern!r} matched no files")
  for p in paths:
    if not p.endswith(FILE_SUFFIXES):
      raise ValueError(f"data source {pattern!r}: {p!r} has an unsupported type (expected one of "
                       f"{', '.join(FILE_SUFFIXES)})")
  return paths


def load_documents(source: Any, text_field: str = "text") -> list[Document]:
  """All documents of SOURCE, in source order (see the module docstring)."""
  docs: list[Document] = []
  seen: set[str] = set()
  for entry in _source_entries(source):
    if entry == STDLIB:
      if STDLIB not in seen:
        seen.add(STDLIB)
        docs += stdlib_documents()
      continue
    for path in _expand(entry):
      real = os.path.realpath(path)
      if real in seen:
        continue
      seen.add(real)
      suffix = next(s for s in FILE_SUFFIXES if path.endswith(s))
      reader = _READERS[suffix]
      docs += reader(path) if suffix == ".txt" else reader(path, text_field)
  if not docs:
    raise ValueError(f"data source {source!r} holds no documents (every file empty?)")
  return docs


def is_held_out(split_key: str, eval_fraction: float) -> bool:
  """The fixed held-out rule: the hash of the key, as a fraction of 2**64, is below eval_fraction."""
  digest = hashlib.sha256((_EVAL_SALT + split_key).encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") < eval_fraction * 2.0 ** 64


def split_documents(cfg: ml_collections.ConfigDict, split: str) -> list[Document]:
  """The "train" or "eval" documents of cfg.source, in source order."""
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  _check_config(cfg)
  want_eval = split == "eval"
  docs = [d for d in load_documents(cfg.source, cfg.text_field)
          if is_held_out(d.split_key, cfg.eval_fraction) == want_eval]
  if not docs:
    hint = "raise eval_fraction or add documents" if want_eval else "lower eval_fraction or add documents"
    raise ValueError(f"data source {cfg.source!r}: the {split} split is empty "
                     f"(eval_fraction = {cfg.eval_fraction}); {hint}")
  return docs


# ----- tokenizer ---------------------------------------------------------------------------------------------
def build_tokenizer(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | None) -> Tokenizer:
  """cfg.tokenizer if set, else WORKDIR/tokenizer.json if present, else a BPE trained on the train split (all
  shards, so every process gets the same one) and saved to WORKDIR/tokenizer.json."""
  if cfg.tokenizer:
    return Tokenizer.load(cfg.tokenizer)
  file = os.path.join(os.fspath(workdir), "tokenizer.json") if workdir is not None else None
  if file is not None and os.path.isfile(file):
    return Tokenizer.load(file)
  docs = split_documents(cfg, "train")
  texts = tqdm((d.text for d in docs), total=len(docs), unit="doc", desc="training BPE", delay=2, leave=False)
  tok = train_bpe(texts, cfg.vocab_size)
  if file is not None:
    tok.save(file)
    log.info("trained a %d-token BPE on %d documents; saved %s", tok.vocab_size, len(docs), file)
  return tok


# ----- tokenized documents (cached in memory) ------------------------------------------------------------------
class TokenizedDocs:
  """Documents as [BOS] + ids + [EOS] int32 arrays, stored flat; a grain random-access source."""

  def __init__(self, flat: np.ndarray, offsets: np.ndarray):
    self.flat, self.offsets = flat, offsets

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {"tokens": self.flat[self.offsets[i]:self.offsets[i + 1]]}

  @property
  def num_tokens(self) -> int:
    return int(self.offsets[-1])


_CACHE: collections.OrderedDict[str, TokenizedDocs] = collections.OrderedDict()


def tokenize_documents(tok: Tokenizer, docs: Sequence[Document]) -> TokenizedDocs:
  """Tokenizes DOCS (with a progress bar when slow); the result is cached per (tokenizer, texts)."""
  h = hashlib.sha256(tok.tokenizer.to_str().encode("utf-8"))
  for d in docs:
    h.update(len(d.text).to_bytes(8, "little"))
    h.update(d.text.encode("utf-8", errors="surrogatepass"))
  key = h.hexdigest()
  if key in _CACHE:
    _CACHE.move_to_end(key)
    return _CACHE[key]
  bos, eos = tok.bos_id, tok.eos_id
  pieces, lengths = [], []
  with tqdm(total=len(docs), unit="doc", desc="tokenizing", delay=2, leave=False) as bar:
    for start in range(0, len(docs), _TOKENIZE_CHUNK):
      chunk = docs[start:start + _TOKENIZE_CHUNK]
      for ids in tok.encode_batch([d.text for d in chunk]):
        pieces.append(np.asarray([bos, *ids, eos], np.int32))
        lengths.append(len(ids) + 2)
      bar.update(len(chunk))
  out = TokenizedDocs(np.concatenate(pieces), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
  _CACHE[key] = out
  while len(_CACHE) > _CACHE_ENTRIES:
    _CACHE.popitem(last=False)
  return out


# ----- pipeline ----------------------------------------------------------------------------------------------
def _check_config(cfg: ml_collections.ConfigDict) -> None:
  def need(ok: bool, field: str, rule: str):
    if not ok:
      raise ValueError(f"data config field {field} = {cfg[field]!r}: {rule}")

  need(isinstance(cfg.seq_len, int) and cfg.seq_len >= 2, "seq_len", "must be an integer >= 2")
  need(isinstance(cfg.global_batch, int) and cfg.global_batch >= 1, "global_batch", "must be an integer >= 1")
  need(isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**32, "seed", "must be an integer in [0, 2**32)")
  need(0.0 <= cfg.eval_fraction < 1.0, "eval_fraction", "must be in [0, 1)")
  need(isinstance(cfg.text_field, str) and bool(cfg.text_field), "text_field", "must be a non-empty string")
  need(cfg.num_threads >= 0, "num_threads", "must be >= 0")
  need(cfg.prefetch >= 0, "prefetch", "must be >= 0")


def _row_fields(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"], "positions": row["tokens_positions"]}


def _packed_rows(source: grain.MapDataset, cfg: ml_collections.ConfigDict) -> grain.IterDataset:
  read = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=4 * cfg.num_threads)
  ds = source.to_iter_dataset(read)
  ds = ConcatThenSplitIterDataset(ds, length_struct={"tokens": cfg.seq_len})
  return ds.map(_row_fields)


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  if shard_index is None or shard_count is None:
    import jax  # noqa: PLC0415  (only for the defaults)

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not (shard_count >= 1 and 0 <= shard_index < shard_count):
    raise ValueError(f"data shard: need 0 <= shard_index < shard_count, got {shard_index} of {shard_count}")
  return shard_index, shard_count


def _tuples_for_slices(state: Any) -> Any:
  """grain's concat-then-split compares its remainder slices with tuples; JSON turns them into lists."""
  if isinstance(state, dict):
    return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _tuples_for_slices(v))
            for k, v in state.items()}
  return state


def _close(box: list) -> None:
  while box:
    box.pop().close()


class TrainIterator:
  """Infinite iterator of packed batches; `get_state` is a JSON-serialisable dict that `set_state` restores."""

  def __init__(self, dataset: grain.IterDataset, meta: dict[str, Any]):
    self._meta = meta
    # The grain iterator sits in a box that `close` empties: at exit it is closed and freed before module
    # teardown, where grain's own __del__ of a prefetching iterator would fail.
    self._box = [iter(dataset)]
    self._finalizer = weakref.finalize(self, _close, self._box)

  @property
  def _it(self) -> grain.DatasetIterator:
    if not self._box:
      raise ValueError("data iterator is closed")
    return self._box[0]

  def close(self) -> None:
    """Stops background prefetching, if any; the iterator cannot be used afterwards."""
    self._finalizer()

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    return {"version": STATE_VERSION, **self._meta, "grain": json.loads(json.dumps(self._it.get_state()))}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "grain" not in state:
      raise ValueError(f"data iterator state: expected a dict from TrainIterator.get_state (version "
                       f"{STATE_VERSION}), got {str(state)[:200]}")
    for k, v in self._meta.items():
      if state.get(k) != v:
        raise ValueError(f"data iterator state was saved with {k} = {state.get(k)!r}, but this pipeline has "
                         f"{k} = {v!r}; restore with the same data config, tokenizer and shard")
    self._it.set_state(_tuples_for_slices(state["grain"]))

  @property
  def meta(self) -> dict[str, Any]:
    """What the state is bound to: shard, batch, seq_len, seed, document and token counts."""
    return dict(self._meta)


def train_iterator(cfg: ml_collections.ConfigDict, tok: Tokenizer, shard_index: int | None = None,
                   shard_count: int | None = None) -> TrainIterator:
  """This process's infinite stream of train batches (see the module docstring)."""
  _check_config(cfg)
  shard_index, shard_count = _resolve_shard(shard_index, shard_count)
  if cfg.global_batch % shard_count:
    raise ValueError(f"data config field global_batch = {cfg.global_batch} is not divisible by "
                     f"shard_count = {shard_count} (processes)")
  docs = split_documents(cfg, "train")[shard_index::shard_count]
  if not docs:
    raise ValueError(f"data shard {shard_index} of {shard_count} has no train documents "
                     f"(the train split has fewer documents than shards)")
  tokens = tokenize_documents(tok, docs)
  ds = grain.MapDataset.source(tokens).shuffle(seed=cfg.seed).repeat(None)
  ds = _packed_rows(ds, cfg).batch(cfg.global_batch // shard_count, drop_remainder=True)
  if cfg.prefetch:
    ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)
  meta = dict(shard_index=shard_index, shard_count=shard_count, batch=cfg.global_batch // shard_count,
              seq_len=cfg.seq_len, seed=cfg.seed, num_docs=len(tokens), num_tokens=tokens.num_tokens)
  return TrainIterator(ds, meta)


def eval_batches(cfg: ml_collections.ConfigDict, tok: Tokenizer, num_batches: int | None = None
                 ) -> list[dict[str, np.ndarray]]:
  """Up to NUM_BATCHES global batches ([global_batch, seq_len]) of one pass over the held-out split, in source
  order, unshuffled; fewer (with a log message) if the split is smaller; None = all of it."""
  docs = split_documents(cfg, "eval")
  tokens = tokenize_documents(tok, docs)
  rows = iter(_packed_rows(grain.MapDataset.source(tokens), cfg))
  batches = []
  while num_batches is None or len(batches) < num_batches:
    chunk = [r for _, r in zip(range(cfg.global_batch), rows)]
    if not chunk:
      break
    pad = cfg.global_batch - len(chunk)
    batch = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad, cfg.seq_len), np.int32)]) for k, v in batch.items()}
    batch["tokens"][batch["segment_ids"] == 0] = tok.pad_id
    batches.append(batch)
  if num_batches is not None and len(batches) < num_batches:
    log.warning("eval: the held-out split fills only %d of the %d batches asked for (%d documents, %d tokens)",
                len(batches), num_batches, len(tokens), tokens.num_tokens)
  return batches
