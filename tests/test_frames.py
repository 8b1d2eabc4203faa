"""The BATCH frame: what the server sends is what the writer process reads, header cache included."""

import numpy as np

from tensortap.capture import frames


class FakeRing:
    """The shared ring's put(), over a numpy buffer the reader is given."""

    def __init__(self, size: int):
        self.buffer = np.zeros(size, np.uint8)  # [size]
        self.head = 0

    def put(self, array: np.ndarray) -> int:
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # [n]
        at = self.head
        self.buffer[at:at + flat.size] = flat
        self.head += flat.size + (-flat.size % 64)
        return at

    def view(self, at: int, array: np.ndarray) -> np.ndarray:
        return self.buffer[at:at + array.nbytes].view(array.dtype).reshape(array.shape)


def round_trip(records, ring=None):
    pieces = frames.batch_pieces(7, {"records": 3, "lost": 1}, records, ring)
    raw = b"".join(bytes(memoryview(p).cast("B")) for p in pieces)
    kind, count, length = frames._FRAME.unpack_from(raw, 0)
    body = np.frombuffer(raw[frames._FRAME.size:], np.uint8).copy()  # aligned, as read_frame makes it
    assert (kind, count, length) == (frames.BATCH, len(records), body.size)
    return frames.batch_records(count, memoryview(body), ring.buffer if ring is not None else None)


def test_arrays_of_one_name_with_other_shapes_and_dtypes_keep_their_own_headers():
    rng = np.random.default_rng(0)
    records = []
    for step in range(3):  # the second and third records reuse the headers the first one cached
        records.append((b'{"step":%d}' % step, True, {
            "stats:norm": rng.random((4, 3), dtype=np.float32),
            "stats:zeros": rng.integers(0, 9, (4, 3), dtype=np.int32),
        }))
        records.append((b'{"odd":1}', False, {"stats:norm": rng.random((5,), dtype=np.float64),  # the same name
                                              "stats:zeros": np.zeros((0, 3), np.int32)}))
    batch_id, totals, got = round_trip(records)
    assert batch_id == 7 and totals["records"] == 3 and totals["lost"] == 1
    assert len(got) == len(records)
    for (meta, full, arrays), (meta_b, full_b, arrays_b) in zip(records, got):
        assert meta.decode() == meta_b and full == full_b and arrays.keys() == arrays_b.keys()
        for key, array in arrays.items():
            assert arrays_b[key].dtype == array.dtype and arrays_b[key].shape == array.shape
            assert np.array_equal(arrays_b[key], array)


def test_large_arrays_go_through_the_ring_and_small_ones_inline():
    ring = FakeRing(4 << 20)
    big = np.arange(frames.RING_MIN // 4 + 3, dtype=np.int32)  # [N], past RING_MIN bytes
    middle = np.arange(3000, dtype=np.float32)  # 12 KB: inline, in a piece of its own
    small = np.arange(6, dtype=np.int16).reshape(2, 3)
    records = [(b"{}", True, {"data": big, "stats:a": small}), (b"{}", True, {"data": middle}),
               (b"{}", True, {"data": big[::-1].copy()})]
    _, _, got = round_trip(records, ring)
    assert np.shares_memory(records[0][2]["data"], ring.buffer) and records[0][2]["stats:a"] is small, \
        "an array copied into the ring is replaced by that copy in its record (its snapshot can be reused)"
    assert np.array_equal(got[0][2]["data"], big) and np.array_equal(got[0][2]["stats:a"], small)
    assert np.array_equal(got[1][2]["data"], middle)
    assert np.array_equal(got[2][2]["data"], big[::-1]), "a ring array's header is never reused"
