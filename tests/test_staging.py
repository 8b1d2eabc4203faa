"""The Stager's host pools (capture/staging.py): CPU snapshots copied into reused buffers, pinned
buffers shared by a to_host batch, both given back by `recycle` and bounded in bytes."""

import threading

import numpy as np
import pytest
import torch

from tensortap.capture import staging
from tensortap.capture.staging import MIN_PINNED_BYTES, FreeLists, Staged, Stager


def test_a_recycled_snapshot_buffer_is_reused_and_holds_the_new_values():
    stager = Stager()
    first = stager.stage({"data": torch.arange(12.0).view(3, 4)})  # [3, 4]
    buffer = first.tensors["data"]
    stager.recycle([first])
    assert first.tensors == {} and first.pooled == (), "a recycled record no longer reaches the buffer"
    second = stager.stage({"data": torch.full((3, 4), 7.0)})
    assert second.tensors["data"].data_ptr() == buffer.data_ptr(), "the buffer came back from the pool"
    assert torch.equal(second.tensors["data"], torch.full((3, 4), 7.0))
    third = stager.stage({"data": torch.ones(3, 4)})
    assert third.tensors["data"].data_ptr() != buffer.data_ptr(), "a buffer is handed out once"
    other = stager.stage({"data": torch.ones(3, 4, dtype=torch.float64)})
    assert other.tensors["data"].data_ptr() != buffer.data_ptr(), "free lists are per dtype and shape"


def test_a_snapshot_does_not_follow_later_writes_and_never_requires_grad():
    stager = Stager()
    stager.recycle([stager.stage({"data": torch.zeros(2, 3)})])  # a pooled buffer waits
    weights = torch.randn(2, 3, requires_grad=True)
    live = torch.randn(2, 3)
    staged = stager.stage({"data": weights, "meta:x": live})
    expected = live.clone()
    live.add_(1.0)
    with torch.no_grad():
        weights.mul_(0.0)
    assert not staged.tensors["data"].requires_grad and staged.tensors["data"].abs().sum() > 0
    assert torch.equal(staged.tensors["meta:x"], expected)
    assert staged.nbytes == 2 * 2 * 3 * 4


def test_non_contiguous_tensors_are_snapshotted_contiguous():
    stager = Stager()
    stager.recycle([stager.stage({"data": torch.zeros(4, 3)})])
    base = torch.arange(12.0).view(3, 4)
    staged = stager.stage({"data": base.t()})  # [4, 3], a transposed view: the pooled buffer's shape
    assert staged.tensors["data"].is_contiguous() and torch.equal(staged.tensors["data"], base.t())


def test_buffers_made_in_inference_mode_can_be_written_outside_it():
    stager = Stager()
    with torch.inference_mode():
        made = stager.stage({"data": torch.ones(5)})
    assert not made.tensors["data"].is_inference()
    stager.recycle([made])
    again = stager.stage({"data": torch.full((5,), 2.0)})  # outside inference mode, into that buffer
    assert torch.equal(again.tensors["data"], torch.full((5,), 2.0))
    stager.recycle([again])
    with torch.inference_mode():
        inside = stager.stage({"data": torch.full((5,), 3.0)})
    assert torch.equal(inside.tensors["data"], torch.full((5,), 3.0))


def test_recycling_twice_gives_the_buffer_back_once():
    stager = Stager()
    staged = stager.stage({"data": torch.zeros(8)})
    stager.recycle([staged])
    stager.recycle([staged])
    assert len(stager.snapshots) == 1


def test_the_pool_keeps_at_most_its_bound_and_frees_the_longest_unused_keys_first():
    pool = FreeLists(limit=1000)
    pool.give("old", torch.empty(400, dtype=torch.uint8), 400)
    pool.give("mid", torch.empty(400, dtype=torch.uint8), 400)
    assert pool.give("new", torch.empty(400, dtype=torch.uint8), 400)  # 1200 > 1000: "old" goes
    assert pool.take("old") is None and pool.take("mid") is not None and pool.kept <= 1000
    assert not pool.give("huge", torch.empty(2000, dtype=torch.uint8), 2000), "larger than the whole bound"
    assert pool.take("huge") is None


