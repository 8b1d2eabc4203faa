"""Token accounting: every selected token consumed exactly once, by its owner, at its slot.

For query row t of request q (seq_len L_q) and a selected global id g = topk[t, k], under the
cache's actual sharding (N = kv_dcp_size, I = interleave, bs = block_size; layout.py):

    valid(g)     = 0 <= g < L_q
    expected_r   = owned_slots(g) on rank r   (block_table[q, local(g) // bs] * bs + local(g) % bs,
                                                -1 unless owner(g) == r and valid(g))
    consumed_r   = slots[t, k] on rank r      (filter/convert keeps the position k)

    dropped      expected_r >= 0, consumed_r < 0        (the owner skipped a token it holds)
    misplaced    both >= 0, consumed_r != expected_r      (read from the wrong address)
    foreign      expected_r < 0, consumed_r >= 0          (not its token, or past the length)
    duplicated   a slot consumed twice in one row, or a valid token consumed by two ranks

and the recorded local_seq_lens against the formula from seq_lens:
    local_len(L, r) = base + clip(L - base*N - r*I, 0, I),  base = L // I // N * I

When anything is off, the likely cause is named by trying what the converter might have used
instead: another interleave, DCP size, DCP rank or block size that reproduces the consumed slots
exactly; or a local length short by m (every dropped token among the last m of its request on
that rank); or recorded local lengths off the formula.
"""

from __future__ import annotations

import numpy as np

from tensortap.analysis import layout
from tensortap.analysis.detectors import local_len
from tensortap.analysis.findings import Finding
from tensortap.analysis.forward import Forward
from tensortap.text import span

CODE = "token-accounting"
EXAMPLES = 3


class _Rank:
    """One rank's selection, consumed slots and sharding."""

    def __init__(self, rank: int, topk: np.ndarray, slots: np.ndarray, table: np.ndarray, meta: dict,
                 requests: np.ndarray):
        self.rank, self.topk, self.slots, self.table, self.meta, self.requests = rank, topk, slots, table, meta, requests
        self.n = int(meta.get("kv_dcp_size") or meta.get("group_dcp_size") or 1)
        self.r = int(meta.get("group_dcp_rank") or 0)
        self.interleave = int(meta.get("interleave") or 1)
        self.block_size = int(meta.get("block_size") or 1)
        self.seq_lens = np.asarray(meta.get("seq_lens") or [], dtype=np.int64)  # [R]

    def valid(self) -> np.ndarray:
        """[T, K] selected ids that exist: 0 <= g < L of the row's request."""
        lengths = self.seq_lens[self.requests][:, None]  # [T, 1]
        return (self.topk >= 0) & (self.topk < lengths)  # [T, K]

    def slots_under(self, n: int, r: int, interleave: int, block_size: int, valid: np.ndarray) -> np.ndarray:
        ids = np.where(valid, self.topk, -1)  # [T, K]
        return layout.owned_slots(ids, self.requests, self.table, block_size, n, r, interleave)  # [T, K]


def token_accounting(fw: Forward) -> list[Finding]:
    findings = []
    for group in fw.dcp_groups():
        members = []
        for rank in group:
            found = _load(fw, rank)
            if found is not None:
                members.append(found)
        for m in members:
            f = _account(fw, m)
            if f is not None:
                findings.append(f)
        cross = _consumed_twice(fw, members)
        if cross is not None:
            findings.append(cross)
    return findings


def _load(fw: Forward, rank: int) -> _Rank | None:
    if any(fw.record(p, rank) is None for p in ("topk", "slots", "block_table")):
        if fw.record("slots", rank) is not None or fw.record("topk", rank) is not None:
            fw.skip(CODE, "topk, slots and block_table not all captured")
        return None
    topk, slots, table = fw.array("topk", rank), fw.array("slots", rank), fw.array("block_table", rank)
    if topk is None or slots is None or table is None:
        fw.needs_tensors(CODE, "topk/slots/block_table", rank)
        return None
    meta = fw.meta(rank)
    if topk.shape != slots.shape or topk.ndim != 2 or table.ndim != 2:
        fw.skip(CODE, f"rank {rank}: topk {list(topk.shape)} and slots {list(slots.shape)} do not pair up", gap=True)
        return None
    requests = layout.rows_to_requests(meta, topk.shape[0])
    seq_lens = meta.get("seq_lens") or []
    if requests is None or not meta.get("block_size"):
        fw.skip(CODE, "query rows cannot be mapped to requests (record req_ids, seq_lens and block_size)")
        return None
    if len(requests) and (requests.max() >= min(len(seq_lens), table.shape[0]) or requests.min() < 0):
        fw.skip(CODE, f"rank {rank}: req_ids point past seq_lens or the block table", gap=True)
        return None
    if table.shape[1] == 0:
        fw.skip(CODE, f"rank {rank}: the block table is empty", gap=True)
        return None
    return _Rank(rank, topk, slots, table, meta, requests)


