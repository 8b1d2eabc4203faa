"""Checks that treat a file as untrusted before anything in it is read.

No pickle anywhere. Refused: unknown format versions, links that are not hard links
(external or soft), external raw storage, virtual datasets, filters outside the
allow-list, non-numeric dtypes, shapes whose size exceeds the limit, contiguous data
that claims more bytes than the file holds, oversized or non-JSON metadata.
"""

from __future__ import annotations

import io
import json
import math
import os

import h5py
import numpy as np

from tensortap.errors import FormatError
from tensortap.format import schema
from tensortap.text import human_bytes
from tensortap.vocab import POINT_NAME  # noqa: F401  (re-exported)

# HDF5 filter ids: deflate (gzip), shuffle, fletcher32, lzf.
ALLOWED_FILTERS = {1: "gzip", 2: "shuffle", 3: "fletcher32", 32000: "lzf"}
NOT_A_DUMP_FIX = "pass a directory or file written by TAP=... or tensortap.configure()"


def open_file(path: str) -> h5py.File:
    """Open read-only and check the root is a tensortap dump of a version this reader knows."""
    try:
        f = h5py.File(path, "r", locking=False)
    except (OSError, ValueError) as exc:
        f = _open_short_tmp(path, exc)
        if f is None:
            reason = str(exc).split("(")[0].strip().rstrip(",") or type(exc).__name__
            raise FormatError(path, f"not a readable HDF5 file ({reason})", NOT_A_DUMP_FIX) from None
    try:
        version = f.attrs.get("tensortap_format")
        if isinstance(version, np.generic):
            version = version.item()
        if version is None:
            raise FormatError(path, "not a tensortap dump (no 'tensortap_format' attribute)", NOT_A_DUMP_FIX)
        if not isinstance(version, int) or version not in schema.SUPPORTED_VERSIONS:
            raise FormatError(
                path,
                f"tensortap format version {version!r} is not one this reader knows "
                f"({', '.join(map(str, schema.SUPPORTED_VERSIONS))})",
                "upgrade tensortap to read it",
            )
        check_links(path, f)
        return f
    except FormatError:
        f.close()
        raise
    except Exception as exc:  # h5py raises many types on corrupted structures
        f.close()
        raise FormatError(path, f"corrupted HDF5 structure ({type(exc).__name__}: {exc})", NOT_A_DUMP_FIX) from None


class _ZeroPadded(io.RawIOBase):
    """A read-only view of a file that reads as zeros past its end, up to `size` bytes."""

    def __init__(self, path: str, size: int):
        self._file = open(path, "rb")
        self._real = os.fstat(self._file.fileno()).st_size
        self._size = max(size, self._real)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: 0, 1: self._pos, 2: self._size}[whence] + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        real = max(0, min(n, self._real - self._pos))
        if real:
            self._file.seek(self._pos)
            got = self._file.readinto(view[:real]) or 0
            view[got:real] = bytes(real - got)
        view[real:n] = bytes(n - real)
        self._pos += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_short_tmp(path: str, error: Exception) -> h5py.File | None:
    """A `.tmp` segment whose writer failed mid-flush may claim more bytes than it holds: read it zero-padded."""
    if not path.endswith(schema.TMP_SUFFIX) or "truncated file" not in str(error):
        return None
    try:
        with open(path, "rb") as raw:
            head = raw.read(36)
        if head[:8] != b"\x89HDF\r\n\x1a\n" or head[8] not in (2, 3):
            return None
        stored_eof = int.from_bytes(head[28:36], "little")  # superblock v2/v3: end-of-file address
        if stored_eof > os.path.getsize(path) + schema.MAX_RECORD_BYTES:
            return None
        return h5py.File(_ZeroPadded(path, stored_eof), "r")
    except Exception:
        return None


def check_links(path: str, group: h5py.Group) -> None:
    """Every member of `group` must be a hard link: nothing outside the file is ever followed."""
    for name in group:
        link = group.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
            raise FormatError(
                path, f"'{group.name.rstrip('/')}/{name}' is {kind}; tensortap dumps hold none, refusing to follow it"
            )


