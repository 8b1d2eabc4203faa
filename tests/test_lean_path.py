"""The lean record path (Tap.lean_record): a CPU point in a kept scope costs its snapshot and a tuple;
the writer side builds its record. Every record it writes must be the one the full path writes."""

import json
import logging

import pytest
import torch

import tensortap
from tensortap.capture import runtime
from tensortap.capture.job import Job, meta_json, record_json
from tensortap.capture.state import CLONE_NUMEL
from tensortap.capture.tap import Tap
from tensortap.format import schema

WHERE_AND_WHEN = set(schema.LOCATION_FIELDS) | {"time_ns"}  # where the segment put its bytes, and the clock

SCOPE = dict(step=3, role="draft", tp_rank=0, tp_size=4, dcp_size=4, seq_lens=[4101, 3001],
             local_seq_lens=[1026, 751], req_ids=[0, 1], softmax_scale=0.07, kv_format="fp8_ds_mla")


@pytest.fixture
def expanded(monkeypatch):
    """How many records the writer side built from lean tuples."""
    count = []
    original = Tap.expand

    def expand(self, lean):
        count.append(lean[2])
        return original(self, lean)

    monkeypatch.setattr(Tap, "expand", expand)
    return count


def capture_sequence(directory: str, writer: str, lean: bool) -> None:
    """The same calls, lean or forced through the full path: warm-up scope, then every kind of point."""
    tensortap.configure(dir=directory, writer=writer)
    if not lean:
        runtime._tap._lean_config = False
    big = torch.arange(CLONE_NUMEL + 5, dtype=torch.float32)  # [N]: the pooled snapshot
    for step in range(3):
        with tensortap.scope(**dict(SCOPE, step=step)):
            with tensortap.scope(layer=78, head_offset=0):
                tensortap.point("layers.78.attn.lse", torch.full((2, 4), float(step)), head_offset=8)  # over the scope's
            tensortap.point("layers.78.attn.q", torch.arange(64.0).view(2, 4, 8) + step, head_offset=0)
            tensortap.point("layers.78.attn.topk", torch.tensor([[3, -1], [-1, -1]]) + step)
            strided = torch.arange(12.0).view(3, 4).t()  # [4, 3], not contiguous
            tensortap.point("layers.78.attn.hidden", strided)
            tensortap.point("layers.78.attn.merged_out", torch.ones(2, 4, 8).bfloat16() * step, head_offset=0)
            mutated = big.clone()
            tensortap.point("layers.78.attn.o_proj_partial", mutated)
            mutated.add_(1000)  # after the call: the record keeps the values it was called with
            small = torch.zeros(2, 3)
            tensortap.point("layers.78.attn.attn_out", small, head_offset=0)
            small.fill_(7)
    tensortap.close()


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_lean_records_are_the_records_of_the_full_path(tmp_path, writer, expanded):
    capture_sequence(str(tmp_path / "lean"), writer, lean=True)
    assert len(expanded) >= 14, "after the first scope the points took the lean path"
    lean_count = len(expanded)
    capture_sequence(str(tmp_path / "full"), writer, lean=False)
    assert len(expanded) == lean_count, "forced off, no record is lean"
    lean, full = tensortap.open(str(tmp_path / "lean")), tensortap.open(str(tmp_path / "full"))
    assert len(lean) == len(full) == 21
    for a, b in zip(sorted(lean, key=lambda r: r.meta["seq"]), sorted(full, key=lambda r: r.meta["seq"])):
        meta_a = {k: v for k, v in a.meta.items() if k not in WHERE_AND_WHEN}
        meta_b = {k: v for k, v in b.meta.items() if k not in WHERE_AND_WHEN}
        assert meta_a == meta_b
        assert torch.equal(a.tensor().view(torch.uint8), b.tensor().view(torch.uint8))
    by_point = {(r.point, r.step): r for r in lean}
    assert by_point[("lse", 1)].meta["head_offset"] == 8, "the point's value wins over its scope's"
    assert by_point[("lse", 1)].meta["layer"] == 78
    assert by_point[("o_proj_partial", 2)].tensor()[-1] == CLONE_NUMEL + 4, "snapshot taken at the call"
    assert not by_point[("attn_out", 2)].tensor().any(), "snapshot taken at the call"
    assert by_point[("hidden", 0)].tensor().tolist() == torch.arange(12.0).view(3, 4).t().tolist()
    assert by_point[("q", 2)].meta["seq_lens"] == [4101, 3001]


