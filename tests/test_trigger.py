"""The flight recorder: a clean run with one bad step dumps exactly the ring before, the window after,
and one trigger record; nothing else is written."""

import collections

import pytest
import torch

import tensortap
from tensortap.capture import runtime, trigger
from tensortap.errors import TapConfigError

M, K, BAD = 3, 2, 6


def run_steps(steps=12, bad=BAD, layer=78, poison=None):
    torch.manual_seed(0)
    for step in range(steps):
        with tensortap.scope(step=step, role="draft", spec_pos=0):
            merged = torch.randn(2, 4, 8)  # [T, H, 512-ish]
            lse = torch.randn(2, 4)  # [T, H]
            topk = torch.arange(6, dtype=torch.int32).view(2, 3)  # [T, K]
            if step == bad:
                (poison or (lambda m, l, t: m[:, 2].zero_()))(merged, lse, topk)
            tensortap.point(f"layers.{layer}.attn.topk", topk)
            tensortap.point(f"layers.{layer}.attn.lse", lse)
            tensortap.point(f"layers.{layer}.attn.merged_out", merged)


def steps_written(d):
    return sorted({r.step for r in d if r.point != "trigger"})


def test_one_zero_head_step_dumps_the_ring_the_window_and_the_trigger(tap_dir):
    tensortap.configure(dir=tap_dir, trigger="zero-heads", ring=M, trigger_steps=K)
    run_steps()
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert steps_written(d) == list(range(BAD - M, BAD + K + 1))
    assert all(r.stored for r in d), "the kept steps are full tensors"
    assert sorted(d.points) == ["lse", "merged_out", "topk", "trigger"]
    fired = [r for r in d if r.point == "trigger"]
    assert len(fired) == 1
    info = fired[0].meta["trigger"]
    assert info["trigger"] == "zero-heads" and info["point"] == "merged_out" and info["layer"] == 78
    assert info["step"] == BAD and info["role"] == "draft" and info["value"] == 1 and fired[0].step == BAD
    bad = d.get("merged_out", step=BAD)
    assert float(bad[:, 2].abs().sum()) == 0.0 and float(bad[:, 1].abs().sum()) > 0


def test_a_trigger_seen_two_steps_late_still_gets_the_steps_before(tap_dir):
    """On a GPU the signals land a step or two later; the ring keeps LAG extra steps to cover that."""

    clock = [0]  # scopes ended so far: a signal's copy lands LAG scopes after it was issued

    class Late:
        def __init__(self):
            self.due = clock[0] + trigger.LAG

        def query(self):
            return clock[0] >= self.due

        def synchronize(self):
            self.due = clock[0]

    class LateDeque(collections.deque):
        def append(self, item):
            clock[0] += 1
            super().append((Late(), item[1], item[2]))

    tensortap.configure(dir=tap_dir, trigger="zero-heads", ring=M, trigger_steps=K)
    runtime._tap.recorder._inflight = LateDeque()
    run_steps()
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert steps_written(d) == list(range(BAD - M, BAD + K + 1))
    assert [r.meta["trigger"]["step"] for r in d if r.point == "trigger"] == [BAD]


@pytest.mark.parametrize("name, poison, point", [
    ("nonfinite", lambda m, l, t: m.__setitem__((0, 0, 0), float("nan")), "merged_out"),
    ("lse-nonfinite", lambda m, l, t: l.__setitem__((1, 1), float("inf")), "lse"),
    ("empty-topk", lambda m, l, t: t[1].fill_(-1), "topk"),
])
def test_each_trigger_fires_on_its_condition(tap_dir, name, poison, point):
    tensortap.configure(dir=tap_dir, trigger=name, ring=1, trigger_steps=0)
    run_steps(poison=poison)
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert steps_written(d) == [BAD - 1, BAD]
    (fired,) = [r.meta["trigger"] for r in d if r.point == "trigger"]
    assert fired["trigger"] == name and fired["point"] == point


def test_a_clean_run_writes_nothing_and_masked_lse_is_not_a_trigger(tap_dir):
    tensortap.configure(dir=tap_dir, trigger="zero-heads,lse-nonfinite,empty-topk", ring=2)
    run_steps(poison=lambda m, l, t: l.__setitem__((0, 0), float("-inf")))  # a masked shard: legitimate
    tensortap.close()
    assert tensortap.stats()["records"] == 0


