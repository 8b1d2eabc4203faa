"""KV immutability across steps: a cache token once written stays bit-identical in every later dump
of the same physical page, unless the block table remapped the block.

Per (layer, role, rank) the analyzer keeps, for each physical page it has seen, the step, the
(request, local block) the block table mapped it to, and a 64-bit hash of each token's 656 bytes:

    h(row) = sum_i w_i * word_i  (mod 2^64),  word_i the row's i-th 8 bytes, w_i fixed odd constants

That is O(pages * block_size) memory, never the pages themselves. A later step's dump of the page
is compared on the token rows that were written when it was first seen and that this step does
not rewrite:

    written at s1:   global position p < L_q(s1)          (the request's length then)
    kept at s2:      p < L_q(s2) - rows_q(s2)              (the tokens this forward appends start there)

so speculative positions that a later step legitimately rewrites are never compared. A change is
a finding naming the rank, page, slot, token position and the two steps (cause: a writer that
wrote into a live block, e.g. CUDA-graph padding rows with slot 0).
"""

from __future__ import annotations

import numpy as np

from tensortap.analysis import layout
from tensortap.analysis.findings import Finding
from tensortap.analysis.forward import Forward
from tensortap.text import span

CODE = "kv-mutated"
EXAMPLES = 5
_WEIGHTS = (np.random.default_rng(0x7A9).integers(1, 2**63, size=128, dtype=np.uint64) | np.uint64(1))


def row_hashes(pages: np.ndarray) -> np.ndarray:
    """pages [P, bs, W] uint8 -> [P, bs] uint64: a weighted sum of each row's 8-byte words (wrapping)."""
    width = pages.shape[-1]
    pad = (-width) % 8
    if pad:
        pages = np.concatenate([pages, np.zeros(pages.shape[:-1] + (pad,), dtype=np.uint8)], axis=-1)  # [P, bs, W+pad]
    words = np.ascontiguousarray(pages).view("<u8")  # [P, bs, W/8]
    weights = _WEIGHTS[np.arange(words.shape[-1]) % len(_WEIGHTS)]  # [W/8]
    return words @ weights  # [P, bs]: integer matmul wraps mod 2^64 (no BLAS, no temporary)


class _Page:
    __slots__ = ("step", "where", "hashes", "positions", "written")

    def __init__(self, step, where, hashes, positions, written):
        self.step, self.where, self.hashes, self.positions, self.written = step, where, hashes, positions, written


class KVHistory:
    """The kv-mutated detector: call it on each forward in capture order; it remembers page hashes."""

    def __init__(self):
        self.pages: dict[tuple, dict[int, _Page]] = {}

    def __call__(self, fw: Forward) -> list[Finding]:
        findings = []
        for rec in fw.records("kv_pages"):
            found = self._rank(fw, rec.rank)
            if found is not None:
                findings.append(found)
        if not fw.records("kv_pages"):
            fw.skip(CODE, "kv_pages not captured")
        return findings

    def _rank(self, fw: Forward, rank: int) -> Finding | None:
        rec, meta = fw.record("kv_pages", rank), fw.meta(rank)
        if not isinstance(fw.step, int):
            fw.skip(CODE, "records carry no step")
            return None
        if fw.record("block_table", rank) is None:
            fw.skip(CODE, "block_table not captured")
            return None
        pages, table = fw.array("kv_pages", rank, exact=True), fw.array("block_table", rank)
        if pages is None or table is None:
            fw.needs_tensors(CODE, "kv_pages/block_table", rank)
            return None
        page_ids = np.asarray(rec.meta.get("page_ids") or [], dtype=np.int64)  # [P]
        block_size = int(meta.get("block_size") or 0)
        seq_lens = np.asarray(meta.get("seq_lens") or [], dtype=np.int64)  # [R]
        if pages.ndim != 3 or len(page_ids) != pages.shape[0] or table.ndim != 2 or block_size != pages.shape[1] \
                or len(seq_lens) < table.shape[0]:
            fw.skip(CODE, f"rank {rank}: kv_pages {list(pages.shape)}, page_ids, block_table and seq_lens do not pair up",
                    gap=True)
            return None
        if not len(page_ids):
            return None
        rows = next((fw.record(p, rank).shape[0] for p in ("topk", "q", "slots") if fw.record(p, rank) is not None
                     and fw.record(p, rank).shape), len(seq_lens))
        requests = layout.rows_to_requests(meta, rows)
        if requests is None or (len(requests) and (requests.min() < 0 or requests.max() >= len(seq_lens))):
            fw.skip(CODE, f"rank {rank}: query rows cannot be mapped to requests (record req_ids)")
            return None
        rows_per_request = np.bincount(requests, minlength=len(seq_lens))  # [R]: tokens this forward appends
        kept_below = seq_lens - rows_per_request[: len(seq_lens)]  # [R]
        n = int(meta.get("kv_dcp_size") or meta.get("group_dcp_size") or 1)
        r, interleave = int(meta.get("group_dcp_rank") or 0), int(meta.get("interleave") or 1)
        hashes = row_hashes(pages)  # [P, bs]
        history = self.pages.setdefault((fw.layer, fw.role, rank), {})
        where = _mapping(table)
        changed = []
        for i, page in enumerate(page_ids.tolist()):
            at = where.get(page)
            if at is None:
                continue  # touched by the slots but not in this request's table: nothing to compare against
            q, block = at
            local = block * block_size + np.arange(block_size)  # [bs]
            positions = (local // interleave) * (n * interleave) + r * interleave + local % interleave  # [bs]
            old = history.get(page)
            if old is not None and old.where == at and fw.step > old.step:
                compare = old.written & (positions < kept_below[q])  # [bs]
                diff = compare & (hashes[i] != old.hashes)  # [bs]
                for row in np.flatnonzero(diff).tolist():
                    changed.append((page, page * block_size + row, int(positions[row]), q, old.step))
            if old is None or old.where != at or fw.step >= old.step:
                history[page] = _Page(fw.step, at, hashes[i].copy(), positions, positions < seq_lens[q])
        if not changed:
            return None
        steps = sorted({c[4] for c in changed})
        examples = [{"page": p, "slot": s, "token": t, "request": q, "first_step": s1, "step": fw.step}
                    for p, s, t, q, s1 in changed[:EXAMPLES]]
        pages_hit = sorted({c[0] for c in changed})
        return Finding(CODE, "error",
                       f"rank {rank}: {len(changed)} cache token(s) written by step {span(steps)} changed by step "
                       f"{fw.step} in page(s) {span(pages_hit)} although the block table still maps them to the same "
                       f"request (e.g. page {changed[0][0]} slot {changed[0][1]}, token {changed[0][2]}): something "
                       f"wrote into a live block", ranks=[rank],
                       evidence={"tokens_changed": len(changed), "pages": pages_hit, "examples": examples,
                                 "steps": [*steps, fw.step]}, **fw.where())


def _mapping(table: np.ndarray) -> dict[int, tuple[int, int]]:
    """Physical block id -> (request, local block) for blocks the table maps exactly once."""
    ids = table.reshape(-1)
    values, counts = np.unique(ids[ids >= 0], return_counts=True)
    once = set(values[counts == 1].tolist())
    width = table.shape[1]
    return {int(b): (i // width, i % width) for i, b in enumerate(ids.tolist()) if b in once}
