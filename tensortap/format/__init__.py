"""The on-disk format: the only package that imports h5py (reader.py, opening.py, validate.py, segment.py).

Its names load on first use: schema, codecs and stats need only numpy, so a server whose writer
is a separate process (writer=process) never imports h5py through this package.
"""

import importlib

_EXPORTS = {
    "dtype_name": "codecs",
    "encode": "codecs",
    "to_float": "codecs",
    "to_numpy": "codecs",
    "to_torch": "codecs",
    "SegmentInfo": "reader",
    "SegmentReader": "reader",
    "is_segment": "reader",
    "list_segment_paths": "reader",
    "FORMAT_VERSION": "schema",
    "PendingRecord": "segment",
    "SegmentWriter": "segment",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tensortap.format' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tensortap.format.{module}"), name)
    globals()[name] = value
    return value


__all__ = sorted(_EXPORTS)
