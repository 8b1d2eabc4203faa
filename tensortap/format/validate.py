"""Checks that treat a file as untrusted before anything in it is read.

No pickle anywhere. Refused (opening.py: anything but a regular file, since a FIFO, device or socket
named like a segment would block or never end; unknown format versions), links that are not hard links
(external or soft), external raw storage, virtual datasets, filters outside the allow-list,
non-numeric dtypes, declared sizes over the limits or over what the file holds, compressed data
that would inflate past its limit, oversized or non-JSON metadata, metadata values the schema
does not allow, and tensors whose `crc32` digest does not match.

Bounds, for a dataset declaring `n` bytes (n = prod(shape) * itemsize) in a file of `size` bytes:
    n <= MAX_RECORD_BYTES                          always
    contiguous:       stored == n, offset + n <= size
    chunked, plain:   n <= stored <= size           (every chunk written: no fill-value bombs)
    chunked, filters: n <= MAX_INFLATED_BYTES and n <= MAX_INFLATE_RATIO * stored
"""

from __future__ import annotations

import json
import math
import zlib

import h5py
import numpy as np

from tensortap.errors import FormatError
from tensortap.format import schema
from tensortap.text import human_bytes
from tensortap.vocab import POINT_NAME  # noqa: F401  (re-exported)

# HDF5 filter ids: deflate (gzip), shuffle, fletcher32, lzf.
ALLOWED_FILTERS = {1: "gzip", 2: "shuffle", 3: "fletcher32", 32000: "lzf"}
COMPRESSING_FILTERS = (1, 32000)
NOT_A_DUMP_FIX = "pass a directory or file written by TAP=... or tensortap.configure()"

# A compressed record is inflated whole into memory: bound it (a 2 MiB gzip stream can declare 2 GiB).
MAX_INFLATED_BYTES = 1 << 30
# deflate cannot exceed 1032:1; anything claiming more is not what a writer produced.
MAX_INFLATE_RATIO = 1100
MAX_BATCH_OBJECTS = 4 * schema.MAX_BATCH_RECORDS  # JSON objects in a batch's metadata: a record and its stats, trigger, ...
COMPACT_MAX_BYTES = 64 << 10  # HDF5 compact datasets live in the object header (< 64 KiB)
CRC_ATTR = "crc32"



# -- links -------------------------------------------------------------------------------------------
def check_links(path: str, group: h5py.Group) -> None:
    """Every member of `group` must be a hard link: nothing outside the file is ever followed."""
    for name in group:
        link = group.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
            raise FormatError(
                path, f"'{group.name.rstrip('/')}/{name}' is {kind}; tensortap dumps hold none, refusing to follow it"
            )


# -- datasets ------------------------------------------------------------------------------------------
def check_storage(path: str, dataset: h5py.Dataset, size: int, exact: bool = True) -> int:
    """Refuse a dataset that maps other files, uses an unknown filter, or declares more than its storage
    can hold (see the bounds in the module docstring). `exact=False` for variable-length strings, whose
    bytes live in the file's heap. Returns the declared size in bytes."""
    where = f"'{dataset.name}'"
    if dataset.is_virtual:
        raise FormatError(path, f"{where} is a virtual dataset (maps other files); refusing to read it")
    plist = dataset.id.get_create_plist()
    if plist.get_external_count() > 0:
        raise FormatError(path, f"{where} uses external raw storage (data in another file); refusing to read it")
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    for filter_id in filters:
        if filter_id not in ALLOWED_FILTERS:
            raise FormatError(
                path, f"{where} uses HDF5 filter {filter_id}; allowed: {', '.join(ALLOWED_FILTERS.values())}"
            )
    shape = dataset.shape or ()
    if len(shape) > schema.MAX_NDIM:
        raise FormatError(path, f"{where} has {len(shape)} dimensions (at most {schema.MAX_NDIM})")
    nbytes = math.prod(shape) * dataset.dtype.itemsize
    if nbytes > schema.MAX_RECORD_BYTES:
        raise FormatError(
            path, f"{where} declares {human_bytes(nbytes)}, over the {human_bytes(schema.MAX_RECORD_BYTES)} limit of a record"
        )
    stored = dataset.id.get_storage_size()
    layout = plist.get_layout()
    if stored > size:
        raise FormatError(path, f"{where} claims {human_bytes(stored)} of storage in a {human_bytes(size)} file")
    if not exact or nbytes == 0:
        return nbytes
    if layout == h5py.h5d.CONTIGUOUS:
        offset = dataset.id.get_offset()
        if stored != nbytes or offset is None or offset + nbytes > size:
            raise FormatError(
                path, f"{where} declares {human_bytes(nbytes)} but the file holds {human_bytes(stored)} of it (truncated?)"
            )
    elif layout == h5py.h5d.COMPACT:
        if nbytes > COMPACT_MAX_BYTES:
            raise FormatError(path, f"{where} is a compact dataset declaring {human_bytes(nbytes)}")
    elif not any(f in COMPRESSING_FILTERS for f in filters):
        if stored < nbytes:  # unwritten chunks read as fill values: a 40 KB file could declare 64 GiB
            raise FormatError(path, f"{where} declares {human_bytes(nbytes)} but stores {human_bytes(stored)} of it")
    elif nbytes > MAX_INFLATED_BYTES or nbytes > MAX_INFLATE_RATIO * stored:
        raise FormatError(
            path, f"{where} declares {human_bytes(nbytes)} compressed into {human_bytes(stored)}; compressed "
                  f"records inflate to at most {human_bytes(MAX_INFLATED_BYTES)} (at most {MAX_INFLATE_RATIO}:1), "
                  f"refusing to inflate it"
        )
    return nbytes


