"""Targeted corruption of a dump, in place: rewrite one record's tensor (and its capture stats) or metadata."""

from __future__ import annotations

import json

import h5py
import torch

import tensortap
try:  # stats live next to the format (issue 13); older checkouts kept them in capture/
    from tensortap.format import stats as capture_stats
except ImportError:  # pragma: no cover
    from tensortap.capture import stats as capture_stats
from tensortap.format import schema
from tensortap.format.codecs import encode


def _rewrite_meta(f: h5py.File, seq: int, meta: dict) -> None:
    text = json.dumps(meta)
    records = f[schema.RECORDS_GROUP]
    if "batch" in meta:  # format 2: the record's entry in its batch's list
        batch = records[schema.batch_name(meta["batch"])]
        entries = json.loads(batch.attrs[schema.META_ATTR])
        entries[next(i for i, e in enumerate(entries) if e["seq"] == seq)] = meta
        batch.attrs[schema.META_ATTR] = json.dumps(entries)
    else:
        records[schema.record_group_name(seq)].attrs[schema.META_ATTR] = text
    index = f[schema.INDEX_DATASET + "_meta"]
    entries = list(index.asstr()[()])
    position = next(i for i, e in enumerate(entries) if json.loads(e)["seq"] == seq)
    index[position] = text


def rewrite_tensor(directory: str, point: str, change, **select) -> torch.Tensor:
    """Apply `change(tensor) -> tensor` to the one record matching; the stats follow as capture would compute them."""
    with tensortap.open(directory) as dump:
        rec = dump.record(point, **select)
        new = change(rec.tensor().clone())
    scalars, _ = capture_stats.compute(encode(new.contiguous())[0], rec.dtype, point, keep_arrays=False)
    raw = encode(new.contiguous())[0]
    with h5py.File(rec.path, "r+") as f:
        records = f[schema.RECORDS_GROUP]
        if "batch" in rec.meta:  # format 2: the record's bytes inside its batch
            offset, nbytes = rec.meta["at"]
            assert raw.nbytes == nbytes, "a rewrite keeps the tensor's dtype and shape"
            records[schema.batch_name(rec.meta["batch"])][offset:offset + nbytes] = raw.reshape(-1).view("u1")
        else:
            records[schema.record_group_name(rec.meta["seq"])][point][...] = raw
        _rewrite_meta(f, rec.meta["seq"], dict(rec.meta, stats=scalars))
    return new


def rewrite_meta(directory: str, update: dict, **select) -> int:
    """Update the metadata of every record matching `select`; returns how many."""
    with tensortap.open(directory) as dump:
        records = list(dump.iter(**select))
    for rec in records:
        with h5py.File(rec.path, "r+") as f:
            _rewrite_meta(f, rec.meta["seq"], dict(rec.meta, **update))
    return len(records)
