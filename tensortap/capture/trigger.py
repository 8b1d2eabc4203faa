"""Triggers and the flight recorder: keep the last steps in memory, write them when something fires.

With `trigger=` set, records are not written as they come. Every tap point that passes the filter
is snapshotted (full tensor) and gets one signal, a 0-dim int64 computed on the caller's stream:

    zero-heads     merged_out [T, H, D]: #{h : x[t, h, :] == 0 for every t}  (after the merge, every
                   head of a decode row has attention mass: an all-zero head there is the bug's mark)
    nonfinite      every float point but lse: #{NaN, +inf, -inf}
    empty-topk     topk [T, K]: #{t : idx[t, k] < 0 for every k}
    lse-nonfinite  lse: #{NaN, +inf}  (-inf is a legitimately masked shard)

A scope's signals are stacked and copied to pinned host memory without blocking (one copy, one
event); they are read once the event has passed (`event.query()`, polled at later scopes), so the
critical stream never waits: a trigger is seen a step or two late. `ring=M` keeps the snapshots of
the last M + LAG steps (bounded by `ring_bytes`, oldest steps dropped first). When a trigger fires at
step s, the recorder writes the kept steps s-M .. s, then every step up to s+K (`trigger_steps=K`)
as it comes, and one trigger record (point "trigger", meta `trigger` = which, where, when); then it
re-arms. See docs/flight-recorder.md.
"""

from __future__ import annotations

import collections
import time

import torch

LAG = 2  # steps a trigger may be seen late: the ring keeps this many steps beyond `ring`
FLOAT_POINTS = ("q", "partial_out", "merged_out", "attn_out", "o_proj_partial", "hidden")


def which(point: str, triggers: frozenset) -> str | None:
    """The trigger that watches records of `point`, if any (one per point)."""
    if point == "merged_out" and "zero-heads" in triggers:
        return "zero-heads"
    if point == "topk" and "empty-topk" in triggers:
        return "empty-topk"
    if point == "lse" and "lse-nonfinite" in triggers:
        return "lse-nonfinite"
    if point in FLOAT_POINTS and "nonfinite" in triggers:
        return "nonfinite"
    return None


def signal(trigger: str, x: torch.Tensor) -> torch.Tensor | None:
    """The count `trigger` watches in `x`, as a 0-dim int64 on x's device (None if it does not apply)."""
    if x.numel() == 0:
        return None
    if trigger == "zero-heads":
        if x.dim() != 3 or not x.is_floating_point():
            return None
        return (x.abs().amax(dim=(0, 2)) == 0).sum()  # [H] -> []
    if trigger == "empty-topk":
        if x.dim() != 2 or x.is_floating_point():
            return None
        return ((x >= 0).sum(dim=-1) == 0).sum()  # [T] -> []
    if not x.is_floating_point():
        return None
    if trigger == "lse-nonfinite":
        return (torch.isnan(x) | (x == float("inf"))).sum()  # []
    return (~torch.isfinite(x)).sum()  # []


def row_signal(trigger: str, x: torch.Tensor) -> torch.Tensor | None:
    """Per-row pieces of `signal(trigger, x)` for a tensor whose rows are tokens (inside a CUDA graph,
    where padding rows follow the real ones): [T, H] per-head absmax for zero-heads, [T] counts for the
    others. `reduce_rows` turns the rows < n of them into the signal of those rows alone."""
    if x.numel() == 0 or x.dim() < 1:
        return None
    if trigger == "zero-heads":
        if x.dim() != 3 or not x.is_floating_point():
            return None
        return x.abs().amax(dim=2)  # [T, H]
    if trigger == "empty-topk":
        if x.dim() != 2 or x.is_floating_point():
            return None
        return ((x >= 0).sum(dim=-1) == 0).long()  # [T]
    if not x.is_floating_point():
        return None
    flat = x.reshape(x.shape[0], -1)  # [T, N]
    if trigger == "lse-nonfinite":
        return (torch.isnan(flat) | (flat == float("inf"))).sum(dim=1)  # [T]
    return (~torch.isfinite(flat)).sum(dim=1)  # [T]