def _account(fw: Forward, m: _Rank) -> Finding | None:
    valid = m.valid()  # [T, K]
    expected = m.slots_under(m.n, m.r, m.interleave, m.block_size, valid)  # [T, K]
    consumed = m.slots  # [T, K]
    dropped = (expected >= 0) & (consumed < 0)  # [T, K]
    misplaced = (expected >= 0) & (consumed >= 0) & (consumed != expected)  # [T, K]
    foreign = (expected < 0) & (consumed >= 0)  # [T, K]
    dup = _duplicates(consumed)  # [T, K]
    formula = local_len(m.seq_lens, m.n, m.r, m.interleave)  # [R]
    recorded = m.meta.get("local_seq_lens")
    lengths_off = recorded is not None and (len(recorded) != len(formula) or
                                            not np.array_equal(np.asarray(recorded, dtype=np.int64), formula))
    counts = {"dropped": int(dropped.sum()), "misplaced": int(misplaced.sum()), "foreign": int(foreign.sum()),
              "duplicated": int(dup.sum())}
    if not any(counts.values()) and not lengths_off:
        return None
    cause, op = _cause(m, valid, dropped, formula, recorded if lengths_off else None)
    words = {"dropped": "dropped", "misplaced": "read at the wrong slot", "foreign": "consumed although not its own",
             "duplicated": "consumed twice"}
    parts = [f"{n} {words[what]}" for what, n in counts.items() if n]
    examples = {what: _examples(m, mask, expected) for what, mask in
                (("dropped", dropped), ("misplaced", misplaced), ("foreign", foreign), ("duplicated", dup)) if mask.any()}
    evidence = dict(counts, selected=int(valid.sum()), owned=int((expected >= 0).sum()),
                    consumed=int((consumed >= 0).sum()), examples=examples,
                    sharding={"kv_dcp_size": m.n, "dcp_rank": m.r, "interleave": m.interleave,
                              "block_size": m.block_size}, cause=cause)
    if lengths_off:
        evidence.update(local_seq_lens=list(recorded), local_seq_lens_formula=formula.tolist())
    what = ", ".join(parts) if parts else "local lengths off the formula"
    return Finding(CODE, "error",
                   f"rank {m.rank} owns {int((expected >= 0).sum())} of the selected tokens under the cache's sharding "
                   f"(DCP {m.n}, interleave {m.interleave}, block {m.block_size}): {what}; likely cause: {cause}",
                   ranks=[m.rank], evidence=evidence, op=op, **fw.where())


def _duplicates(consumed: np.ndarray) -> np.ndarray:
    """[T, K] True where a slot (>= 0) repeats an earlier one of the same row."""
    order = np.argsort(consumed, axis=-1, kind="stable")  # [T, K]
    s = np.take_along_axis(consumed, order, axis=-1)  # [T, K]
    repeat = np.zeros_like(s, dtype=bool)
    repeat[:, 1:] = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)  # [T, K-1]
    out = np.zeros_like(repeat)
    np.put_along_axis(out, order, repeat, axis=-1)
    return out


def _examples(m: _Rank, mask: np.ndarray, expected: np.ndarray) -> list[dict]:
    rows, cols = np.nonzero(mask)
    return [{"row": int(t), "token": int(m.topk[t, k]), "slot": int(m.slots[t, k]), "expected_slot": int(expected[t, k])}
            for t, k in zip(rows[:EXAMPLES], cols[:EXAMPLES])]


