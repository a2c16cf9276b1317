"""Weight sources: name -> float32 array on demand, one tensor at a time.

The exporter never holds a model. A family builds its graphs from a config and a weight source, and
every weight is read, transformed and written to disk before the next one is read (llama.cpp's
converter and onnxruntime-genai's SafeTensorStore work the same way). Sources:

  CheckpointSource  a checkpoint folder: safetensors (parsed here, tensors and row blocks read with pread,
                    fp32/fp16/bf16) or PyTorch .bin shards (torch.load(mmap=True, weights_only=True)), with or
                    without an index
  RandomSource      seeded random weights for the real-architecture presets, generated per tensor and per
                    block of rows, so that any slice is reproducible without the rest
  TruncatedSource   a view with fewer layers and vocabulary rows, for validation that fits in memory

write_checkpoint() streams any source to a safetensors checkpoint (the presets, for the rivals to convert).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
import time
import zlib
from typing import Callable, Iterator

import numpy as np

from .errors import ModelLoadError


class CheckpointError(ModelLoadError):
    """A checkpoint's weight files are missing, corrupted, or do not match its config."""


# Names transformers accepts for the same tensor: a checkpoint may use any of them.
ALIASES = {
    "shared.weight": ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
}
BASE_PREFIXES = ("transformer.",)  # BLOOM checkpoints are often saved from the base model, without it


class WeightSource:
    """name -> float32 array; names are transformers' (model.state_dict()) names."""

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray:
        shape = self.shape(name)
        return self.rows(name, 0, shape[0]) if shape else self._scalar(name)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor (its first axis) as float32."""
        raise NotImplementedError

    def names(self) -> list[str]:
        raise NotImplementedError

    def dtype(self, name: str) -> str:
        return "float32"

    def __contains__(self, name: str) -> bool:
        try:
            self.shape(name)
        except KeyError:
            return False
        return True

    def __getitem__(self, name: str) -> np.ndarray:
        return self.get(name)

    def _scalar(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def chunks(self, name: str, rows_per_chunk: int) -> Iterator[np.ndarray]:
        """A 2-D tensor in blocks of rows: the 250k-row embeddings are never whole in memory."""
        total = self.shape(name)[0]
        for start in range(0, total, rows_per_chunk):
            yield self.rows(name, start, min(total, start + rows_per_chunk))


def rows_per_chunk(width: int, budget_bytes: int = 64 << 20) -> int:
    """Rows of `width` float32 values that fit in budget_bytes (at least 1)."""
    return max(1, budget_bytes // (4 * max(1, width)))


class CountingSource(WeightSource):
    """Another source, reporting every 10 s how much of the model has been read (a 7B export takes minutes)."""

    def __init__(self, source: WeightSource, total_bytes: int, report: Callable[[str], None] | None):
        self.source, self.total, self.report = source, max(1, total_bytes), report
        self.read, self.last = 0, time.perf_counter()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)

    def names(self) -> list[str]:
        return self.source.names()

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._count(self.source.rows(name, start, stop))

    def _scalar(self, name: str) -> np.ndarray:
        return self._count(self.source.get(name))

    def _count(self, array: np.ndarray) -> np.ndarray:
        self.read += array.nbytes
        now = time.perf_counter()
        if self.report and now - self.last > 10:
            self.last = now
            self.report(f"read {self.read / 1e9:.1f} GB of weights ({min(100, 100 * self.read / self.total):.0f}% of "
                        "the model)")
        return array


class ArraySource(WeightSource):
    """Arrays already in memory, by name (small models built in code, tests)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.arrays[name].shape)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.arrays[name][start:stop], dtype=np.float32)

    def _scalar(self, name: str) -> np.ndarray:
        return np.asarray(self.arrays[name], dtype=np.float32)

    def names(self) -> list[str]:
        return list(self.arrays)


# ---- checkpoints on disk ----

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
                       "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32 (exact: bf16 is the upper half of an fp32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits as uint16, rounded to nearest even (as torch does)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


class _SafetensorsFile:
    """One .safetensors file: the header parsed and checked against the file's size; tensors read on demand."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if not 2 <= length <= size - 8:
                    raise ValueError(f"header length {length} does not fit a file of {size} bytes")
                header = json.loads(handle.read(length))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            header.pop("__metadata__", None)
            self.base = 8 + length
            self.tensors = {}
            for name, entry in header.items():
                dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(v) for v in entry["data_offsets"])
                expected = math.prod(shape) * np.dtype(dtype).itemsize
                if end - begin != expected or self.base + end > size or begin < 0:
                    raise ValueError(f"tensor {name}: offsets {begin}..{end} do not hold {shape} {entry['dtype']} "
                                     f"in a file of {size} bytes (truncated or corrupted)")
                self.tensors[name] = (entry["dtype"], shape, begin)
        except (OSError, ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                                  "download the checkpoint again.") from e

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Read with pread, not a memory map: a map would keep every page read in this process's RSS."""
        kind, shape, begin = self.tensors[name]
        dtype = np.dtype(_SAFETENSORS_DTYPES[kind])
        row = math.prod(shape[1:]) if shape else 1
        count = (stop - start) * row if shape else 1
        with open(self.path, "rb") as handle:
            data = np.fromfile(handle, dtype=dtype, count=count, offset=self.base + begin + start * row * dtype.itemsize)
        data = data.reshape((stop - start, *shape[1:]) if shape else ())
        if kind == "BF16":
            return bf16_to_float32(data)
        return data.astype(np.float32, copy=False)