def test_a_dtype_the_format_cannot_store_is_an_error_on_the_writer_side(tmp_path, caplog, expanded):
    tensortap.configure(dir=str(tmp_path), writer="thread")
    with caplog.at_level(logging.ERROR, logger="tensortap"):
        for step in range(3):
            with tensortap.scope(step=step):
                tensortap.point("layers.0.attn.lse", torch.ones(2, 2))
                tensortap.point("layers.0.attn.q", torch.ones(2, 2, dtype=torch.complex64))
                tensortap.point("layers.0.attn.hidden", torch.ones([1] * 9))
        tensortap.close()
    assert "layers.0.attn.q" in expanded and "layers.0.attn.hidden" in expanded, "they took the lean path"
    counters = tensortap.stats()
    assert counters["errors"] == 6 and counters["records"] == 3
    assert sorted(r.point for r in tensortap.open(str(tmp_path))) == ["lse"] * 3
    assert sum("failed" in r.getMessage() for r in caplog.records) == 1, "said once"


def test_a_value_not_seen_valid_is_still_validated(tmp_path, expanded):
    tensortap.configure(dir=str(tmp_path), writer="thread")
    for value in (0, 0, 0, True, 2 ** 70, 4):
        with tensortap.scope(step=1):
            tensortap.point("layers.0.attn.lse", torch.ones(2, 2), head_offset=value)
    tensortap.close()
    offsets = [r.meta.get("head_offset") for r in sorted(tensortap.open(str(tmp_path)), key=lambda r: r.meta["seq"])]
    assert offsets == [0, 0, 0, None, None, 4], "bool and out-of-range values dropped, the record kept"
    assert tensortap.stats()["errors"] == 2
    assert len(expanded) >= 1


def test_step_role_and_rank_in_a_point_still_decide_the_filter(tmp_path, expanded):
    tensortap.configure(dir=str(tmp_path), writer="thread", steps="1", roles="target")
    for _ in range(4):
        with tensortap.scope(step=1, role="target"):
            tensortap.point("layers.0.attn.lse", torch.ones(2))
            tensortap.point("layers.0.attn.lse", torch.ones(2), step=5)
            tensortap.point("layers.0.attn.lse", torch.ones(2), role="draft")
    tensortap.close()
    d = tensortap.open(str(tmp_path))
    assert len(d) == 4 and {(r.step, r.role) for r in d} == {(1, "target")}
    assert len(expanded) >= 3


def test_after_a_writer_failure_points_are_counted_lost(tmp_path, expanded):
    tensortap.configure(dir=str(tmp_path), writer="thread")
    for _ in range(2):
        with tensortap.scope(step=1):
            tensortap.point("layers.0.attn.lse", torch.ones(2))
    tensortap.flush()
    tap = runtime._tap
    tap.writer._fail(OSError("the disk went away"), lost_now=0)
    assert not tap.lean_ready
    before = len(expanded)
    for _ in range(5):
        with tensortap.scope(step=1):
            tensortap.point("layers.0.attn.lse", torch.ones(2))
    assert len(expanded) == before, "no snapshot for a writer that has stopped"
    assert tensortap.stats()["lost"] == 5


