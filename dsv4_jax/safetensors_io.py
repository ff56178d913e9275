"""A small safetensors reader / writer of our own, for official checkpoints and save_pretrained.

Why not the `safetensors` package: its numpy API cannot return F8_E8M0 (the release's scale dtype) and loads
whole files. Here headers are parsed on their own (validation before any data is read), each tensor is a
lazy read-only `np.memmap` of just its bytes (dropped after use, so host memory stays about one tensor), and
the writer streams one tensor at a time into shards of bounded size with the HF index json.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin,
end]}, "__metadata__": {str: str}} (space-padded), then the data; offsets are relative to the data start.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import struct
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # the reference implementation's limit

DTYPES: dict[str, np.dtype] = {
  "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
  "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32), "I32": np.dtype(np.int32),
  "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64), "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16), "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
  "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
CODES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
  """A malformed safetensors file or index."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  file: str
  start: int  # absolute byte offset in the file
  nbytes: int


def read_header(path: str) -> dict[str, TensorInfo]:
  """Every tensor's dtype, shape and byte range in one file; reads only the header."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise SafetensorsError(f"{path}: too short for a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES or 8 + n > size:
      raise SafetensorsError(f"{path}: header length {n} is invalid for a file of {size} bytes")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
  if not isinstance(header, dict):
    raise SafetensorsError(f"{path}: header is not a JSON object")
  header.pop("__metadata__", None)
  infos, base = {}, 8 + n
  for name, entry in header.items():
    try:
      code, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise SafetensorsError(f"{path}: malformed header entry for {name!r}: {entry!r}") from None
    if code not in DTYPES:
      raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
    dtype = DTYPES[code]
    if not 0 <= begin <= end or base + end > size or end - begin != math.prod(shape) * dtype.itemsize:
      raise SafetensorsError(f"{path}: tensor {name!r} {code} {list(shape)} has inconsistent data_offsets "
                             f"[{begin}, {end}] (data section is {size - base} bytes)")
    infos[name] = TensorInfo(name, dtype, shape, path, base + begin, end - begin)
  return infos


def read_tensor(info: TensorInfo) -> np.ndarray:
  """A read-only array over the tensor's bytes (memory-mapped: pages are read on access)."""
  if info.nbytes == 0:
    return np.zeros(info.shape, info.dtype)
  raw = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.start, shape=(info.nbytes,))
  return raw.view(info.dtype).reshape(info.shape)


class CheckpointFiles:
  """The tensors of a checkpoint directory: through `model.safetensors.index.json` when present, else every
  `*.safetensors` file in it. Only headers are read here; `get(name)` maps one tensor."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    index_path = os.path.join(self.path, INDEX_NAME)
    weight_map = None
    if os.path.isfile(index_path):
      with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise SafetensorsError(f"{index_path}: no weight_map object")
      files = sorted(set(weight_map.values()))
      missing = [fn for fn in files if not os.path.isfile(os.path.join(self.path, fn))]
      if missing:
        raise SafetensorsError(f"{index_path} lists file(s) that do not exist: {', '.join(missing)}")
    else:
      files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.path, "*.safetensors")))
      if not files:
        raise FileNotFoundError(f"no *.safetensors files (and no {INDEX_NAME}) in {self.path}")
    self.files = files
    self.infos: dict[str, TensorInfo] = {}
    for fn in files:
      for name, info in read_header(os.path.join(self.path, fn)).items():
        if name in self.infos:
          raise SafetensorsError(f"tensor {name!r} is stored twice: in {os.path.basename(self.infos[name].file)}"
                                 f" and in {fn}")
        self.infos[name] = info
    if weight_map is not None:
      wrong = [f"{k} (index: {v}, found in: {os.path.basename(self.infos[k].file) if k in self.infos else 'none'})"
               for k, v in weight_map.items()
               if k not in self.infos or os.path.basename(self.infos[k].file) != v]
      wrong += [f"{k} (in {os.path.basename(i.file)}, not in the index)" for k, i in self.infos.items()
                if k not in weight_map]
      if wrong:
        raise SafetensorsError(f"{index_path} disagrees with the files' headers for {len(wrong)} tensor(s): "
                               + "; ".join(wrong[:10]) + (" ..." if len(wrong) > 10 else ""))

  def get(self, name: str) -> np.ndarray:
    return read_tensor(self.infos[name])


Item = tuple[str, np.dtype, tuple[int, ...]]  # (name, dtype, shape) of a tensor to write


def write_safetensors(path: str, items: Iterable[Item], get: Callable[[str], np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes `items` to one file, calling `get(name)` for each tensor's data in turn (one in memory at a time)."""
  items = [(name, np.dtype(dtype), tuple(int(d) for d in shape)) for name, dtype, shape in items]
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, dtype, shape in items:
    if dtype not in CODES:
      raise TypeError(f"{name}: dtype {dtype} has no safetensors code")
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, dtype, shape in items:
      x = np.asarray(get(name))
      if x.dtype != dtype or x.shape != shape:
        raise ValueError(f"{name}: got {x.dtype} {list(x.shape)}, declared {dtype} {list(shape)}")
      np.ascontiguousarray(x).tofile(f)


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
  """All of `tensors` (name -> array) into one safetensors file."""
  arrays = {k: np.asarray(v) for k, v in tensors.items()}
  write_safetensors(path, [(k, v.dtype, v.shape) for k, v in arrays.items()], arrays.__getitem__, metadata)


def load_file(path: str) -> dict[str, np.ndarray]:
  """Every tensor of one file, copied into memory (for tests and small files)."""
  return {name: np.array(read_tensor(info)) for name, info in read_header(path).items()}


def write_sharded(directory: str, items: Iterable[Item], get: Callable[[str], np.ndarray],
                  max_shard_bytes: int = 4 << 30, progress: Callable[[int], None] | None = None) -> list[str]:
  """`items` in order into shards `model-0000i-of-0000n.safetensors` of at most `max_shard_bytes` (a larger
  tensor gets a shard of its own), plus `model.safetensors.index.json`. Returns the shard file names."""
  shards: list[list[Item]] = [[]]
  size, total = 0, 0
  for item in items:
    nbytes = math.prod(item[2]) * np.dtype(item[1]).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += nbytes
    total += nbytes
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}

  def get_and_count(name):
    x = get(name)
    if progress is not None:
      progress(np.asarray(x).nbytes)
    return x

  for fn, shard in zip(names, shards):
    write_safetensors(os.path.join(directory, fn), shard, get_and_count)
    weight_map.update({item[0]: fn for item in shard})
  with open(os.path.join(directory, INDEX_NAME), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names
