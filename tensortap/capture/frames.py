"""How records travel to the writer process: binary frames on a pipe. No torch and no h5py here.

A frame is

    kind u8 | 3 pad | count u32 | body length u64 | body

    OPEN, FLUSH, CLOSE   body: JSON (where and how to write; flush id and loss totals; final attributes)
    BATCH                body: batch id u64 | 7 loss totals i64 | `count` records

and a record in a batch is

    meta length u32 | full u8 | arrays u8 | 2 pad | meta JSON | arrays

    array: name length u8 | dtype length u8 | ndim u8 | in ring u8 | 4 pad | ring offset u64 | name
           | numpy dtype.str | shape i64 x ndim | pad to 16 | [the array's bytes (C order) | pad to 16]

An array of 64 KiB or more is not in the frame but in a ring of shared memory (a memfd both
processes map): the server copies it there (one copy, like the pipe's, but the writer process
reads it in place instead of copying it out), and the ring space is reused once its batch is
acknowledged.

The metadata is JSON encoded once, on the server, and written to the segment as received (the
writer process appends the stats it computed and `stored`). A record's arrays are "data" (the
stored tensor, raw bits for bfloat16/float8) or the device "stats:*" parts, plus nothing else:
tensor-valued metadata is already inside the JSON. The server sends a batch with one `writev`
(its GIL released while the pipe drains); the writer process reads a batch body with one read
and takes zero-copy numpy views into it. It answers on its stdout, one line per reply:

    A <batch id>   the batch is committed (flushed): from here on a SIGKILL cannot take it away
    F <flush id>   everything before that flush frame is committed
    C              closed (then it exits)
    E <records> <bytes> <message>   the write error that stopped it, after <records> records
"""

from __future__ import annotations

import json
import struct

import numpy as np

from tensortap.fileio import write_all  # noqa: F401  (the server sends frames with it)

OPEN, BATCH, FLUSH, CLOSE = 1, 2, 3, 4
TOTALS = ("records", "bytes", "dropped", "over_budget", "lost", "errors", "graph_skipped")

_FRAME = struct.Struct("<BxxxIQ")
_BATCH = struct.Struct("<Q7q")
_RECORD = struct.Struct("<IBBxx")
_ARRAY = struct.Struct("<BBBBxxxxQ")
_ALIGN = 16
_INLINE = 4096  # arrays up to this size are copied into the record's header bytes (one iovec less)
RING_MIN = 64 << 10  # arrays of at least this many bytes go through the shared ring, when there is one
_PAD = bytes(_ALIGN)


def _pad(n: int) -> int:
    return -n % _ALIGN


# -- server side ----------------------------------------------------------------------------------------
def control_frame(kind: int, body: dict) -> bytes:
    data = json.dumps(body, separators=(",", ":"), allow_nan=True).encode()
    return _FRAME.pack(kind, 0, len(data)) + data


def batch_pieces(batch_id: int, totals: dict, records: list[tuple[bytes, bool, dict]], ring=None) -> list:
    """The buffers of one BATCH frame, for os.writev. `records`: (meta JSON, full, {name: array}).
    With a `ring` (child.py), arrays of RING_MIN bytes or more are copied into the shared ring and
    the frame carries their offset; the rest travel inline. A record's array copied into the ring is
    replaced in its dict by that copy (`ring.view`): the snapshot it came from is not needed any more."""
    pieces: list = []
    head = bytearray(_BATCH.pack(batch_id, *(int(totals.get(k, 0)) for k in TOTALS)))
    length = len(head)
    for meta_json, full, arrays in records:
        head += _RECORD.pack(len(meta_json), 1 if full else 0, len(arrays))
        head += meta_json
        length += _RECORD.size + len(meta_json)
        for name, array in arrays.items():
            at = ring.put(array) if ring is not None and array.nbytes >= RING_MIN else None
            if at is None:
                key = (name, array.dtype, array.shape)
                header = _HEADERS.get(key)
                if header is None:
                    header = _array_header(name, array, None)
                    if len(_HEADERS) < 4096:
                        _HEADERS[key] = header
            else:
                header = _array_header(name, array, at)
                arrays[name] = ring.view(at, array)
            head += header
            length += len(header)
            head += _PAD[: _pad(length)]
            length += _pad(length)
            if at is not None:
                continue
            data = memoryview(np.ascontiguousarray(array)).cast("B") if array.nbytes else b""
            if len(data) <= _INLINE:
                head += data
            else:
                pieces.append(bytes(head))
                pieces.append(data)
                head = bytearray()
            length += len(data)
            head += _PAD[: _pad(length)]
            length += _pad(length)
    if head:
        pieces.append(bytes(head))
    return [_FRAME.pack(BATCH, len(records), length)] + pieces


