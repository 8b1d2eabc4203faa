"""The oracle: sparse MLA attention recomputed in float64 from what the dump holds.

For each DCP group of a forward: the selected global token ids (`topk`), the owner of each
id under the cache's sharding (kv_dcp_size, interleave), its slot on the owner (that rank's
`block_table`), the raw `fp8_ds_mla` bytes of that slot (that rank's `kv_pages`, by
`page_ids`), dequantised here; then for every head a query covers,

    out[t, h] = sum_k softmax_k(scale * q[t, h] . kv[t, k]) * kv[t, k, :512]

compared with the `merged_out` of the rank that owns head h. Does not import tensortap.mla.
fp8_ds_mla token: [0, 512) e4m3 latent, [512, 528) 4 float32 tile scales, [528, 656) bf16 rope.
"""

from __future__ import annotations

import numpy as np

from tensortap.analysis import layout
from tensortap.analysis.findings import Finding
from tensortap.analysis.forward import Forward
from tensortap.text import span
from tensortap.format.codecs import FP8_VALUES, to_float
from tensortap.analysis.merge_audit import max_abs_error
from tensortap.tolerances import tolerance

LATENT, SCALES_END, TOKEN_BYTES, TILE = 512, 528, 656, 128
ORACLE_ROWS = 8  # query rows recomputed at once: 8 x 2048 selected tokens x 576 x 8 bytes = 75 MB