def test_taken_buffers_are_recounted_before_anything_is_evicted():
    pool = FreeLists(limit=1000)
    pool.give("a", torch.empty(500, dtype=torch.uint8), 500)
    pool.give("b", torch.empty(500, dtype=torch.uint8), 500)
    assert pool.take("a") is not None  # a caller took it: kept still says 1000 until the next give
    assert pool.give("c", torch.empty(500, dtype=torch.uint8), 500)
    assert pool.take("b") is not None, "the recount found room: nothing was evicted"
    assert pool.kept <= 1000


def test_the_snapshot_bound_is_a_constructor_argument():
    stager = Stager(snapshot_bytes=100)
    small, big = stager.stage({"data": torch.zeros(10)}), stager.stage({"data": torch.zeros(100)})  # 40, 400 bytes
    stager.recycle([small, big])
    assert len(stager.snapshots) == 1 and stager.snapshots.kept == 40


def test_caller_threads_taking_while_the_writer_gives_back_never_share_a_buffer():
    stager = Stager()
    handed: list = []
    overwritten: list = []
    lock = threading.Lock()

    def caller():
        for i in range(300):
            staged = stager.stage({"data": torch.full((16,), float(i))})
            with lock:
                handed.append(staged)

    def writer():
        for _ in range(300):
            with lock:
                batch, handed[:] = list(handed[: len(handed) // 2]), handed[len(handed) // 2:]
            for staged in batch:
                values = staged.tensors["data"]
                if not torch.equal(values, values[:1].expand(16)):
                    overwritten.append(values.clone())
            stager.recycle(batch)

    threads = [threading.Thread(target=caller) for _ in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overwritten, "a snapshot changed while its record was live"
    live = [staged.tensors["data"].data_ptr() for staged in handed]
    assert len(live) == len(set(live)), "a buffer held by two live records"


@pytest.fixture
def fake_pinned(monkeypatch):
    """Pinned allocations as ordinary host memory (no CUDA here): the lease logic is the same."""
    made = []

    def empty(nbytes):
        made.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    monkeypatch.setattr(staging, "pinned_empty", empty)
    return made


def test_pinned_buffers_come_in_power_of_two_size_classes(fake_pinned):
    stager = Stager()
    assert stager.pinned_lease(1, holders=1).size == MIN_PINNED_BYTES
    assert stager.pinned_lease(MIN_PINNED_BYTES + 1, holders=1).size == 2 * MIN_PINNED_BYTES
    assert stager.pinned_lease(1 << 20, holders=1).size == 1 << 20
    assert fake_pinned == [MIN_PINNED_BYTES, 2 * MIN_PINNED_BYTES, 1 << 20]


def test_a_batchs_pinned_buffer_returns_when_its_last_record_is_recycled(fake_pinned):
    stager = Stager()
    lease = stager.pinned_lease(3000, holders=2)
    records = [Staged({"data": torch.empty(3)}), Staged({"data": torch.empty(3)})]
    for r in records:
        r.tensors, r.stream = {"data": torch.zeros(1000, dtype=torch.uint8)}, "a stream"  # as to_host sees them
    staging.attach(records, lease)
    assert records[1].tensors["data"].data_ptr() == lease.buffer.data_ptr() + 1008, "16-byte aligned, in order"
    stager.recycle([records[0]])
    assert len(stager.pinned) == 0, "the other record still reads the buffer"
    stager.recycle([records[1]])
    assert len(stager.pinned) == 1 and records[1].tensors == {}
    again = stager.pinned_lease(5000, holders=1)
    assert again.buffer.data_ptr() == lease.buffer.data_ptr() and len(fake_pinned) == 1


def test_stats_parts_are_attached_as_numpy_views_and_data_as_torch(fake_pinned):
    """The writer reads small parts through numpy (cheap views); "data" keeps its torch dtype."""
    stager = Stager()
    lease = stager.pinned_lease(4096, holders=1)
    lease.buffer[:4096] = torch.arange(4096) % 251
    record = Staged({})
    record.tensors, record.stream = {"data": torch.zeros(3, dtype=torch.bfloat16),
                                     "part:hash": torch.zeros(2, 1, 1, dtype=torch.int64),
                                     "part:absmax": torch.zeros(2, 1, 1, dtype=torch.bfloat16)}, "a stream"
    staging.attach([record], lease)
    data, digest, absmax = (record.tensors[k] for k in ("data", "part:hash", "part:absmax"))
    assert isinstance(data, torch.Tensor) and data.dtype == torch.bfloat16
    assert isinstance(digest, np.ndarray) and digest.shape == (2, 1, 1) and digest.dtype == np.int64
    assert digest.ctypes.data == lease.buffer.data_ptr() + 16, "a view at its aligned offset, not a copy"
    assert np.array_equal(digest.reshape(-1).view(np.uint8), lease.buffer[16:32].numpy())
    assert isinstance(absmax, torch.Tensor) and absmax.dtype == torch.bfloat16, "no numpy bf16: torch"


def test_the_pinned_bound_is_a_constructor_argument(fake_pinned):
    stager = Stager(pinned_bytes=MIN_PINNED_BYTES)
    first, second = stager.pinned_lease(10, holders=1), stager.pinned_lease(MIN_PINNED_BYTES + 1, holders=1)
    for lease in (first, second):
        staged = Staged({})
        staged.lease = lease
        stager.recycle([staged])
    assert len(stager.pinned) == 1 and stager.pinned.kept == MIN_PINNED_BYTES


def test_on_host_runs_on_the_host_tensors_once():
    stager = Stager()
    staged = Staged({"part:hash": torch.tensor(5, dtype=torch.int64)})
    calls = []
    staged.on_host = lambda tensors: calls.append(1) or {"stats:hash": tensors["part:hash"].view(1)}
    stager.to_host([staged])
    stager.to_host([staged])
    assert calls == [1] and torch.equal(staged.tensors["stats:hash"], torch.tensor([5]))


@pytest.mark.gpu
def test_to_host_reuses_the_recycled_pinned_buffer_bit_exact():
    stager = Stager()
    pointers = []
    for step in range(3):
        x = torch.randn(64, 128, device="cuda").bfloat16()  # [T, W]
        idx = torch.randint(-1, 100, (64, 7), device="cuda", dtype=torch.int32)  # odd byte count: padding
        batch = [stager.stage({"data": x}), stager.stage({"data": idx})]
        Stager.mark_ready(batch)
        stager.to_host(batch)
        assert torch.equal(batch[0].tensors["data"].view(torch.int16), x.cpu().view(torch.int16))
        assert torch.equal(batch[1].tensors["data"], idx.cpu())
        assert batch[0].lease is batch[1].lease and batch[0].lease.buffer.is_pinned()
        pointers.append(batch[0].lease.buffer.data_ptr())
        stager.recycle(batch)
    assert pointers[0] == pointers[1] == pointers[2], "one pinned buffer, reused"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.int32, torch.float32])
def test_contiguous_snapshots_are_exact_byte_copies_of_offset_views(dtype):
    """Contiguous tensors are copied with one memmove (no intra-op threads): from the view's own offset,
    every byte, fresh or pooled buffer alike; an empty tensor copies nothing."""
    stager = Stager()
    base = torch.randn(5, 64).to(dtype)  # [5, 64]
    view = base[2:4]  # [2, 64], contiguous, at an offset into its storage
    for _ in range(2):  # a fresh buffer, then the recycled one
        staged = stager.stage({"data": view})
        snap = staged.tensors["data"]
        assert snap.data_ptr() != view.data_ptr()
        assert snap.view(torch.uint8).tolist() == view.view(torch.uint8).tolist()
        stager.recycle([staged])
    empty = stager.stage({"data": torch.empty(0, 64, dtype=dtype)}).tensors["data"]
    assert empty.shape == (0, 64) and empty.dtype == dtype


def test_the_callers_pooled_lease_never_allocates_and_asks_the_writer_side_for_one(fake_pinned):
    stager = Stager()
    assert stager.pooled_lease(3000, holders=1) is None and fake_pinned == [], "the caller allocates no pinned memory"
    assert stager.wanted == {MIN_PINNED_BYTES}
    stager.to_host([])  # the writer side's next batch adds one of that size class to the pool
    assert fake_pinned == [MIN_PINNED_BYTES] and stager.wanted == set()
    lease = stager.pooled_lease(3000, holders=1)
    assert lease is not None and lease.size == MIN_PINNED_BYTES and len(stager.pinned) == 0
    assert stager.pooled_lease(3000, holders=1) is None, "the one pooled buffer is leased"