def reduce_rows(pieces: torch.Tensor, rows: int | None) -> torch.Tensor:
    """The signal of rows < `rows` (every row when None) from `row_signal`'s pieces: a 0-dim int64 on
    their device."""
    kept = pieces if rows is None else pieces[:rows]  # [n, H] or [n]
    if kept.dim() == 2:  # zero-heads: the heads whose absmax is 0 in every kept row
        if kept.shape[0] == 0:
            return torch.zeros((), dtype=torch.int64, device=kept.device)
        return (kept.amax(dim=0) == 0).sum()  # [H] -> []
    return kept.sum()  # []


class FlightRecorder:
    """Signals in flight, the ring of recent steps, and the after-trigger window."""

    def __init__(self, config, submit, write_trigger, counters, warn):
        self.triggers = config.trigger
        self.ring_steps = config.ring
        self.ring_bytes = config.ring_bytes
        self.after = config.trigger_steps
        self._submit = submit  # submit(jobs): hand jobs to the writer
        self._write_trigger = write_trigger  # write_trigger(info): the trigger record
        self._counters = counters
        self._warn = warn
        self._ring: collections.OrderedDict = collections.OrderedDict()  # step -> [jobs]
        self._ring_nbytes = 0
        self._inflight: collections.deque = collections.deque()  # (event or None, host [n], wheres)
        self._scope_signals: list = []  # (where, 0-dim tensor) of the scope being recorded
        self.fired: dict | None = None  # the trigger being served
        self.until: int | None = None  # last step of its after-window
        self.fires = 0

    # -- caller side ------------------------------------------------------------------------------------
    def note(self, where: dict, value: torch.Tensor) -> None:
        """One record's signal (0-dim int64, possibly still being computed on the device)."""
        self._scope_signals.append((where, value))

    def offer(self, step, jobs: list) -> None:
        """Snapshots of records of `step`: written inside an after-window, else kept in the ring."""
        if not jobs:
            return
        if self.until is not None and step is not None and step <= self.until:
            self._submit(jobs)
            return
        if self.until is not None and (step is None or step > self.until):
            self.until = None  # the window closed: re-armed
        if step is None:
            return
        kept = self._ring.setdefault(step, [])
        kept.extend(jobs)
        self._ring_nbytes += sum(job.staged.nbytes for job in jobs)
        oldest_kept = max(self._ring) - self.ring_steps - LAG
        while self._ring and next(iter(self._ring)) < oldest_kept:
            self._drop_oldest()
        while self._ring and self._ring_nbytes > self.ring_bytes:
            self._warn("ring_bytes", "tensortap: ring_bytes=%d holds fewer than the last ring=%d steps; the oldest "
                       "are dropped first", self.ring_bytes, self.ring_steps)
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, jobs = self._ring.popitem(last=False)
        self._ring_nbytes -= sum(job.staged.nbytes for job in jobs)

    def end_scope(self) -> None:
        """Scope exit: the scope's signals go to the host in one non-blocking copy; finished ones are read."""
        if self._scope_signals:
            wheres = [w for w, _ in self._scope_signals]
            values = torch.stack([v for _, v in self._scope_signals])  # [n] int64
            self._scope_signals = []
            if values.is_cuda:
                host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)  # [n]
                host.copy_(values, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(values.device))
                self._inflight.append((event, host, wheres))
            else:
                self._inflight.append((None, values, wheres))
        self.poll()

    def poll(self, wait: bool = False) -> None:
        """Evaluate every signal whose copy has landed (in order); `wait` (at close) waits for them."""
        while self._inflight:
            event, host, wheres = self._inflight[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            self._inflight.popleft()
            if self.until is not None:
                continue  # one trigger at a time: a window is being written
            for where, value in zip(wheres, host.tolist()):
                if value > 0:
                    self._fire(where, value)
                    break

    def _fire(self, where: dict, value: int) -> None:
        step = where.get("step")
        self.fires += 1
        self.fired = dict(where, value=int(value), fired_ns=time.time_ns(),
                          seen_at_step=max(self._ring) if self._ring else step)
        self.until = (step if step is not None else 0) + self.after
        low = (step if step is not None else 0) - self.ring_steps
        for kept_step in list(self._ring):
            jobs = self._ring.pop(kept_step)
            self._ring_nbytes -= sum(job.staged.nbytes for job in jobs)
            if low <= kept_step <= self.until:
                self._submit(jobs)
        self._write_trigger(self.fired)
