"""The on-disk format: the only package that imports h5py."""

from tensortap.format.codecs import dtype_name, encode, to_float, to_numpy, to_torch
from tensortap.format.reader import SegmentInfo, SegmentReader, is_segment, list_segment_paths
from tensortap.format.schema import FORMAT_VERSION
from tensortap.format.segment import PendingRecord, SegmentWriter

__all__ = [
    "FORMAT_VERSION",
    "PendingRecord",
    "SegmentInfo",
    "SegmentReader",
    "SegmentWriter",
    "dtype_name",
    "encode",
    "is_segment",
    "list_segment_paths",
    "to_float",
    "to_numpy",
    "to_torch",
]