def check_dataset(path: str, dataset: h5py.Dataset, expect_dtype: np.dtype | None, size: int) -> int:
    """A tensor or stats dataset: numeric (or exactly `expect_dtype`) and within its storage."""
    where = f"'{dataset.name}'"
    dtype = dataset.dtype
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        if expect_dtype is None or dtype != expect_dtype:
            raise FormatError(path, f"{where} has dtype {dtype}, not a numeric tensor")
    if expect_dtype is not None and dtype != expect_dtype:
        raise FormatError(path, f"{where} has dtype {dtype}, expected {expect_dtype}")
    return check_storage(path, dataset, size)


def check_crc(path: str, dataset: h5py.Dataset, array: np.ndarray, what: str, size: int) -> None:
    """The optional digest of the stored bytes: zlib.crc32 over the array in C order (uint32)."""
    expected = read_attr(path, dataset, CRC_ATTR, 64, size)
    if expected is None:
        return
    if isinstance(expected, np.ndarray) and expected.size == 1:
        expected = expected.reshape(())[()]
    if isinstance(expected, np.generic):
        expected = expected.item()
    if not isinstance(expected, int) or isinstance(expected, bool) or not 0 <= expected < 1 << 32:
        raise FormatError(path, f"{what}: its crc32 attribute is not an unsigned 32-bit integer ({expected!r})")
    check_crc_value(path, expected, np.ascontiguousarray(array).reshape(-1).view(np.uint8), what)


def check_crc_value(path: str, expected, raw: np.ndarray, what: str) -> None:
    """A record's crc32 (a uint32: format 2's "crc32" key, format 1's attribute) against its stored bytes
    `raw` (uint8, C order)."""
    if expected is None:
        return
    actual = zlib.crc32(raw) if raw.size else 0
    if actual != expected:
        raise FormatError(path, f"{what}: stored bytes fail their crc32 check ({actual:#010x} != {expected:#010x}); "
                                f"the file was changed after capture", "recapture, or restore the file")


# -- attributes and metadata -------------------------------------------------------------------------
def read_attr(path: str, obj, name: str, max_bytes: int = schema.MAX_META_CHARS, size: int | None = None):
    """An attribute's value, or None when absent; its declared size is checked (against `max_bytes`
    and the file's `size`) before it is read."""
    if name not in obj.attrs:
        return None
    attr = obj.attrs.get_id(name)
    count = math.prod(attr.shape or ())
    nbytes = count * attr.dtype.itemsize
    variable_string = h5py.check_string_dtype(attr.dtype) is not None and attr.dtype.kind == "O"
    if (attr.dtype.kind not in "biufSV" and not (variable_string and count <= 1)) or nbytes > max_bytes \
            or (size is not None and nbytes > size):
        raise FormatError(path, f"attribute '{name}' of '{obj.name}' is not a bounded plain value "
                                f"({attr.dtype}, {human_bytes(nbytes)})")
    value = obj.attrs[name]
    if variable_string and len(value) > max_bytes:
        raise FormatError(path, f"attribute '{name}' of '{obj.name}' is larger than {human_bytes(max_bytes)}")
    return value


def parse_meta(path: str, group: h5py.Group, size: int) -> dict:
    """The record's JSON metadata attribute, bounded in size, as a dict."""
    raw = read_attr(path, group, schema.META_ATTR, schema.MAX_META_CHARS, size)
    if raw is None:
        raise FormatError(path, f"'{group.name}' has no '{schema.META_ATTR}' attribute")
    return parse_json(path, raw, f"'{group.name}' metadata")


class _TooMany(Exception):
    pass