def test_record_json_is_the_whole_metadata():
    base = {"step": 3, "role": "draft", "seq_lens": [1, 2], "layer": 7, "softmax_scale": float("nan")}
    base_json = meta_json({k: v for k, v in base.items() if k != "layer"})
    own = {"name": "layers.7.attn.lse", "point": "lse", "layer": 7, "seq": 4, "time_ns": 5, "dropped_before": 0,
           "dtype": "float32", "shape": [2]}
    meta = dict(base, **own, head_offset=8)
    text = record_json(Job(meta, None, True, base_json, ("head_offset",)))
    decoded = json.loads(text)
    assert decoded.keys() == meta.keys() and decoded["softmax_scale"] != decoded["softmax_scale"]
    assert {k: v for k, v in decoded.items() if k != "softmax_scale"} == \
        {k: v for k, v in meta.items() if k != "softmax_scale"}
    assert json.loads(record_json(Job(dict(own), None, True, "{}"))) == own, "a scope with no metadata"
    assert json.loads(record_json(Job({"step": 1}, None, True, '{"step":1}'))) == {"step": 1}, "no own keys"
    assert json.loads(record_json(Job(meta, None, True))) == json.loads(meta_json(meta)), "no scope part"


def test_list_metadata_and_sparse_tensors_take_the_full_path_and_lose_nothing(tmp_path):
    tensortap.configure(dir=str(tmp_path), writer="thread")
    for step in range(3):
        with tensortap.scope(step=step):
            tensortap.point("layers.0.attn.q", torch.zeros(4), seq_lens=[1, 2], page_ids=(3, 4))
            tensortap.point("layers.0.attn.lse", torch.eye(3).to_sparse())  # the format cannot store it
            tensortap.point("layers.0.attn.hidden", torch.ones(4))
    tensortap.close()
    d = tensortap.open(str(tmp_path))
    assert sorted((r.point, r.step) for r in d) == sorted([("q", s) for s in range(3)] + [("hidden", s) for s in range(3)])
    assert all(r.meta["seq_lens"] == [1, 2] and r.meta["page_ids"] == [3, 4] for r in d if r.point == "q")
    counters = tensortap.stats()
    assert counters["errors"] == 3 and counters["lost"] == 0


def test_stats_and_stored_given_by_a_caller_are_dropped_with_one_message(tmp_path, caplog):
    for writer in ("thread", "process"):
        tensortap.configure(dir=str(tmp_path / writer), writer=writer, mode="stats")
        with caplog.at_level(logging.ERROR, logger="tensortap"):
            for step in range(3):
                with tensortap.scope(step=step, stored=True):
                    tensortap.point("layers.0.attn.lse", torch.ones(2, 2), stats={"x": 1})
            tensortap.close()
        records = list(tensortap.open(str(tmp_path / writer)))
        assert len(records) == 3 and all(r.meta["stored"] is False and "x" not in r.meta["stats"] for r in records)
        assert tensortap.stats()["errors"] == 6
    assert sum("written by the writer" in r.getMessage() for r in caplog.records) == 4, "once per key and run"


def test_a_batch_larger_than_the_queue_is_cut_as_before(tmp_path):
    """The whole-batch hand-over takes the fast path only when all of it fits under queue_bytes."""
    import threading

    from tensortap.capture import writer as writer_module
    from tensortap.capture.job import Job
    from tensortap.capture.staging import Staged, Stager

    counters = writer_module.Counters()
    never = threading.Event()  # the writer thread waits for its sink for ever: the queue stays as submitted
    writer = writer_module.Writer(never.wait, Stager(), 1000, "drop", counters)
    writer.submit([Job({}, Staged({"data": torch.zeros(100)}), True) for _ in range(10)])  # 400 bytes each
    assert counters.dropped == 8 and writer._queued_bytes == 800


def test_metadata_json_cannot_encode_costs_its_records_not_the_capture(tmp_path, caplog):
    tensortap.configure(dir=str(tmp_path), writer="thread")
    looped = []
    looped.append(looped)  # a list that contains itself: JSON cannot encode it
    with caplog.at_level(logging.ERROR, logger="tensortap"):
        for step in range(3):
            with tensortap.scope(step=step, note=looped if step == 1 else [step]):
                tensortap.point("layers.0.attn.lse", torch.ones(2))
        with tensortap.scope(step=9):
            tensortap.point("layers.0.attn.lse", torch.ones(2))
        tensortap.close()
    assert sorted(r.step for r in tensortap.open(str(tmp_path))) == [0, 2, 9]
    assert tensortap.stats()["errors"] >= 1
