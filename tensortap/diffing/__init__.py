"""`tensortap diff`: where two dumps first part ways, and by how much at every point.

(The module is `diffing`, not `diff`: a submodule named `diff` would shadow `tensortap.diff()`.)

Records are matched by (role, step, spec_pos, layer, point, rank); `role_a/role_b` and
`layer_a/layer_b` pair different roles or layers (draft against target: the draft's spec_pos 0
meets the target of the same step). When both runs share a TP/DCP layout, tensors are compared
rank by rank; when they do not (DCP4 against DCP1), the layout-invariant points are reassembled
from the metadata (`assemble.py`) and the rest is reported as not comparable, with the reason.

`across_ranks(dump)` checks one dump for what must agree across ranks: q and topk inside a
DCP group (after the all-gather), hidden inside a TP group (after the all-reduce).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tensortap.diffing import assemble
from tensortap.analysis.forward import FORWARD_KEYS, Forward
from tensortap.diffing.compare import Comparison, compare_bytes, compare_indices, compare_values, shape_mismatch
from tensortap.vocab import POINTS
from tensortap.dump import Dump
from tensortap.text import span
from tensortap.errors import TapError
from tensortap.vocab import INDEX_POINTS
from tensortap.tolerances import Tolerance, looser


class DiffError(TapError):
    """The two dumps cannot be compared at all (different models or batches)."""


@dataclass
class Pair:
    """One compared pair: where (in A's terms) and the metrics."""

    role: str | None
    step: int | None
    spec_pos: int | None
    layer: int | None
    point: str
    rank: int | str  # a rank, or "all" for a reassembled tensor
    comparison: Comparison
    role_b: str | None = None
    layer_b: int | None = None

    @property
    def label(self) -> str:
        role = self.role if self.role_b in (None, self.role) else f"{self.role}/{self.role_b}"
        layer = self.layer if self.layer_b in (None, self.layer) else f"{self.layer}/{self.layer_b}"
        return f"{forward_label(role, layer, self.step, self.spec_pos)} {self.point} rank {self.rank}"

    def to_json(self) -> dict:
        return dict(role=self.role, role_b=self.role_b, step=self.step, spec_pos=self.spec_pos, layer=self.layer,
                    layer_b=self.layer_b, point=self.point, rank=self.rank, label=self.label,
                    **self.comparison.to_json())


@dataclass
class DiffReport:
    pairs: list[Pair] = field(default_factory=list)
    mode: str = "per-rank"  # or "shard-aware"
    not_comparable: dict[str, str] = field(default_factory=dict)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    bytes_read: int = 0

    @property
    def first(self) -> Pair | None:
        return next((p for p in self.pairs if not p.comparison.equal), None)

    @property
    def context(self) -> Pair | None:
        """The last pair that matched before the first divergence."""
        last = None
        for p in self.pairs:
            if not p.comparison.equal:
                return last
            last = p
        return None

    @property
    def equal(self) -> bool:
        return self.first is None and not self.only_a and not self.only_b

    @property
    def exit_code(self) -> int:
        return 0 if self.equal else 1

    def summary(self) -> list[dict]:
        """Per point: pairs, how many differ, the worst metrics of the pairs that could be measured.

        Value metrics (max abs/rel, rel L2, cosine) come from float pairs, `jaccard` from index pairs,
        `tokens` (differing cache tokens) from byte pairs; a metric no pair measured is None.
        `shape` counts pairs whose shapes or dtypes differ (they have no metrics)."""
        rows: dict[str, dict] = {}
        for p in self.pairs:
            c = p.comparison
            row = rows.setdefault(p.point, dict(point=p.point, pairs=0, differ=0, shape=0, max_abs=None,
                                                max_rel=None, rel_l2=None, cosine=None, jaccard=None, tokens=None))
            row["pairs"] += 1
            row["differ"] += 0 if c.equal else 1
            if c.kind in ("shape", "dtype"):
                row["shape"] += 1
            elif c.kind == "values":
                for key, worst in (("max_abs", max), ("max_rel", max), ("rel_l2", max), ("cosine", min)):
                    row[key] = getattr(c, key) if row[key] is None else worst(row[key], getattr(c, key))
            elif c.kind == "indices":
                row["jaccard"] = c.jaccard if row["jaccard"] is None else min(row["jaccard"], c.jaccard)
            elif c.kind == "bytes":
                row["tokens"] = (row["tokens"] or 0) + c.over
        return [rows[p] for p in sorted(rows, key=_point_order)]

    def to_json(self) -> dict:
        first, context = self.first, self.context
        return dict(equal=self.equal, mode=self.mode, first_divergence=first.to_json() if first else None,
                    context=context.to_json() if context else None, summary=self.summary(),
                    not_comparable=self.not_comparable, only_a=self.only_a, only_b=self.only_b,
                    pairs=[p.to_json() for p in self.pairs])


def _point_order(point: str) -> int:
    return POINTS.index(point) if point in POINTS else len(POINTS)


# -- matching ---------------------------------------------------------------------------------------
def _forwards(dump: Dump, role, layer, steps, points, pair_roles: bool) -> dict[tuple, Forward]:
    sub = dump.select(role=role, layer=layer, step=steps, point=points)
    out = {}
    for key, records in sub.group_by(*FORWARD_KEYS).items():
        step, layer_, role_, spec_pos = key
        if pair_roles and spec_pos is None:
            spec_pos = 0  # a target forward meets the draft's first speculative pass of its step
        out[(step, spec_pos, None if role is not None else role_, None if layer is not None else layer_)] = \
            Forward(key, records)
    return out


def _model(dump: Dump) -> dict:
    """What makes two dumps the same model: head count, latent and rope widths, hidden size."""
    model = {}
    for key in ("num_heads", "kv_lora_rank", "rope_dim"):
        values = {m.get(key) for m in dump._metas if m.get(key) is not None}
        if values:
            model[key] = sorted(values)
    hidden = {tuple(m["shape"])[-1] for m in dump._metas if m.get("point") == "hidden" and m.get("shape")}
    if hidden:
        model["hidden size"] = sorted(hidden)
    return model


def _check_same_model(a: Dump, b: Dump) -> None:
    ma, mb = _model(a), _model(b)
    differ = [f"{k} {ma[k][0] if len(ma[k]) == 1 else ma[k]} vs {mb[k][0] if len(mb[k]) == 1 else mb[k]}"
              for k in ma if k in mb and ma[k] != mb[k]]
    if differ:
        raise DiffError(f"A and B are different models ({', '.join(differ)}); diff compares two runs of one model")


def _tokens(fw: Forward) -> int | None:
    for point in ("hidden", "topk", "q", "merged_out"):
        for rec in fw.records(point):
            if rec.shape:
                return rec.shape[0]
    return None


# -- comparing ----------------------------------------------------------------------------------------
def _compare(ra, rb, a: np.ndarray | None, b: np.ndarray | None, point: str, tol: Tolerance | None) -> Comparison:
    if tuple(ra.shape) != tuple(rb.shape) or (ra.dtype != rb.dtype and point in INDEX_POINTS):
        return shape_mismatch(ra.shape, rb.shape, ra.dtype, rb.dtype)
    if point in INDEX_POINTS or point == "block_table":
        return compare_indices(a.reshape(a.shape[0], -1) if a.ndim else a, b.reshape(b.shape[0], -1) if b.ndim else b)
    if point == "kv_pages":
        return compare_bytes(a, b)
    return compare_values(a, b, tol or looser(ra.dtype, rb.dtype), ra.dtype, rb.dtype)


def _per_rank(fa: Forward, fb: Forward, point: str, tol) -> list[tuple[int | str, Comparison]]:
    out = []
    for rank in sorted(set(fa.ranks(point)) & set(fb.ranks(point))):
        ra, rb = fa.record(point, rank), fb.record(point, rank)
        if not (ra.stored and rb.stored):
            continue
        exact = point == "kv_pages"
        out.append((rank, _compare(ra, rb, fa.array(point, rank, exact=exact), fb.array(point, rank, exact=exact),
                                   point, tol)))
    return out


def _shard_aware(fa: Forward, fb: Forward, point: str, tol) -> Comparison | None:
    if point in assemble.HEAD_OFFSET_POINTS:
        ha, hb = assemble.heads(fa, point), assemble.heads(fb, point)
        if ha is None or hb is None:
            return None
        (va, pa), (vb, pb) = ha, hb
        if va.shape[0] != vb.shape[0] or va.shape[2] != vb.shape[2]:
            return shape_mismatch(va.shape, vb.shape, "", "")
        both = pa[: vb.shape[1]] & pb[: va.shape[1]]  # heads both runs hold
        dtype_a, dtype_b = fa.records(point)[0].dtype, fb.records(point)[0].dtype
        return compare_values(va[:, : len(both)][:, both], vb[:, : len(both)][:, both], tol or looser(dtype_a, dtype_b),
                              dtype_a, dtype_b)
    if point in assemble.REPLICATED:
        va, vb = assemble.replicated(fa, point), assemble.replicated(fb, point)
        if va is None or vb is None:
            return None
        ra, rb = fa.records(point)[0], fb.records(point)[0]
        return _compare(ra, rb, va, vb, point, tol)
    if point == "kv_pages":
        (ka, rows_a), (kb, rows_b) = assemble.cache_tokens(fa), assemble.cache_tokens(fb)
        common, ia, ib = np.intersect1d(ka, kb, return_indices=True)
        c = compare_bytes(rows_a[ia], rows_b[ib])
        c.note = (c.note + "; " if c.note else "") + f"{len(common)} cache tokens held by both"
        return c
    return None


def diff(a, b, role_a=None, role_b=None, layer_a=None, layer_b=None, steps=None, points=None,
         rtol: float | None = None, atol: float | None = None) -> DiffReport:
    """Compare two dumps (Dumps or paths). `rtol`/`atol` override the per-dtype tolerances."""
    A = a if isinstance(a, Dump) else Dump.open(a)
    B = b if isinstance(b, Dump) else Dump.open(b)
    _check_same_model(A, B)
    tol = Tolerance(rtol if rtol is not None else 0.0, atol if atol is not None else 0.0) \
        if (rtol is not None or atol is not None) else None
    role_a, role_b = role_a or role_b, role_b or role_a  # one side named: the same for both
    if layer_a is None or layer_b is None:
        layer_a = layer_b = layer_a if layer_a is not None else layer_b
    pair_roles = role_a != role_b
    if pair_roles and layer_a is None and layer_b is None:
        layers_a, layers_b = A.select(role=role_a).layers, B.select(role=role_b).layers
        if len(layers_a) == 1 and len(layers_b) == 1 and layers_a != layers_b:  # the draft's MTP layer vs the target's
            layer_a, layer_b = layers_a[0], layers_b[0]
    fa = _forwards(A, role_a, layer_a, steps, points, pair_roles)
    fb = _forwards(B, role_b, layer_b, steps, points, pair_roles)
    if not fa or not fb:
        raise DiffError(f"nothing to compare: the selection matches {len(fa)} forwards of A and {len(fb)} of B")
    if not set(fa) & set(fb):
        raise DiffError(f"no forward of A matches one of B (A has {_describe(next(iter(fa.values())))}, "
                        f"B has {_describe(next(iter(fb.values())))}); pair them with --role-a/--role-b or "
                        f"--layer-a/--layer-b")
    report = DiffReport()
    # Paired roles: the draft's later speculative passes have no counterpart in the target; not a difference.
    report.only_a = [_describe(fa[k]) for k in fa if k not in fb and not (pair_roles and (k[1] or 0) > 0)]
    report.only_b = [_describe(fb[k]) for k in fb if k not in fa and not (pair_roles and (k[1] or 0) > 0)]
    for key, wa in fa.items():
        wb = fb.get(key)
        if wb is None:
            continue
        ta, tb = _tokens(wa), _tokens(wb)
        if ta is not None and tb is not None and ta != tb:
            raise DiffError(f"A and B ran different batches ({ta} vs {tb} query tokens at {_describe(wa)}); "
                            f"diff compares two runs of the same inputs")
        same_layout = assemble.layout_key(wa) == assemble.layout_key(wb)
        if not same_layout:
            report.mode = "shard-aware"
        for point in sorted(set(_points(wa)) | set(_points(wb)), key=_point_order):
            extra = dict(role_b=wb.role if pair_roles else None, layer_b=wb.layer if layer_b is not None else None)
            if same_layout:
                for rank, c in _per_rank(wa, wb, point, tol):
                    report.pairs.append(Pair(wa.role, wa.step, wa.spec_pos, wa.layer, point, rank, c, **extra))
            elif point in assemble.NOT_INVARIANT:
                report.not_comparable[point] = assemble.NOT_INVARIANT[point]
            else:
                c = _shard_aware(wa, wb, point, tol)
                if c is not None:
                    report.pairs.append(Pair(wa.role, wa.step, wa.spec_pos, wa.layer, point, "all", c, **extra))
        report.bytes_read += wa.bytes_read + wb.bytes_read
        wa.release()
        wb.release()  # one forward's tensors at a time: memory stays bounded
    return report


def _points(fw: Forward) -> list[str]:
    return sorted({rec.point for rec in fw.items()}, key=_point_order)


def _describe(fw: Forward) -> str:
    return forward_label(fw.role, fw.layer, fw.step, fw.spec_pos)


def forward_label(role, layer, step, spec_pos) -> str:
    """`draft layer 78 step 0 spec 1`; what a record does not carry is left out (never `None`)."""
    parts = [str(role) if role is not None else "", f"layer {layer}" if layer is not None else "",
             f"step {step}" if step is not None else "", f"spec {spec_pos}" if spec_pos is not None else ""]
    return " ".join(p for p in parts if p) or "the forward"


# -- one dump, across ranks -----------------------------------------------------------------------------
@dataclass
class Agreement:
    point: str
    where: str
    group: list[int]
    disagree: list[int]
    reason: str = ""

    def to_json(self) -> dict:
        return dict(point=self.point, where=self.where, group=self.group, disagree=self.disagree, reason=self.reason)


def across_ranks(dump) -> list[Agreement]:
    """What must agree across ranks: q and topk within each DCP group, hidden within each TP group."""
    d = dump if isinstance(dump, Dump) else Dump.open(dump)
    out = []
    for key, records in d.group_by(*FORWARD_KEYS).items():
        fw = Forward(key, records)
        where = _describe(fw)
        for point, groups in (("q", fw.dcp_groups()), ("topk", fw.dcp_groups()), ("hidden", fw.tp_groups())):
            for group in groups:
                found = _group_agreement(fw, point, [r for r in group if fw.record(point, r) is not None])
                if found is not None:
                    out.append(Agreement(point, where, *found))
    return out


def _group_agreement(fw: Forward, point: str, group: list[int]):
    if len(group) < 2:
        return None
    first = fw.record(point, group[0])
    heads = {r: (fw.record(point, r).meta.get("head_offset"), fw.record(point, r).shape) for r in group}
    if len(set(heads.values())) > 1:
        listing = ", ".join(f"rank {r}: heads {o}-{o + s[1] - 1}" if o is not None and len(s) > 1 else f"rank {r}: {list(s)}"
                            for r, (o, s) in heads.items())
        reason = f"different heads ({listing}): missing query all-gather" if point == "q" else f"different shapes ({listing})"
        return group, [r for r in group if heads[r] != heads[group[0]]], reason
    base = fw.array(point, first.rank, exact=True)
    disagree = [r for r in group[1:] if not np.array_equal(fw.array(point, r, exact=True), base)]
    return group, disagree, (f"values differ from rank {group[0]}" if disagree else "")


def summarize_agreement(rows: list[Agreement]) -> list[dict]:
    """Per point: groups checked, groups that disagree, the ranks involved and the first reason."""
    by_point: dict[str, dict] = {}
    for a in rows:
        s = by_point.setdefault(a.point, dict(point=a.point, checked=0, disagreeing=0, ranks=set(), reason="", where=""))
        s["checked"] += 1
        if a.disagree:
            s["disagreeing"] += 1
            s["ranks"].update(a.disagree)
            if not s["reason"]:
                s["reason"], s["where"] = a.reason, a.where
    return [dict(s, ranks=span(sorted(s["ranks"]))) for s in by_point.values()]
