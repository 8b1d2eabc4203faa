"""A record on its way from the tap to the writer, and its metadata's JSON, encoded once.

A lean record (Tap.lean_record) keeps its scope's metadata apart: the scope's part is encoded once per
scope (`base_json`, without RECORD_KEYS and the point's own keys), and each record adds only its own
keys to it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from tensortap.text import as_json

if TYPE_CHECKING:
    from tensortap.capture.staging import Staged

RECORD_KEYS = ("name", "point", "layer", "seq", "time_ns", "dropped_before", "dtype", "shape")  # set per record

meta_json = json.JSONEncoder(separators=(",", ":"), allow_nan=True, default=as_json).encode


class Job:
    """A record on its way to disk."""

    __slots__ = ("meta", "staged", "full", "base_json", "own")

    def __init__(self, meta: dict, staged: Staged, full: bool, base_json: str | None = None, own: tuple = ()):
        self.meta = meta  # metadata (seq, point, ...); tensor values travel in `staged` as "meta:<key>"
        self.staged = staged  # "data" (the snapshot) or the device's "stats:*" parts, and "meta:*"
        self.full = full  # the tensor is stored, not only its stats
        # a lean record's scope metadata, JSON encoded once per scope without RECORD_KEYS and `own` (the
        # point's own keys): its JSON is that and the record's own keys (record_json)
        self.base_json = base_json
        self.own = own


def record_json(job: Job) -> str:
    """A record's metadata as JSON, encoded once: its scope's part was encoded once per scope."""
    if job.base_json is None:
        return meta_json(job.meta)
    meta = job.meta
    own = {key: meta[key] for key in RECORD_KEYS if key in meta}
    for key in job.own:
        own[key] = meta[key]
    text = meta_json(own)  # "{...}"
    if job.base_json == "{}":
        return text
    return job.base_json[:-1] + ("," + text[1:] if len(text) > 2 else "}")
