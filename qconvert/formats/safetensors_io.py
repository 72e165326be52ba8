"""A small, strict safetensors reader and a streaming, sharded writer.

Why not ``safetensors.safe_open``: it memory-maps the file, and every page a conversion
touches then counts in the process's resident set until the handle closes.  Reading each
tensor with ``pread`` into its own buffer keeps peak memory at one block, whatever the
depth of the model, and lets us check every header field before trusting it.

File layout (https://github.com/huggingface/safetensors): 8-byte little-endian header
length ``n``, ``n`` bytes of JSON (``{name: {dtype, shape, data_offsets: [begin, end]}}``
plus optional ``__metadata__``), then the byte buffer; offsets are relative to the buffer,
which they must cover without holes or overlaps.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qconvert.errors import QConvertError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# the float dtypes a user names on the command line (--float-dtype, export --scale-dtype)
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit
CHUNK_BYTES = 16 << 20  # pass-through tensors are copied in slices of this size


def nbytes_of(dtype: torch.dtype, shape) -> int:
    """Bytes of a dense tensor of ``dtype`` and ``shape``."""
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    nbytes: int


class SafetensorsFile:
    """Header-validated random access to one ``.safetensors`` file, one tensor at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        fix = "re-download or re-create the file"
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise QConvertError(f"{self.path}: truncated safetensors file ({size} bytes); {fix}")
                n = int.from_bytes(head, "little")
                if n > min(MAX_HEADER_BYTES, size - 8):
                    raise QConvertError(
                        f"{self.path}: safetensors header length {n} exceeds the file size {size}; "
                        f"the file is truncated or corrupt; {fix}"
                    )
                raw = f.read(n)
        except OSError as e:
            raise QConvertError(f"{self.path}: cannot read ({e.strerror}); check the path and permissions") from e
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise QConvertError(f"{self.path}: safetensors header is not valid JSON ({e}); {fix}") from e
        if not isinstance(header, dict):
            raise QConvertError(f"{self.path}: safetensors header is not a JSON object; {fix}")
        meta = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = meta if isinstance(meta, dict) else {}
        data_start = 8 + n
        buffer_len = size - data_start
        self.tensors: dict[str, TensorInfo] = {}
        spans = []
        for name, entry in header.items():
            self.tensors[name] = info = self._check_entry(name, entry, data_start, buffer_len, fix)
            spans.append((info.begin - data_start, info.begin - data_start + info.nbytes, name))
        spans.sort()
        pos = 0
        for begin, end, name in spans:
            if begin != pos:
                raise QConvertError(f"{self.path}: tensor '{name}' overlaps another or leaves a hole in the data; {fix}")
            pos = end
        if pos != buffer_len:
            raise QConvertError(f"{self.path}: {buffer_len - pos} bytes after the last tensor; {fix}")
        self.data_bytes = buffer_len

    def _check_entry(self, name, entry, data_start, buffer_len, fix) -> TensorInfo:
        where = f"{self.path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise QConvertError(f"{where} has a malformed header entry; {fix}")
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise QConvertError(f"{where} has unsupported dtype {entry.get('dtype')!r}; {fix}")
        shape = entry.get("shape")
        offs = entry.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise QConvertError(f"{where} has a malformed shape {shape!r}; {fix}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise QConvertError(f"{where} has malformed data_offsets {offs!r}; {fix}")
        begin, end = offs
        if not 0 <= begin <= end <= buffer_len:
            raise QConvertError(
                f"{where} has data_offsets {offs} outside the file's {buffer_len}-byte data; "
                f"the file is truncated or corrupt; {fix}"
            )
        need = nbytes_of(dtype, shape)
        if end - begin != need:
            raise QConvertError(f"{where}: shape {shape} ({entry['dtype']}) needs {need} bytes, header says {end - begin}; {fix}")
        return TensorInfo(dtype, tuple(shape), data_start + begin, end - begin)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory (no mmap)."""
        info = self.tensors[name]
        return self._read(name, info.begin, info.nbytes, info.dtype, info.shape)

    def iter_rows(self, name: str, max_bytes: int = CHUNK_BYTES):
        """The tensor as consecutive slices along dim 0, each of about ``max_bytes`` at most."""
        info = self.tensors[name]
        if len(info.shape) == 0 or info.nbytes <= max_bytes:
            yield self.get(name)
            return
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else info.nbytes
        rows = max(1, max_bytes // max(row_bytes, 1))
        for r0 in range(0, info.shape[0], rows):
            yield self.get_rows(name, r0, min(r0 + rows, info.shape[0]))

    def get_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0 .. r1 - 1`` along dim 0, reading only their bytes (one expert of a fused tensor)."""
        info = self.tensors[name]
        if not 0 <= r0 <= r1 <= info.shape[0]:
            raise IndexError(f"rows {r0}:{r1} of '{name}' {info.shape}")
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        return self._read(name, info.begin + r0 * row_bytes, (r1 - r0) * row_bytes, info.dtype, (r1 - r0, *info.shape[1:]))

    def _read(self, name, begin, nbytes, dtype, shape) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(nbytes)
        with open(self.path, "rb") as f:
            f.seek(begin)
            got = f.readinto(buf)
        if got != nbytes:
            raise QConvertError(f"{self.path}: tensor '{name}' is cut short (file changed while reading?)")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a small dict of tensors to one file (used for side files and tests)."""
    w = _ShardBuilder(path.with_suffix(path.suffix + ".data"))
    for name, t in tensors.items():
        w.add(name, t)
    w.finish(path, metadata)


@dataclass
class _ShardBuilder:
    """Appends tensor bytes to a scratch data file; ``finish`` writes header + data.

    With ``nbytes > 0`` (a resumed run) the data file is reopened and cut back to ``nbytes``.
    """

    data_path: Path
    entries: dict[str, dict] = field(default_factory=dict)
    nbytes: int = 0

    def __post_init__(self):
        if self.nbytes:
            self._f = open(self.data_path, "r+b")
            self._f.truncate(self.nbytes)
            self._f.seek(self.nbytes)
        else:
            self._f = open(self.data_path, "wb")

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.entries:
            raise ValueError(f"duplicate tensor name {name!r}")
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        data = _tensor_bytes(t)
        self._f.write(data)
        self.entries[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self.nbytes, self.nbytes + len(data)],
        }
        self.nbytes += len(data)

    def add_rows(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], slices) -> None:
        """Add a tensor given as consecutive dim-0 slices (never whole in memory)."""
        if name in self.entries:
            raise ValueError(f"duplicate tensor name {name!r}")
        begin = self.nbytes
        for part in slices:
            assert part.dtype == dtype, (name, part.dtype, dtype)
            data = _tensor_bytes(part)
            self._f.write(data)
            self.nbytes += len(data)
        expected = nbytes_of(dtype, shape)
        if self.nbytes - begin != expected:
            raise ValueError(f"{name}: slices hold {self.nbytes - begin} bytes, shape {shape} needs {expected}")
        self.entries[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, self.nbytes]}

    def finish(self, path: Path, metadata: dict[str, str] | None) -> None:
        self._f.close()
        header = dict(self.entries)
        header["__metadata__"] = {"format": "pt", **(metadata or {})}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the buffer starts 8-byte aligned
        with open(path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            shutil.copyfileobj(data, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        self.data_path.unlink()


class ShardedWriter:
    """Streams tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards as they arrive.

    Tensor bytes go to disk at once, so memory never holds more than the tensor being
    added; a shard closes once it holds ``max_shard_bytes``.  ``close`` names the shards
    HF-style (a single shard becomes ``model.safetensors``) and returns the weight map.

    Resumable: ``sync`` makes everything added so far durable and returns a JSON-able
    ``state``; ``ShardedWriter(..., state=that)`` in a new process continues from exactly
    there, whatever was written after it (scratch files of later shards are discarded).
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int, metadata: dict[str, str] | None = None,
                 state: dict | None = None):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata
        self._done: list[tuple[Path, list[str]]] = []
        self._cur: _ShardBuilder | None = None
        if state is not None:
            self._restore(state)

    def _scratch(self, idx: int, kind: str) -> Path:
        return self.out_dir / f".shard-{idx:05d}.{kind}"

    def sync(self) -> dict:
        """Flush and fsync; return the state to resume from."""
        cur = None
        if self._cur is not None:
            self._cur.sync()
            cur = {"entries": self._cur.entries, "nbytes": self._cur.nbytes}
        return {"done": [[p.name, names] for p, names in self._done], "cur": cur}

    def _restore(self, state: dict) -> None:
        self._done = [(self.out_dir / name, list(names)) for name, names in state["done"]]
        cur = state["cur"]
        idx = len(self._done) + 1
        if cur is not None:
            data, built = self._scratch(idx, "data"), self._scratch(idx, "safetensors")
            if not data.exists():
                # the shard was closed after the state was taken: its data section starts
                # with exactly the bytes the state counts, so take them back from it.  If the
                # final close had begun, it may already carry its final (last-shard) name.
                finals = [self.out_dir / f"model-{idx:05d}-of-{idx:05d}.safetensors"]
                if idx == 1:
                    finals.append(self.out_dir / "model.safetensors")
                built = next((c for c in [built, *finals] if c.exists()), None)
                if built is None:
                    raise FileNotFoundError(f"neither {data.name} nor an assembled shard {idx} exists")
                with open(built, "rb") as src, open(data, "wb") as dst:
                    n = int.from_bytes(src.read(8), "little")
                    src.seek(8 + n)
                    shutil.copyfileobj(src, dst, 16 << 20)
            self._cur = _ShardBuilder(data, dict(cur["entries"]), cur["nbytes"])
            idx += 1
        # scratch files of shards begun after the state was taken
        for p in self.out_dir.glob(".shard-*"):
            n = int(p.name.split("-")[1].split(".")[0])
            if n >= idx or (cur is not None and n == idx - 1 and p.suffix == ".safetensors"):
                p.unlink()

    def add(self, name: str, t: torch.Tensor) -> None:
        self._make_room(t.numel() * t.element_size())
        self._builder().add(name, t)

    def add_rows(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], slices) -> None:
        """Stream a tensor given as dim-0 slices (see ``SafetensorsFile.iter_rows``)."""
        self._make_room(nbytes_of(dtype, shape))
        self._builder().add_rows(name, dtype, shape, slices)

    def _make_room(self, nbytes: int) -> None:
        """Close the current shard if ``nbytes`` more would take it past the limit (a tensor
        larger than the limit gets a shard of its own)."""
        if self._cur is not None and self._cur.nbytes and self._cur.nbytes + nbytes > self.max_shard_bytes:
            self._close_current()

    def _builder(self) -> _ShardBuilder:
        if self._cur is None:
            self._cur = _ShardBuilder(self._scratch(len(self._done) + 1, "data"))
        return self._cur

    def _close_current(self) -> None:
        assert self._cur is not None
        tmp = self._scratch(len(self._done) + 1, "safetensors")
        names = list(self._cur.entries)
        self._cur.finish(tmp, self.metadata)
        self._done.append((tmp, names))
        self._cur = None

    def close(self) -> dict[str, str]:
        if self._cur is not None:
            self._close_current()
        total = len(self._done)
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self._done, 1):
            final = "model.safetensors" if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
            if tmp.exists() or not (self.out_dir / final).exists():  # a resumed close may find it renamed
                os.replace(tmp, self.out_dir / final)
            weight_map.update({n: final for n in names})
        if total > 1:  # total_size counts tensor bytes, as transformers does
            size = sum(SafetensorsFile(self.out_dir / f).data_bytes for f in sorted(set(weight_map.values())))
            index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return weight_map


