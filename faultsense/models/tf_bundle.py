"""Read TensorFlow's tensor-bundle checkpoint format (a SavedModel's `variables/`) without
TensorFlow: numpy arrays by variable name.

`variables.index` is a LevelDB-format table (SSTable, uncompressed) whose keys are
variable names and whose values are `BundleEntryProto` messages (dtype, shape, shard,
offset, size); the key "" holds the `BundleHeaderProto`. `variables.data-SSSSS-of-NNNNN`
hold the raw little-endian tensor bytes. Only what plain float/int variables need is
decoded; string tensors (the object graph) and sliced variables are skipped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelError

INDEX_FILE = "variables.index"
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
# tensorflow/core/framework/types.proto DataType -> numpy (little-endian)
_DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 9: "<i8", 10: "?", 19: "<f2"}


@dataclass(frozen=True)
class BundleEntry:
    """Where one variable's bytes live: dtype code, shape, shard, byte offset and size."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    sliced: bool


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the base-128 varint at `pos`."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Protobuf wire format -> [(field number, int or bytes)] in order (no schema)."""
    fields: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value = int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.append((number, value))
    return fields


def _entry(value: bytes) -> BundleEntry:
    """A serialized BundleEntryProto -> BundleEntry."""
    fields = _proto_fields(value)
    scalars = {n: v for n, v in fields if isinstance(v, int)}
    shape: tuple[int, ...] = ()
    for number, payload in fields:
        if number == 2 and isinstance(payload, bytes):  # TensorShapeProto.dim (field 2)
            dims = [d for n, d in _proto_fields(payload) if n == 2 and isinstance(d, bytes)]
            shape = tuple(int(dict(_proto_fields(d)).get(1, 0)) for d in dims)
    return BundleEntry(
        dtype=int(scalars.get(1, 0)),
        shape=shape,
        shard_id=int(scalars.get(3, 0)),
        offset=int(scalars.get(4, 0)),
        size=int(scalars.get(5, 0)),
        sliced=any(n == 7 for n, _ in fields),
    )


def _block(data: bytes, handle: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs of the table block a BlockHandle points at."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    if data[offset + size] != 0:  # the trailer's compression byte: 0 = none
        raise ValueError("compressed table blocks are not supported")
    block = data[offset : offset + size]
    num_restarts = struct.unpack_from("<I", block, size - 4)[0]
    end = size - 4 * (num_restarts + 1)
    items: list[tuple[bytes, bytes]] = []
    key, pos = b"", 0
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        items.append((key, block[pos : pos + length]))
        pos += length
    return items


def read_index(directory: str | Path) -> dict[str, BundleEntry]:
    """`<directory>/variables.index` -> {variable name: BundleEntry} (header key left out).

    Raises ModelError if the file is missing or is not a tensor-bundle index."""
    path = Path(directory) / INDEX_FILE
    if not path.is_file():
        raise ModelError(f"No TensorFlow variables index at {path}.")
    data = path.read_bytes()
    try:
        footer = data[-_FOOTER_SIZE:]
        if len(data) < _FOOTER_SIZE or struct.unpack("<Q", footer[-8:])[0] != _TABLE_MAGIC:
            raise ValueError("no table magic at the end")
        _, pos = _varint(footer, _varint(footer, 0)[1])  # skip the metaindex handle
        entries: dict[str, BundleEntry] = {}
        for _, handle in _block(data, footer[pos:]):
            for key, value in _block(data, handle):
                if key:
                    entries[key.decode("utf-8")] = _entry(value)
    except (ValueError, IndexError, struct.error, UnicodeDecodeError) as err:
        raise ModelError(f"{path} is not a readable TensorFlow variables index: {err}.") from None
    return entries


def read_bundle(directory: str | Path) -> dict[str, np.ndarray]:
    """A SavedModel `variables/` folder -> {name: numpy array} for every plain numeric
    variable (strings and partitioned variables are skipped). ModelError if unreadable."""
    directory = Path(directory)
    entries = read_index(directory)
    shards = {e.shard_id for e in entries.values()}
    total = max(shards, default=0) + 1
    blobs: dict[int, bytes] = {}
    for shard in shards:
        path = directory / f"variables.data-{shard:05d}-of-{total:05d}"
        if not path.is_file():
            raise ModelError(f"TensorFlow variables shard {path} is missing.")
        blobs[shard] = path.read_bytes()
    arrays: dict[str, np.ndarray] = {}
    for name, entry in entries.items():
        if entry.dtype not in _DTYPES or entry.sliced:
            continue
        blob = blobs[entry.shard_id]
        dtype = np.dtype(_DTYPES[entry.dtype])
        if entry.offset + entry.size > len(blob) or entry.size != dtype.itemsize * int(
            np.prod(entry.shape, dtype=np.int64)
        ):
            raise ModelError(f"{directory}: variable {name!r} does not fit its data shard.")
        raw = blob[entry.offset : entry.offset + entry.size]
        arrays[name] = np.frombuffer(raw, dtype=dtype).reshape(entry.shape).copy()
    return arrays