def test_ring_bytes_bounds_the_ring(tap_dir, caplog):
    tensortap.configure(dir=tap_dir, trigger="zero-heads", ring=5, ring_bytes=600, trigger_steps=0)
    run_steps()  # one step snapshots 48 + 32 + 256 bytes: the ring holds one step, not five
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert steps_written(d) == [BAD]
    assert any("ring_bytes" in r.getMessage() for r in caplog.records)


def test_signals_match_their_definitions():
    x = torch.randn(3, 4, 5)
    x[:, 1] = 0
    x[0, 2] = 0  # zero in one token only: not a zero head
    assert int(trigger.signal("zero-heads", x)) == 1
    x[1, 0, 0] = float("-inf")
    assert int(trigger.signal("nonfinite", x)) == 1 and int(trigger.signal("lse-nonfinite", x)) == 0
    idx = torch.tensor([[-1, -1], [0, -1], [-1, -1]], dtype=torch.int32)
    assert int(trigger.signal("empty-topk", idx)) == 2
    assert trigger.signal("zero-heads", torch.zeros(0, 4, 5)) is None
    assert trigger.which("merged_out", frozenset({"zero-heads", "nonfinite"})) == "zero-heads"
    assert trigger.which("kv_pages", frozenset(trigger.FLOAT_POINTS)) is None


def test_trigger_keys_are_validated():
    with pytest.raises(TapConfigError, match="trigger"):
        tensortap.configure(dir="/tmp/x", trigger="zero-head")
    with pytest.raises(TapConfigError, match="ring"):
        tensortap.configure(dir="/tmp/x", ring="many")


def test_check_reports_the_trigger_as_a_note_not_as_a_forward(tap_dir):
    tensortap.configure(dir=tap_dir, trigger="zero-heads", ring=M, trigger_steps=K)
    run_steps()
    tensortap.close()
    report = tensortap.check(tensortap.open(tap_dir))
    notes = [n for n in report.notes if n.startswith("flight recorder")]
    assert len(notes) == 1 and "zero-heads" in notes[0] and f"step {BAD}" in notes[0] and "layer 78" in notes[0]
    assert report.forwards == len(range(BAD - M, BAD + K + 1)), "the trigger record is not a forward of its own"


def test_with_no_ring_the_trigger_step_itself_is_still_written(tap_dir):
    tensortap.configure(dir=tap_dir, trigger="zero-heads", trigger_steps=K)  # ring=0, the default
    run_steps()
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert steps_written(d) == list(range(BAD, BAD + K + 1)), "the step that fired is in the dump"
    bad = d.get("merged_out", step=BAD)
    assert float(bad[:, 2].abs().sum()) == 0.0


@pytest.mark.parametrize("name, make", [
    ("zero-heads", lambda: torch.randn(6, 4, 8)),
    ("nonfinite", lambda: torch.randn(6, 16)),
    ("lse-nonfinite", lambda: torch.randn(6, 4)),
    ("empty-topk", lambda: torch.randint(-1, 3, (6, 3), dtype=torch.int32)),
])
def test_row_signals_of_the_real_rows_equal_the_signal_of_those_rows(name, make):
    """Inside a CUDA graph a watched point keeps per-row pieces; reduced over rows < n they give exactly
    the signal of x[:n] (n = num_tokens), and over every row the signal of x."""
    torch.manual_seed(1)
    for trial in range(20):
        x = make()
        if x.is_floating_point():
            x[torch.rand(x.shape) < 0.1] = 0.0
            x[torch.rand(x.shape) < 0.05] = float("nan")
            x[torch.rand(x.shape) < 0.05] = float("inf")
            if name == "zero-heads":
                x[:, trial % 4] = 0.0 if trial % 3 else x[:, trial % 4]
        pieces = trigger.row_signal(name, x)
        assert int(trigger.reduce_rows(pieces, None)) == int(trigger.signal(name, x))
        for n in (0, 1, 4):
            expected = trigger.signal(name, x[:n]) if n else None
            assert int(trigger.reduce_rows(pieces, n)) == (int(expected) if expected is not None else 0), (n, trial)