def check_dataset(path: str, dataset: h5py.Dataset, expect_dtype: np.dtype | None = None) -> int:
    """Refuse datasets that could read outside the file, decompress without bound or lie about size.

    Returns the dataset's declared size in bytes.
    """
    where = f"'{dataset.name}'"
    if dataset.is_virtual:
        raise FormatError(path, f"{where} is a virtual dataset (maps other files); refusing to read it")
    plist = dataset.id.get_create_plist()
    if plist.get_external_count() > 0:
        raise FormatError(path, f"{where} uses external raw storage (data in another file); refusing to read it")
    for i in range(plist.get_nfilters()):
        filter_id = plist.get_filter(i)[0]
        if filter_id not in ALLOWED_FILTERS:
            raise FormatError(
                path, f"{where} uses HDF5 filter {filter_id}; allowed: {', '.join(ALLOWED_FILTERS.values())}"
            )
    dtype = dataset.dtype
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        if expect_dtype is None or dtype != expect_dtype:
            raise FormatError(path, f"{where} has dtype {dtype}, not a numeric tensor")
    if expect_dtype is not None and dtype != expect_dtype:
        raise FormatError(path, f"{where} has dtype {dtype}, expected {expect_dtype}")
    shape = dataset.shape or ()
    if len(shape) > schema.MAX_NDIM:
        raise FormatError(path, f"{where} has {len(shape)} dimensions (at most {schema.MAX_NDIM})")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > schema.MAX_RECORD_BYTES:
        raise FormatError(
            path, f"{where} declares {human_bytes(nbytes)}, over the {human_bytes(schema.MAX_RECORD_BYTES)} limit of a record"
        )
    file_size = os.path.getsize(path)
    stored = dataset.id.get_storage_size()
    if plist.get_layout() == h5py.h5d.CONTIGUOUS and plist.get_nfilters() == 0 and nbytes > 0:
        offset = dataset.id.get_offset()
        if stored != nbytes or offset is None or offset + nbytes > file_size:
            raise FormatError(
                path, f"{where} declares {human_bytes(nbytes)} but the file holds {human_bytes(stored)} of it (truncated?)"
            )
    elif stored > file_size:
        raise FormatError(path, f"{where} claims more stored bytes than the file has")
    return nbytes


def read_attr(path: str, obj, name: str, max_bytes: int = schema.MAX_META_CHARS):
    """An attribute's value, or None when absent; its declared size is checked before it is read."""
    if name not in obj.attrs:
        return None
    attr = obj.attrs.get_id(name)
    count = math.prod(attr.shape or ())
    nbytes = count * attr.dtype.itemsize
    variable_string = h5py.check_string_dtype(attr.dtype) is not None and attr.dtype.kind == "O"
    if (attr.dtype.kind not in "biufSV" and not (variable_string and count <= 1)) or nbytes > max_bytes:
        raise FormatError(path, f"attribute '{name}' of '{obj.name}' is not a bounded plain value "
                                f"({attr.dtype}, {human_bytes(nbytes)})")
    value = obj.attrs[name]
    if variable_string and len(value) > max_bytes:
        raise FormatError(path, f"attribute '{name}' of '{obj.name}' is larger than {human_bytes(max_bytes)}")
    return value


def parse_meta(path: str, group: h5py.Group) -> dict:
    """The record's JSON metadata attribute, bounded in size, as a dict."""
    raw = read_attr(path, group, schema.META_ATTR)
    if raw is None:
        raise FormatError(path, f"'{group.name}' has no '{schema.META_ATTR}' attribute")
    return parse_json(path, raw, f"'{group.name}' metadata")


def parse_json(path: str, raw, what: str, kind: type = dict):
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    if not isinstance(raw, str) or len(raw) > schema.MAX_META_CHARS:
        raise FormatError(path, f"{what} is not a JSON string of bounded size")
    try:
        value = json.loads(raw)
    except ValueError:
        raise FormatError(path, f"{what} is not valid JSON") from None
    if not isinstance(value, kind):
        raise FormatError(path, f"{what} is not a JSON {kind.__name__}")
    return value


def check_meta(path: str, meta: dict, what: str) -> dict:
    """A record's metadata against the schema: what the reader and the analyzer rely on is well formed."""
    from tensortap.format.codecs import STORED

    def bad(problem: str) -> FormatError:
        return FormatError(path, f"{what}: {problem}", NOT_A_DUMP_FIX)

    if not isinstance(meta.get("name"), str) or not POINT_NAME.fullmatch(str(meta.get("point", ""))):
        raise bad("no valid name/point")
    if meta.get("dtype") not in STORED:
        raise bad(f"unknown dtype {meta.get('dtype')!r}")
    shape = meta.get("shape")
    if (not isinstance(shape, list) or len(shape) > schema.MAX_NDIM
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise bad(f"invalid shape {shape!r}")
    if math.prod(shape) * STORED[meta["dtype"]][0].itemsize > schema.MAX_RECORD_BYTES:
        raise bad(f"shape {shape} declares more than {human_bytes(schema.MAX_RECORD_BYTES)}")
    for key, value in meta.items():
        problem = schema.field_problem(key, value)
        if problem is not None:
            raise bad(problem)
    if not isinstance(meta.get("seq"), int) or isinstance(meta.get("seq"), bool):
        raise bad("no record number (seq)")
    return meta