def dequantize(rows: np.ndarray) -> np.ndarray:
    """fp8_ds_mla rows [..., 656] uint8 -> [..., 576] float64: latent * tile scale, then rope."""
    lead = rows.shape[:-1]
    flat = rows.reshape(-1, TOKEN_BYTES)  # [N, 656]
    if flat.shape[0] == 0:  # a rank that owns none of the selected tokens
        return np.zeros(lead + (LATENT + 64,), dtype=np.float64)  # [..., 576]
    latent = FP8_VALUES["float8_e4m3fn"][flat[:, :LATENT]]  # [N, 512]
    scales = np.ascontiguousarray(flat[:, LATENT:SCALES_END]).view("<f4").astype(np.float64)  # [N, 4]
    latent = (latent.reshape(-1, LATENT // TILE, TILE) * scales[..., None]).reshape(-1, LATENT)  # [N, 512]
    rope = to_float(np.ascontiguousarray(flat[:, SCALES_END:]).view("<u2"), "bfloat16")  # [N, 64]
    return np.concatenate([latent, rope], axis=-1).reshape(*lead, -1)  # [..., 576]


def attention(q: np.ndarray, kv: np.ndarray, valid: np.ndarray, scale: float) -> np.ndarray:
    """q [T, H, 576], kv [T, K, 576], valid [T, K] -> out [T, H, 512] float64 (0 for a row with nothing valid)."""
    scores = np.matmul(q, kv.transpose(0, 2, 1)) * scale  # [T, H, K]
    scores = np.where(valid[:, None, :], scores, -np.inf)  # [T, H, K]
    top = scores.max(axis=-1, keepdims=True)  # [T, H, 1]
    top = np.where(np.isfinite(top), top, 0.0)
    weights = np.exp(scores - top)  # [T, H, K]
    total = weights.sum(axis=-1, keepdims=True)  # [T, H, 1]
    probs = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)  # [T, H, K]
    return np.matmul(probs, kv[..., :LATENT])  # [T, H, 512]


class Incomplete(Exception):
    """The dump lacks something the recompute needs (a page, a point); the reason is the message.

    `gap`: a bug could cause this (a page the sharding says was read is not in the dump), as
    opposed to a point the capture filter left out."""

    def __init__(self, reason: str, gap: bool = False):
        super().__init__(reason)
        self.gap = gap


def read_slots(fw: Forward, rank: int, slots: np.ndarray) -> np.ndarray:
    """Dequantised KV [..., 576] at physical `slots` [...] (>= 0) of `rank`, from its dumped kv_pages."""
    meta, rec = fw.meta(rank), fw.record("kv_pages", rank)
    if rec is None or fw.record("block_table", rank) is None:
        raise Incomplete(f"rank {rank} has no block_table or kv_pages")
    pages = fw.array("kv_pages", rank, exact=True)
    if pages is None:
        raise Incomplete("needs full tensors of kv_pages (stats only, mode=stats)")
    block_size = int(meta.get("block_size") or 0)
    if block_size <= 0 or pages.ndim != 3 or pages.shape[-1] != TOKEN_BYTES or pages.shape[1] != block_size:
        raise Incomplete(f"rank {rank}: kv_pages {list(pages.shape)} is not [P, block_size, {TOKEN_BYTES}] "
                         f"(kv_format {meta.get('kv_format')})", gap=True)
    wanted = slots // block_size  # [...]
    page, found = layout.page_lookup(rec.meta.get("page_ids") or [], wanted.reshape(-1))  # [M], [M]
    if not found.all():
        raise Incomplete(f"rank {rank} did not dump page {int(wanted.reshape(-1)[~found][0])}", gap=True)
    return dequantize(pages[page, slots.reshape(-1) % block_size]).reshape(slots.shape + (LATENT + 64,))


def _gather_kv(fw: Forward, group: list[int], topk: np.ndarray, requests: np.ndarray) -> np.ndarray:
    """Dequantised KV [T, K, 576] of the selected tokens, read from their owners' dumped pages."""
    kv = np.zeros(topk.shape + (LATENT + 64,), dtype=np.float64)  # [T, K, 576]
    for rank in group:
        meta = fw.meta(rank)
        table = fw.array("block_table", rank)
        if table is None or table.ndim != 2 or table.shape[1] == 0:
            raise Incomplete(f"rank {rank} has no block_table")
        if len(requests) and requests.max() >= table.shape[0]:
            raise Incomplete(f"rank {rank}: req_ids point past the block table's {table.shape[0]} rows", gap=True)
        n, r, interleave = int(meta.get("kv_dcp_size") or meta.get("group_dcp_size") or 1), \
            int(meta.get("group_dcp_rank") or 0), int(meta.get("interleave") or 1)
        slots = layout.owned_slots(topk, requests, table, int(meta.get("block_size") or 1), n, r, interleave)  # [T, K]
        here = slots >= 0  # [T, K]
        if here.any():
            kv[here] = read_slots(fw, rank, slots[here])  # [M, 576]
    return kv


def _queries(fw: Forward, group: list[int]) -> dict[int, np.ndarray]:
    """Global head -> its query [T, 576], from whichever rank of the group attended it."""
    heads: dict[int, np.ndarray] = {}
    for rank in group:
        q, rec = fw.array("q", rank), fw.record("q", rank)
        if q is None:
            continue
        offset = int(rec.meta.get("head_offset") or 0)
        for h in range(q.shape[1]):
            heads.setdefault(offset + h, q[:, h])
    return heads


def oracle_mismatch(fw: Forward) -> list[Finding]:
    findings = []
    for group in fw.dcp_groups():
        try:
            findings.extend(_check_group(fw, group))
        except Incomplete as why:
            fw.skip("oracle-mismatch", str(why), gap=why.gap)
    return findings


def _check_group(fw: Forward, group: list[int]) -> list[Finding]:
    if fw.record("topk", group[0]) is None:
        raise Incomplete("no topk")
    topk = fw.array("topk", group[0])
    if topk is None:
        raise Incomplete("needs full tensors of topk (stats only, mode=stats)")
    meta = fw.meta(group[0])
    requests = layout.rows_to_requests(meta, topk.shape[0])
    if requests is None or topk.ndim != 2:
        raise Incomplete("cannot map query rows to requests (no req_ids)")
    if meta.get("softmax_scale") is None:
        raise Incomplete("no softmax_scale in the metadata")
    if not fw.ranks("merged_out"):
        raise Incomplete("no merged_out")
    queries = _queries(fw, group)
    scale = float(meta["softmax_scale"])
    merged = {}
    for rank in group:
        rec, actual = fw.record("merged_out", rank), fw.array("merged_out", rank)
        if rec is None or actual is None:
            continue
        offset = int(rec.meta.get("head_offset") or 0)
        heads = [offset + h for h in range(actual.shape[1])]
        if any(h not in queries for h in heads):
            raise Incomplete(f"no query for some heads of rank {rank}", gap=bool(queries))
        if actual.ndim != 3 or actual.shape[0] != topk.shape[0]:
            raise Incomplete(f"merged_out of rank {rank} has {list(actual.shape)}, not [T, H, 512]", gap=True)
        merged[rank] = (rec, actual, heads, np.stack([queries[h] for h in heads], axis=1))  # q [T, H_tp, 576]
    bad_ranks, bad_heads, worst, total = set(), set(), 0.0, 0
    for start in range(0, topk.shape[0], ORACLE_ROWS):  # a few query rows at a time: bounded memory
        rows = slice(start, start + ORACLE_ROWS)
        kv = _gather_kv(fw, group, topk[rows], requests[rows])  # [t, K, 576]
        for rank, (rec, actual, heads, q) in merged.items():
            expected = attention(q[rows], kv, topk[rows] >= 0, scale)  # [t, H_tp, 512]
            bad = tolerance(rec.dtype).row_excess(actual[rows], expected) > 0  # [t, H_tp]: per (token, head)
            if bad.any():
                bad_ranks.add(rank)
                bad_heads.update(heads[h] for h in np.flatnonzero(bad.any(axis=0)))
                worst = max(worst, max_abs_error(actual[rows], expected))
                total = int(rec.meta.get("num_heads") or 0) or total
    bad_ranks, bad_heads = sorted(bad_ranks), sorted(bad_heads)
    if not bad_ranks:
        return []
    of = f"/{total}" if total else ""
    return [Finding("oracle-mismatch", "error",
                    f"ranks {span(bad_ranks)}: heads {span(bad_heads)} ({len(bad_heads)}{of}) differ from a "
                    f"float64 recompute from the dumped q, KV pages and indices (max abs error {worst:.3g})",
                    ranks=bad_ranks, heads=bad_heads, evidence={"max_abs_error": worst}, **fw.where())]
