"""A record on its way from the tap to the writer, and its metadata's JSON, encoded once.

A lean record (Tap.lean_record) and a graph replay's records (Tap.split_replay) keep the metadata they
share apart: that part is encoded once per scope or slot (`base_json`, without RECORD_KEYS and the
record's own keys), and each record adds only its own keys to it.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from tensortap.text import as_json

if TYPE_CHECKING:
    from tensortap.capture.staging import Staged

RECORD_KEYS = ("name", "point", "layer", "seq", "time_ns", "dropped_before", "dtype", "shape")  # set per record

meta_json = json.JSONEncoder(separators=(",", ":"), allow_nan=True, default=as_json).encode
YIELD = True  # yield_gil releases the GIL (benchmarks turn it off to measure what it saves)
YIELD_NS = 100_000  # ... at most this long after its last release, while only CPU records were seen
GPU_YIELD_NS = 20_000  # ... once a CUDA record was seen (pace_for_gpu)
_yield_ns = YIELD_NS
_held_since = 0  # when the writer thread last took the GIL back in yield_gil


def yield_gil() -> None:
    """Let the model's thread have the GIL once `_yield_ns` have passed since the last release here (a
    zero sleep releases it).

    The writer thread calls this between records. torch releases the GIL in each op and takes it back
    after it: while this thread runs Python, every op of the model's thread waits for the GIL, up to
    the switch interval (5 ms) if this thread never lets go. Released every `_yield_ns`, that wait is
    about that long and one record's work at most, and the writer catches up while the model waits for
    its GPU. Not at every record: each release costs both threads a hand-over (small records: 4x
    fewer per second when released after every one)."""
    global _held_since
    if YIELD:
        now = time.perf_counter_ns()
        if now - _held_since >= _yield_ns:
            time.sleep(0)
            _held_since = time.perf_counter_ns()


def pace_for_gpu() -> None:
    """The model's thread launches GPU kernels, each of which waits for the GIL: yield every
    GPU_YIELD_NS. Measured on an H200 (glm5 reference, benchmarks/gpu_gil_yield.py, one run): graph-
    replayed stats on one layer 1.26x the untapped step at 100 us, 1.15x at 20 us; graph full and the
    eager modes moved within that host's noise (0.01-0.05x, slower at 20 us). CPU records keep 100 us,
    where a release costs more than it saves. Called once a CUDA record is seen: by the writer's host
    copy, and when a graph slot is made (the model's thread, at capture)."""
    global _yield_ns
    _yield_ns = GPU_YIELD_NS


def reset_pace() -> None:
    """Back to the CPU pace (a new Tap: the records it will see are not known yet)."""
    global _yield_ns
    _yield_ns = YIELD_NS


class Job:
    """A record on its way to disk."""

    __slots__ = ("meta", "staged", "full", "base_json", "own")

    def __init__(self, meta: dict, staged: Staged, full: bool, base_json: str | None = None, own: tuple = ()):
        self.meta = meta  # metadata (seq, point, ...); tensor values travel in `staged` as "meta:<key>"
        self.staged = staged  # "data" (the snapshot) or the device's "stats:*" parts, and "meta:*"
        self.full = full  # the tensor is stored, not only its stats
        # the part of `meta` its scope (or graph slot) shares, JSON encoded once, and the keys `meta` sets
        # besides RECORD_KEYS: its JSON is that part and these keys (record_json)
        self.base_json = base_json
        self.own = own


class Replay:
    """The records of one CUDA-graph replay as the model's thread hands them over (Tap.after_replay): the
    graph's slots drained in one copy (`staged`: "packed" uint8 [total] and the replay scope's "meta:*"
    snapshots, its `ready` the event after that copy), the slots kept with their seq, and what the host
    scope at the replay stamps on each. The writer side cuts the records out once the copy is on the
    host (Tap.split_replay)."""

    __slots__ = ("entry", "kept", "stamp", "time_ns", "dropped", "staged")

    def __init__(self, entry, kept: list, stamp: dict, time_ns: int, dropped: int, staged: Staged):
        self.entry = entry  # graphs.GraphSlots
        self.kept = kept  # [(slot, seq)] of the slots the filter keeps, in order
        self.stamp = stamp  # the replay's scope metadata, phase and graph (Registry.stamp)
        self.time_ns, self.dropped = time_ns, dropped
        self.staged = staged

    @property
    def nbytes(self) -> int:
        return self.staged.nbytes


def record_count(jobs: list) -> int:
    """How many records `jobs` hold: a Replay holds one per slot it keeps."""
    return sum(len(job.kept) if job.__class__ is Replay else 1 for job in jobs)


def join_json(first: str, second: str) -> str:
    """Two JSON objects with no key in common, as one."""
    if first == "{}":
        return second
    if second == "{}":
        return first
    return first[:-1] + "," + second[1:]


def record_json(job: Job) -> str:
    """A record's metadata as JSON, encoded once: the part its scope shares was encoded once for all."""
    if job.base_json is None:
        return meta_json(job.meta)
    meta = job.meta
    own = {key: meta[key] for key in RECORD_KEYS if key in meta}
    for key in job.own:
        own[key] = meta[key]
    return join_json(job.base_json, meta_json(own))