_HEADERS: dict = {}  # (name, dtype, shape) -> the header of an array sent inline: the same for every record


def _array_header(name: str, array: np.ndarray, at: int | None) -> bytes:
    """An array's header up to its padding: sizes, ring flag and offset, name, dtype, shape."""
    name_b, dtype_b = name.encode(), array.dtype.str.encode()
    return (_ARRAY.pack(len(name_b), len(dtype_b), array.ndim, 0 if at is None else 1, at or 0) + name_b + dtype_b
            + struct.pack(f"<{array.ndim}q", *array.shape))


# -- writer-process side ------------------------------------------------------------------------------------
def read_frame(stream) -> tuple[int, int, memoryview | bytes] | None:
    """(kind, count, body) of the next frame, or None at the end of input (or a torn frame)."""
    head = _read_exact(stream, _FRAME.size)
    if head is None:
        return None
    kind, count, length = _FRAME.unpack(head)
    body = np.empty(length, dtype=np.uint8)  # aligned: the arrays inside are views of it
    view = memoryview(body)
    got = 0
    while got < length:
        n = stream.readinto(view[got:])
        if not n:
            return None
        got += n
    return kind, count, view


def control_body(body) -> dict:
    return json.loads(bytes(body))


def batch_records(count: int, body: memoryview, ring: np.ndarray | None = None):
    """(batch id, totals, [(meta JSON text, full, {name: array}), ...]) of a BATCH body; arrays are
    views into the body, or into the shared `ring` (valid until the batch is acknowledged)."""
    batch_id, *values = _BATCH.unpack_from(body, 0)
    offset = _BATCH.size
    records = []
    for _ in range(count):
        meta_len, full, n_arrays = _RECORD.unpack_from(body, offset)
        offset += _RECORD.size
        meta_json = bytes(body[offset:offset + meta_len]).decode("utf-8")
        offset += meta_len
        arrays = {}
        for _ in range(n_arrays):
            name_len, dtype_len, ndim, in_ring, at = _ARRAY.unpack_from(body, offset)
            offset += _ARRAY.size
            name = bytes(body[offset:offset + name_len]).decode()
            offset += name_len
            dtype = np.dtype(bytes(body[offset:offset + dtype_len]).decode())
            offset += dtype_len
            shape = struct.unpack_from(f"<{ndim}q", body, offset)
            offset += 8 * ndim
            offset += _pad(offset)
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            count_n = n // dtype.itemsize if dtype.itemsize else 0
            if in_ring:
                if ring is None or at + n > ring.size:
                    raise ValueError("a frame points outside the shared ring")
                arrays[name] = ring[at:at + n].view(dtype).reshape(shape)
                continue
            arrays[name] = np.frombuffer(body, dtype=dtype, count=count_n, offset=offset).reshape(shape)
            offset += n
            offset += _pad(offset)
        records.append((meta_json, bool(full), arrays))
    return batch_id, dict(zip(TOTALS, values)), records


def _read_exact(stream, n: int) -> bytes | None:
    data = stream.read(n) if n else b""
    return data if len(data) == n else None