class ShardedReader:
    """Tensor access across a directory's ``model.safetensors`` or index + shards."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise QConvertError(f"{index}: not a valid safetensors index ({e}); re-create or re-download it") from e
            for name, fname in weight_map.items():
                if Path(fname).name != fname:
                    raise QConvertError(f"{index}: shard name {fname!r} is not a plain file name; refusing to read outside {self.directory}")
                self.where[name] = fname
            for fname in sorted(set(self.where.values())):
                path = self.directory / fname
                if not path.exists():
                    raise QConvertError(f"{index} names {fname}, which is missing; re-download the checkpoint "
                                        "(a qconvert OUT: `qconvert verify` lists what is damaged; quantize it again)")
                self.files[fname] = f = SafetensorsFile(path)
                missing = [n for n, s in self.where.items() if s == fname and n not in f.tensors]
                if missing:
                    raise QConvertError(f"{index} puts '{missing[0]}' in {fname}, which does not hold it; the index and shards disagree")
        else:
            singles = sorted(self.directory.glob("*.safetensors"))
            if not singles:
                raise QConvertError(f"{self.directory}: no .safetensors weights found")
            for path in singles:
                self.files[path.name] = f = SafetensorsFile(path)
                for n in f.keys():
                    self.where[n] = path.name

    def keys(self) -> list[str]:
        return list(self.where)

    def info(self, name: str) -> TensorInfo:
        return self.files[self.where[name]].tensors[name]

    def get(self, name: str) -> torch.Tensor:
        return self.files[self.where[name]].get(name)

    def iter_rows(self, name: str, max_bytes: int = CHUNK_BYTES):
        return self.files[self.where[name]].iter_rows(name, max_bytes)

    def get_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        return self.files[self.where[name]].get_rows(name, r0, r1)
