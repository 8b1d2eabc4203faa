"""What the writer side does with a record, and how records travel to a writer process. No torch here.

A frame on the pipe to the writer process is

    uint64 little-endian header length | header (JSON) | payload (the stored array's bytes)

with header kinds: open (where and how to write), rec (one record), flush (reply "F <id>"
once everything before it is on disk), close (commit, reply "C"). The writer process answers
on its stdout, one line per reply; "E <message>" reports the write error that stopped it.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from tensortap.capture import stats
from tensortap.format.codecs import STORED
from tensortap.format.segment import PendingRecord

_LENGTH = struct.Struct("<Q")


def build_record(seq: int, meta: dict, array: np.ndarray, dtype: str, point: str, full: bool) -> PendingRecord:
    """Stats from the stored array; full mode keeps the tensor, stats mode its stats array instead."""
    scalars, stats_array = stats.compute(array, dtype, point, keep_arrays=not full)
    meta["stats"] = scalars
    meta["stored"] = full
    return PendingRecord(seq, meta, array if full else None, dtype, tuple(array.shape), scalars,
                         None if full else stats_array)


def write_frame(fd: int, header: dict, payload: np.ndarray | None = None) -> None:
    """Write one frame to a file descriptor (os.write releases the GIL while the pipe is full)."""
    data = json.dumps(header, separators=(",", ":"), allow_nan=True).encode()
    _write_all(fd, memoryview(_LENGTH.pack(len(data)) + data))
    if payload is not None and payload.nbytes:
        _write_all(fd, memoryview(np.ascontiguousarray(payload)).cast("B"))


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_frame(stream) -> tuple[dict, np.ndarray | None] | None:
    """Next frame from a binary stream, or None at end of input. A rec frame's payload comes back
    as the stored numpy array (raw bits for bfloat16/float8)."""
    raw = _read_exact(stream, _LENGTH.size)
    if raw is None:
        return None
    header_bytes = _read_exact(stream, _LENGTH.unpack(raw)[0])
    if header_bytes is None:
        return None
    header = json.loads(header_bytes)
    if header.get("k") != "rec":
        return header, None
    dtype = STORED[header["dtype"]][0]
    array = np.empty(header["shape"], dtype=dtype)
    view = memoryview(array.reshape(-1)).cast("B") if array.nbytes else memoryview(b"")
    while view:
        got = stream.readinto(view)
        if not got:
            return None
        view = view[got:]
    return header, array


def _read_exact(stream, n: int) -> bytes | None:
    data = stream.read(n) if n else b""
    return data if len(data) == n else None