class _TorchBinFile:
    """One PyTorch .bin shard, memory-mapped (weights only): tensors stay on disk until read, and the map is opened
    per read and dropped after it, so the pages read do not accumulate in this process's RSS."""

    def __init__(self, path: str):
        import torch

        self.path = path
        self.mapped = True
        try:
            try:
                state = self._load()
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy, non-zip format: in memory
                self.mapped = False
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:300]}); download the checkpoint again.") from e
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} does not hold a state dict; pass a transformers checkpoint folder.")
        self.tensors = {name: (str(t.dtype).replace("torch.", ""), tuple(t.shape), 0) for name, t in state.items()
                        if hasattr(t, "shape")}
        self.state = None if self.mapped else state

    def _load(self) -> dict:
        import torch

        return torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        tensor = (self.state if self.state is not None else self._load())[name]
        part = tensor[start:stop] if tensor.dim() else tensor
        return part.float().numpy().copy()


class CheckpointSource(WeightSource):
    """A Hugging Face checkpoint folder, read tensor by tensor (the weights are never loaded together)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.files: dict[str, _SafetensorsFile | _TorchBinFile] = {}
        self.where: dict[str, str] = {}  # tensor name -> file name
        index = self._read_index()
        for filename in sorted(set(index.values())) or self._unindexed_files():
            path = os.path.join(folder, filename)
            if not os.path.isfile(path):
                raise CheckpointError(f"{folder} names the weight file {filename}, which is missing; "
                                      "download the checkpoint again.")
            reader = _SafetensorsFile(path) if filename.endswith(".safetensors") else _TorchBinFile(path)
            self.files[filename] = reader
            for name in reader.tensors:
                self.where.setdefault(name, filename)
        for name, filename in index.items():
            if name not in self.files[filename].tensors:
                raise CheckpointError(f"the index of {folder} puts {name} in {filename}, which does not hold it; "
                                      "the checkpoint is corrupted.")

    def _read_index(self) -> dict[str, str]:
        """tensor name -> file, from model.safetensors.index.json or pytorch_model.bin.index.json; {} without one."""
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            path = os.path.join(self.folder, index_name)
            if not os.path.isfile(path):
                continue
            try:
                with open(path, encoding="utf-8") as handle:
                    weight_map = json.load(handle)["weight_map"]
                if not isinstance(weight_map, dict) or not weight_map:
                    raise ValueError("weight_map is empty")
                return {str(k): str(v) for k, v in weight_map.items()}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path} is not a readable index ({type(e).__name__}: {e}); "
                                      "download the checkpoint again.") from e
        return {}

    def _unindexed_files(self) -> list[str]:
        """Safetensors first (as transformers prefers), then .bin."""
        for pattern in ("model.safetensors", "model-*.safetensors", "*.safetensors", "pytorch_model.bin",
                        "pytorch_model-*.bin"):
            found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.folder, pattern)))
            if found:
                return found
        raise CheckpointError(f"{self.folder} has no weights (model.safetensors, *.safetensors shards with or without "
                              "an index, or pytorch_model*.bin); pass a complete checkpoint folder.")

    def _resolve(self, name: str) -> tuple[str, str]:
        for candidate in _candidates(name):
            if candidate in self.where:
                return self.where[candidate], candidate
        raise KeyError(name)

    def shape(self, name: str) -> tuple[int, ...]:
        filename, stored = self._resolve(name)
        return self.files[filename].tensors[stored][1]

    def dtype(self, name: str) -> str:
        filename, stored = self._resolve(name)
        return self.files[filename].tensors[stored][0]

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        filename, stored = self._resolve(name)
        return self.files[filename].rows(stored, start, stop)

    def _scalar(self, name: str) -> np.ndarray:
        filename, stored = self._resolve(name)
        return self.files[filename].rows(stored, 0, 1)

    def names(self) -> list[str]:
        return sorted(self.where)


def _candidates(name: str) -> list[str]:
    names = [name, *ALIASES.get(name, ())]
    for prefix in BASE_PREFIXES:
        names += [n[len(prefix):] for n in names if n.startswith(prefix)]
    return names


# ---- random weights for the presets ----

ROW_BLOCK = 4096  # rows generated per seeded block: any slice is reproducible without the rest


class RandomSource(WeightSource):
    """Seeded random weights with transformers' initial distributions, per tensor and per block of rows.

    parameters: name -> (shape, init) with init ("normal", std), ("ones",) or ("zeros",)."""

    def __init__(self, parameters: dict[str, tuple[tuple[int, ...], tuple]], seed: int = 0):
        self.parameters = parameters
        self.seed = seed

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.parameters[name][0])

    def names(self) -> list[str]:
        return list(self.parameters)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        shape, init = self.parameters[name]
        width = math.prod(shape[1:])
        if init[0] != "normal":
            return np.full((stop - start, *shape[1:]), 1.0 if init[0] == "ones" else 0.0, np.float32)
        out = np.empty((stop - start, width), np.float32)
        key = zlib.crc32(name.encode())
        for block in range(start // ROW_BLOCK, (stop - 1) // ROW_BLOCK + 1):
            first, last = block * ROW_BLOCK, min(shape[0], (block + 1) * ROW_BLOCK)
            values = np.random.default_rng([self.seed, key, block]).standard_normal((last - first, width),
                                                                                     dtype=np.float32)
            lo, hi = max(first, start), min(last, stop)
            out[lo - start:hi - start] = values[lo - first:hi - first]
        out *= np.float32(init[1])
        return out.reshape((stop - start, *shape[1:]))


# ---- a smaller view, for validation in bounded memory ----

class TruncatedSource(WeightSource):
    """Some layers of a source renumbered 0..n-1, and only its first `vocab_rows` vocabulary rows.

    rename(name) -> the source's name for a name of the truncated model (the family knows its layer names)."""

    def __init__(self, source: WeightSource, rename: Callable[[str], str], vocab_names: tuple[str, ...],
                 vocab_rows: int):
        self.source, self.rename, self.vocab_names, self.vocab_rows = source, rename, vocab_names, vocab_rows

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self.source.shape(self.rename(name))
        return (min(shape[0], self.vocab_rows), *shape[1:]) if name in self.vocab_names else shape

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.source.rows(self.rename(name), start, stop)

    def names(self) -> list[str]:
        raise NotImplementedError("a truncated view is read by name")