def parse_batch_meta(path: str, dataset: h5py.Dataset, size: int) -> list:
    """Format 2: a batch dataset's `meta` attribute: a JSON list, bounded in size and in the objects it
    holds (counted while it is parsed: a 6 MB list of empty objects would otherwise become millions of
    dicts)."""
    raw = read_attr(path, dataset, schema.META_ATTR, schema.MAX_META_CHARS, size)
    if raw is None:
        raise FormatError(path, f"'{dataset.name}' has no '{schema.META_ATTR}' attribute")
    objects = [0]

    def counted(value: dict) -> dict:
        objects[0] += 1
        if objects[0] > MAX_BATCH_OBJECTS:
            raise _TooMany()
        return value

    try:
        return parse_json(path, raw, f"'{dataset.name}' metadata", kind=list, object_hook=counted)
    except _TooMany:
        raise FormatError(path, f"'{dataset.name}' metadata holds more than {MAX_BATCH_OBJECTS} objects; "
                                f"a batch has at most {schema.MAX_BATCH_RECORDS} records") from None


def parse_json(path: str, raw, what: str, kind: type = dict, object_hook=None):
    if isinstance(raw, np.ndarray) and raw.shape == ():
        raw = raw[()]
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    if not isinstance(raw, str) or len(raw) > schema.MAX_META_CHARS:
        raise FormatError(path, f"{what} is not a JSON string of bounded size")
    try:
        value = json.loads(raw, object_hook=object_hook)
    except (ValueError, RecursionError):
        raise FormatError(path, f"{what} is not valid JSON") from None
    if not isinstance(value, kind):
        raise FormatError(path, f"{what} is not a JSON {kind.__name__}")
    if "\\u" in raw:  # escapes can spell lone surrogates, which no output can encode
        bad = unencodable(value)
        if bad is not None:
            raise FormatError(path, f"{what}: {bad} holds a string that is not valid Unicode")
    return value


def unencodable(value, where: str = "") -> str | None:
    """The first place in a JSON value (key path) holding a string UTF-8 cannot encode, or None."""
    stack = [(where, value)]
    while stack:
        place, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return place or "a value"
        elif isinstance(item, dict):
            for key, sub in item.items():
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    return f"a key under {place or 'the root'}"
                stack.append((place or f"key '{key}'", sub))
        elif isinstance(item, list):
            stack.extend((place, sub) for sub in item)
    return None


# Fields a record cannot do without; a null in any of them is malformed (elsewhere null means absent).
REQUIRED = ("seq", "name", "point", "dtype", "shape")
STATS_FLOATS = ("absmax",)  # >= 0 (NaN fails the comparison)
STATS_INTS = ("hash",)  # the consensus hash of row points: any int64


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_meta(path: str, meta: dict, what: str, root_rank=None, batched: bool | None = None,
               batch_bytes: int | None = None) -> dict:
    """A record's metadata against the schema (schema.RECORD_FIELDS): what the reader and the analyzer
    rely on is well formed, or FormatError names the file, the record (`what`) and the key.

    Nulls in optional fields are dropped (absent); a missing rank is the segment's."""
    from tensortap.format.codecs import STORED

    name = meta.get("name")
    if isinstance(name, str) and name:
        what = f"{what} ({name[:80]})"

    def bad(key: str, problem: str) -> FormatError:
        return FormatError(path, f"{what}: key '{key}': {problem}")

    for key in REQUIRED + ("rank",):
        if key in meta and meta[key] is None:
            raise bad(key, "is null")
    for key in [k for k, v in meta.items() if v is None]:
        del meta[key]
    if "rank" not in meta and root_rank is not None:
        meta["rank"] = root_rank
    for key in REQUIRED:
        if key not in meta:
            raise bad(key, "is missing")
    for key, value in meta.items():
        problem = schema.field_problem(key, value)
        if problem is not None:
            raise bad(key, problem)
    point = meta["point"]
    if not POINT_NAME.fullmatch(point):
        raise bad("point", f"{point!r} is not a point name")
    if meta["name"].rsplit(".", 1)[-1] != point or not meta["name"].isprintable() or len(meta["name"]) > 256:
        raise bad("name", f"{meta['name'][:80]!r} is not a printable dotted name ending in its point {point!r}")
    if meta["dtype"] not in STORED:
        raise bad("dtype", f"unknown dtype {meta['dtype']!r}")
    shape = meta["shape"]
    if len(shape) > schema.MAX_NDIM or any(n < 0 for n in shape):
        raise bad("shape", f"invalid shape {shape!r}")
    if math.prod(shape) * STORED[meta["dtype"]][0].itemsize > schema.MAX_RECORD_BYTES:
        raise bad("shape", f"shape {shape} declares more than {human_bytes(schema.MAX_RECORD_BYTES)}")
    for key in ("seq", "rank"):
        if key in meta and meta[key] < 0:
            raise bad(key, f"is negative ({meta[key]})")
    for key, value in meta.get("stats", {}).items():
        if key in schema.INT_STATS:
            ok, kind = _is_int(value) and value >= 0, "count"
        elif key in STATS_INTS:
            ok, kind = _is_int(value), "integer"
        elif key in STATS_FLOATS:
            ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, "magnitude"
        else:
            ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value, "number"
        if not ok:
            raise bad(f"stats.{key}", f"is not a {kind} ({value!r})")
    for key, value in meta.items():
        if isinstance(value, float) and schema.FIELDS.get(key) is not None and not math.isfinite(value):
            raise bad(key, f"is not finite ({value!r})")
    if batched is not None:
        check_location(path, meta, what, batched, batch_bytes)
    return meta


