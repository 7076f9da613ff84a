"""The pipe stream: how kd- commands pass tensors to each other through stdin/stdout.

A stream is a sequence of *records*, each one a complete safetensors blob. A safetensors blob states
its own length (an 8-byte little-endian header size, a JSON header whose tensor offsets give the data
size, then the data), so records need no extra framing and every record can be read on its own with
any safetensors library.

  1. header record: no tensors; metadata
       kdtools.stream  schema version ("1")      kdtools.version  writer's package version
       kdtools.record  "header"                  kind             "queries" (x only) or "samples" (x + answers)
       fields          JSON {name: {"dtype": "uint8", "shape": [1, 28, 28]}} (per-row shapes)
       num_classes     "10" or ""                 value_range      JSON [lo, hi] of x after decoding
       mode            response mode ("label", "probs", "logits", "topk:5") or ""
       extra           JSON: who made the stream and with which options
  2. batch records: one tensor per field, all with the same number of rows; metadata record="batch"
  3. end record: no tensors; metadata record="end", rows, batches, status ("complete" or
     "budget_exhausted" or "error") and a message.

The end record lets a reader tell a finished stream from one whose writer died: end-of-file without it
is reported as a truncated stream. ``x`` of 8-bit images travels as uint8 (0..255 meaning [0, 1]);
anything else as float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import __version__
from .errors import KdError, counted

STREAM_SCHEMA = "1"
MAX_HEADER_BYTES = 16 << 20  # a JSON header larger than this is not ours
DTYPES = {"uint8": torch.uint8, "float32": torch.float32, "float16": torch.float16, "int64": torch.int64,
          "int32": torch.int32, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise KdError(f"dtype {dtype} cannot travel in a kdtools stream")


@dataclass
class StreamHeader:
    kind: str  # "queries" or "samples"
    fields: dict  # name -> {"dtype": str, "shape": [per-row shape]}
    num_classes: Optional[int] = None
    value_range: tuple = (0.0, 1.0)
    mode: str = ""
    extra: dict = field(default_factory=dict)
    version: str = __version__

    @property
    def x_shape(self) -> tuple:
        return tuple(self.fields["x"]["shape"])

    def metadata(self) -> dict:
        return {"kdtools.stream": STREAM_SCHEMA, "kdtools.version": self.version, "kdtools.record": "header",
                "kind": self.kind, "fields": json.dumps(self.fields), "num_classes": "" if self.num_classes is None else str(self.num_classes),
                "value_range": json.dumps(list(self.value_range)), "mode": self.mode, "extra": json.dumps(self.extra, default=str)}

    @classmethod
    def from_metadata(cls, meta: dict) -> "StreamHeader":
        try:
            return cls(kind=meta["kind"], fields=json.loads(meta["fields"]),
                       num_classes=int(meta["num_classes"]) if meta.get("num_classes") else None,
                       value_range=tuple(json.loads(meta.get("value_range", "[0, 1]"))), mode=meta.get("mode", ""),
                       extra=json.loads(meta.get("extra", "{}")), version=meta.get("kdtools.version", "?"))
        except (KeyError, ValueError, TypeError) as e:
            raise KdError(f"malformed kdtools stream header ({e})") from None


def fields_of(batch: dict) -> dict:
    """The per-row field description of a batch of tensors."""
    return {k: {"dtype": dtype_name(v.dtype), "shape": list(v.shape[1:])} for k, v in batch.items()}


class StreamWriter:
    """Writes a header, then batches, then the end record; flushes after every record."""

    def __init__(self, out: BinaryIO, header: StreamHeader):
        self.out = out
        self.header = header
        self.rows = 0
        self.batches = 0
        self.closed = False
        self._write({}, header.metadata())

    def _write(self, tensors: dict, meta: dict) -> None:
        self.out.write(st_save(tensors, metadata=meta))
        self.out.flush()

    def write(self, batch: dict) -> None:
        n = None
        for name, spec in self.header.fields.items():
            if name not in batch:
                raise KdError(f"stream batch lacks field {name!r}")
            t = batch[name]
            if list(t.shape[1:]) != list(spec["shape"]) or dtype_name(t.dtype) != spec["dtype"]:
                raise KdError(f"stream field {name!r}: got {dtype_name(t.dtype)}{list(t.shape[1:])}, header says {spec['dtype']}{spec['shape']}")
            if n is not None and t.shape[0] != n:
                raise KdError("stream batch fields have different row counts")
            n = t.shape[0]
        tensors = {k: batch[k].detach().to("cpu").contiguous() for k in self.header.fields}
        self._write(tensors, {"kdtools.record": "batch", "index": str(self.batches)})
        self.rows += int(n or 0)
        self.batches += 1

    def close(self, status: str = "complete", message: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self._write({}, {"kdtools.record": "end", "rows": str(self.rows), "batches": str(self.batches),
                         "status": status, "message": message})


def _read_exact(inp: BinaryIO, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = inp.read(n - got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def read_record(inp: BinaryIO, where: str = "stream") -> Optional[tuple[dict, dict]]:
    """Read one record; None at a clean end of file (before any byte of a record)."""
    head = _read_exact(inp, 8)
    if not head:
        return None
    if len(head) < 8:
        raise KdError(f"{where}: truncated kdtools stream (a record is cut short)")
    n = int.from_bytes(head, "little")
    if head.startswith(b"\x89HDF"):
        raise KdError(f"{where}: this is an HDF5 file, not a stream; pass it as a file path instead of piping it")
    if n == 0 or n > MAX_HEADER_BYTES:
        raise KdError(f"{where}: not a kdtools stream (bad record header)")
    header_bytes = _read_exact(inp, n)
    if len(header_bytes) < n:
        raise KdError(f"{where}: truncated kdtools stream (a record is cut short)")
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, ValueError):
        raise KdError(f"{where}: not a kdtools stream (record header is not JSON)") from None
    if not isinstance(header, dict):
        raise KdError(f"{where}: not a kdtools stream")
    size = 0
    for name, spec in header.items():
        if name != "__metadata__":
            try:
                size = max(size, int(spec["data_offsets"][1]))
            except (KeyError, TypeError, ValueError, IndexError):
                raise KdError(f"{where}: not a kdtools stream (malformed tensor entry)") from None
    data = _read_exact(inp, size)
    if len(data) < size:
        raise KdError(f"{where}: truncated kdtools stream (a record is cut short)")
    meta = header.get("__metadata__") or {}
    try:
        tensors = st_load(head + header_bytes + data) if size or len(header) > 1 else {}
    except SafetensorError as e:
        raise KdError(f"{where}: corrupt record in kdtools stream ({e})") from None
    return meta, tensors


class StreamReader:
    """Iterates the batches of a stream; ``end`` holds the end record's metadata once read."""

    def __init__(self, inp: BinaryIO, where: str = "stream"):
        self.inp = inp
        self.where = where
        first = read_record(inp, where)
        if first is None:
            raise KdError(f"{where}: empty input, expected a kdtools stream (did the command before it fail?)")
        meta, _ = first
        if "kdtools.stream" not in meta or meta.get("kdtools.record") != "header":
            raise KdError(f"{where}: a safetensors blob but not a kdtools stream header")
        if meta["kdtools.stream"] != STREAM_SCHEMA:
            raise KdError(f"{where}: stream schema {meta['kdtools.stream']} (written by kdtools {meta.get('kdtools.version')}) "
                          f"is not supported by kdtools {__version__}")
        self.header = StreamHeader.from_metadata(meta)
        self.end: Optional[dict] = None
        self.rows = 0

    def __iter__(self) -> Iterator[dict]:
        while True:
            rec = read_record(self.inp, self.where)
            if rec is None:
                raise KdError(f"{self.where}: truncated kdtools stream after {counted(self.rows, 'row')} "
                              "(no end record: the writing command was killed or failed)")
            meta, tensors = rec
            kind = meta.get("kdtools.record")
            if kind == "end":
                self.end = meta
                return
            if kind != "batch":
                raise KdError(f"{self.where}: unexpected record {kind!r} in kdtools stream")
            for name, spec in self.header.fields.items():
                if name not in tensors or list(tensors[name].shape[1:]) != list(spec["shape"]):
                    raise KdError(f"{self.where}: batch {meta.get('index')} does not match the stream header (field {name!r})")
            self.rows += next(iter(tensors.values())).shape[0] if tensors else 0
            yield tensors