def layer_renamer(layer_maps: dict[str, dict[int, int]], pinned: tuple[str, ...] = ()) -> Callable[[str], str]:
    """rename for TruncatedSource: for names matching a pattern (a regex with one group around the layer index),
    layer i of the view is layer layer_maps[pattern][i] of the source. Names containing one of `pinned` keep
    reading layer 0 (mT5's relative attention bias lives in block 0 only)."""
    compiled = [(re.compile(pattern), layer_map) for pattern, layer_map in layer_maps.items()]

    def rename(name: str) -> str:
        for pattern, layer_map in compiled:
            match = pattern.match(name)
            if match:
                index = 0 if any(p in name for p in pinned) else layer_map[int(match.group(1))]
                return name[:match.start(1)] + str(index) + name[match.end(1):]
        return name

    return rename


# ---- writing a checkpoint, tensor by tensor ----

def write_checkpoint(source: WeightSource, names: list[str], folder: str, dtype: str = "bfloat16",
                     shard_bytes: int = 2 << 30, progress: Callable[[str], None] | None = None) -> list[str]:
    """Stream `names` of `source` into safetensors shards (with an index when there are several) in folder.

    dtype: float32, float16 or bfloat16 on disk. Memory holds one block of rows at a time. Returns the files."""
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    code = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    shards: list[list[str]] = [[]]
    used = 0
    for name in names:
        size = math.prod(source.shape(name)) * itemsize
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for filename, shard in zip(files, shards):
        header, offset = {}, 0
        for name in shard:
            shape = list(source.shape(name))
            size = math.prod(shape) * itemsize
            header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * ((-len(encoded)) % 8)
        with open(os.path.join(folder, filename), "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            for name in shard:
                if progress:
                    progress(name)
                shape = source.shape(name)
                step = rows_per_chunk(math.prod(shape[1:]) if len(shape) > 1 else 1) if shape else 1
                for start in range(0, shape[0] if shape else 1, step):
                    block = source.rows(name, start, min(shape[0], start + step)) if shape else source.get(name)
                    if dtype == "bfloat16":
                        block = float32_to_bf16(block)
                    else:
                        block = np.ascontiguousarray(block, dtype=np.float16 if dtype == "float16" else np.float32)
                    handle.write(block.tobytes())
    if len(files) > 1:
        weight_map = {name: filename for filename, shard in zip(files, shards) for name in shard}
        total = sum(math.prod(source.shape(n)) * itemsize for n in names)
        with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)
    return files