def _cause(m: _Rank, valid: np.ndarray, dropped: np.ndarray, formula: np.ndarray, recorded) -> tuple[str, str]:
    """(the likely cause in words, the op it points at)."""
    if recorded is not None:
        return (f"local length: recorded local_seq_lens {list(recorded)} but the formula from seq_lens gives "
                f"{formula.tolist()}", "attention metadata")
    consumed = m.slots
    selected = m.topk >= 0  # [T, K]: a converter does not know the lengths
    for label, (n, r, interleave, bs) in _alternatives(m):
        if np.array_equal(m.slots_under(n, r, interleave, bs, selected), consumed):
            return label, "index conversion"
    if dropped.any() and (consumed >= 0).any():
        local = layout.local(np.maximum(m.topk, 0), m.n, m.interleave)  # [T, K]
        lengths = formula[m.requests][:, None]  # [T, 1]
        short = int((lengths - local)[dropped].max())  # the dropped tokens lie within the last `short` local ones
        kept = (consumed >= 0) & (m.topk >= 0)
        if short <= max(2, m.interleave) and not ((lengths - local)[kept] <= short).any():
            return (f"local length short by {short}: every dropped token is among the last {short} this rank holds "
                    f"of its request (the kernel read local_seq_len - {short})", "kernel")
    if dropped.any() and not (consumed >= 0).any():
        return "ownership: the rank consumed none of the tokens it owns (filtered as another rank's)", "index conversion"
    return "ownership or addressing: no single interleave, DCP size, rank or block size explains the slots", \
        "index conversion"


def _alternatives(m: _Rank):
    """What a converter might have used instead of the cache's (n, r, interleave, block size)."""
    seen = {(m.n, m.r, m.interleave, m.block_size)}
    options = []
    believed = int(m.meta.get("dcp_size") or 1)
    for n in [believed] + sorted({1, int(m.meta.get("group_dcp_size") or 1)} - {believed}):
        if n == m.n:
            continue
        for r in sorted({m.r, 0}):
            options.append((f"ownership: the index conversion used DCP {n} (rank {r}), the cache is sharded over {m.n}",
                            (n, r, m.interleave, m.block_size)))
    for r in range(m.n):
        if r != m.r:
            options.append((f"ownership: the index conversion used DCP rank {r}, this rank is {m.r}",
                            (m.n, r, m.interleave, m.block_size)))
    for interleave in sorted({1, 2, 4, 8, 16, 32, 64, 128, m.interleave} - {m.interleave}):
        options.append((f"interleave: the index conversion used interleave {interleave}, the cache writer "
                        f"{m.interleave}", (m.n, m.r, interleave, m.block_size)))
    for bs in (m.block_size // 2, m.block_size * 2):
        if bs >= 1 and bs % m.interleave == 0:
            options.append((f"block size: the index conversion used block size {bs}, the cache {m.block_size}",
                            (m.n, m.r, m.interleave, bs)))
    for label, key in options:
        if key not in seen:
            seen.add(key)
            yield label, key


def _consumed_twice(fw: Forward, members: list[_Rank]) -> Finding | None:
    """A valid selected token consumed by two ranks of the group (same ids at the same positions)."""
    if len(members) < 2 or len({m.topk.shape for m in members}) > 1:
        return None
    if not all(np.array_equal(m.topk, members[0].topk) for m in members[1:]):
        return None  # different selections: topk-divergence says so
    takers = np.stack([m.slots >= 0 for m in members]).sum(axis=0)  # [T, K]
    twice = (takers > 1) & members[0].valid()  # [T, K]
    if not twice.any():
        return None
    ranks = [m.rank for m in members if (twice & (m.slots >= 0)).any()]
    rows, cols = np.nonzero(twice)
    examples = [{"row": int(t), "token": int(members[0].topk[t, k])} for t, k in zip(rows[:EXAMPLES], cols[:EXAMPLES])]
    return Finding(CODE, "error", f"ranks {span(ranks)}: {int(twice.sum())} selected token(s) consumed by more than "
                   f"one rank of the DCP group (each must be read once, by its owner)", ranks=ranks,
                   evidence={"duplicated_across_ranks": int(twice.sum()), "examples": examples}, **fw.where())