def stats_layout(path: str, meta: dict) -> tuple[np.dtype, list]:
    """(dtype, shape) of a record's stats array, as format/stats.py makes it: head stats [T, H] for a
    [T, H, D] head point, valid-per-row [T] for a [T, K] index point."""
    point, shape = meta["point"], meta["shape"]
    if point in schema.HEAD_POINTS and len(shape) == 3:
        return schema.HEAD_STATS_DTYPE, shape[:2]
    if point in schema.INDEX_POINTS and len(shape) == 2:
        return schema.ROW_STATS_DTYPE, shape[:1]
    raise FormatError(path, f"point {point!r} of shape {shape} has no stats array")


def check_location(path: str, meta: dict, what: str, batched: bool, batch_bytes: int | None = None) -> None:
    """Where a record's bytes are. Format 2: "batch", "at" (stored records; exactly the bytes its dtype and
    shape declare), "stats_at" (its stats array's bytes) and "crc32", each well formed and inside the
    batch (`batch_bytes` long, when known). Format 1 records carry none of these keys."""
    from tensortap.format.codecs import STORED

    def bad(key: str, problem: str) -> FormatError:
        return FormatError(path, f"{what}: key '{key}': {problem}")

    if not batched:
        for key in schema.LOCATION_FIELDS:
            if key in meta:
                raise bad(key, "format 1 records have no such key")
        return
    if "batch" not in meta:
        raise bad("batch", "is missing")
    if meta["batch"] < 0:
        raise bad("batch", f"is negative ({meta['batch']})")
    stored = meta.get("stored", True)
    if stored != ("at" in meta):
        raise bad("at", "is missing (the record is stored)" if stored else "is given, but the record holds stats only")
    spans = {}
    if "at" in meta:
        spans["at"] = math.prod(meta["shape"]) * STORED[meta["dtype"]][0].itemsize
    if "stats_at" in meta:
        try:
            dtype, rows = stats_layout(path, meta)
        except FormatError as exc:
            raise bad("stats_at", exc.problem) from None
        spans["stats_at"] = math.prod(rows) * dtype.itemsize
    for key, declared in spans.items():
        span = meta[key]
        if len(span) != 2 or span[0] < 0 or span[1] != declared:
            raise bad(key, f"is not [offset, {declared}] ({span!r:.80})")
        if batch_bytes is not None and span[0] + span[1] > batch_bytes:
            raise bad(key, f"bytes {span[0]}..{span[0] + span[1]} lie outside the batch ({batch_bytes} bytes)")
    crc = meta.get("crc32")
    if crc is not None and not 0 <= crc < 1 << 32:
        raise bad("crc32", f"is not an unsigned 32-bit integer ({crc!r})")


def check_root(path: str, root: dict) -> dict:
    """Root attributes the reader relies on (schema.ROOT_INTS, ROOT_STRS, ROOT_JSON) are well formed."""
    def bad(key: str, problem: str) -> FormatError:
        return FormatError(path, f"root attribute '{key}' {problem}", NOT_A_DUMP_FIX)

    for key in schema.ROOT_INTS:
        value = root.get(key)
        if value is not None and (not _is_int(value) or value < 0):
            raise bad(key, f"is not a non-negative integer ({value!r:.80})")
    for key in schema.ROOT_STRS:
        value = root.get(key)
        if value is not None and (not isinstance(value, str) or not value.isprintable() or len(value) > 256):
            raise bad(key, f"is not a printable string ({value!r:.80})")
    for key, kind in schema.ROOT_JSON.items():
        value = root.get(key)
        if value is not None and not isinstance(value, kind):
            raise bad(key, f"is not a JSON {kind.__name__}")
    bad_place = unencodable(root)
    if bad_place is not None:
        raise bad(bad_place.removeprefix("key ").strip("'"), "holds a string that is not valid Unicode")
    return root
