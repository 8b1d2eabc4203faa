"""What the analyzer reports: findings (one detector, one place, the numbers) and verdicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


# code -> one line on what it catches (DESIGN section 6)
CODES = {
    "zero-heads": "attention output exactly zero for heads whose query selected tokens",
    "empty-topk": "a rank consumed no index for a query although it holds selected tokens (lonely q)",
    "topk-out-of-shard": "consumed slots this rank does not own, or addresses that miss the token, under the actual sharding",
    "lse-nonfinite": "+inf or NaN LSE reaching the merge",
    "merge-mismatch": "merged output differs from the LSE merge recomputed from the per-rank partials",
    "no-merge": "the process group has DCP > 1 but the layer merged nothing",
    "query-divergence": "ranks of one DCP group hold different queries or heads",
    "config-mismatch": "the layer's believed DCP size differs from the process group's or the cache writer's",
    "rank-outlier": "a rank's share of the pre-all-reduce sum is zero or far off the others",
    "oracle-mismatch": "output differs from a float64 recompute from the dumped q, KV pages and indices",
    "nonfinite": "NaN or Inf in a tensor",
    "token-accounting": "a selected token not consumed once by its owner at the slot the cache's sharding gives, "
                        "or local lengths off the formula",
    "kv-mutated": "a cache token already written changed in a later step's dump of the same physical page",
    "lse-sanity": "recorded LSE off the oracle's logsumexp of the slots consumed (wrong base, zero, garbage)",
    "topk-divergence": "ranks of one DCP group consumed different top-k selections",
    "shard-masked": "a rank's LSE is -inf (merge weight 0) although it consumed selected tokens",
    "capture-loss": "the writer lost records on a rank and points of a judged forward are missing there",
}

# The op a finding points at, by default (a detector may name another one for its cause).
OPS = {
    "zero-heads": "kernel",
    "empty-topk": "index conversion",
    "topk-out-of-shard": "index conversion",
    "lse-nonfinite": "kernel",
    "merge-mismatch": "merge",
    "no-merge": "merge",
    "query-divergence": "query gather",
    "config-mismatch": "config",
    "rank-outlier": "o_proj",
    "oracle-mismatch": "kernel",
    "nonfinite": "kernel",
    "token-accounting": "index conversion",
    "kv-mutated": "cache writer",
    "lse-sanity": "kernel",
    "topk-divergence": "indexer",
    "shard-masked": "merge",
    "capture-loss": "capture",
}
# The op that produces each tap point (what a NaN in that point points at).
POINT_OPS = {
    "block_table": "attention metadata", "q": "query gather", "topk": "indexer", "slots": "index conversion",
    "kv_pages": "cache writer", "partial_out": "kernel", "lse": "kernel", "merged_out": "merge",
    "attn_out": "v_up", "o_proj_partial": "o_proj", "hidden": "all-reduce",
}


@dataclass
class Finding:
    code: str
    severity: str
    message: str
    step: int | None = None
    layer: int | None = None
    role: str | None = None
    spec_pos: int | None = None
    ranks: list[int] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)
    evidence: dict = field(default_factory=dict)
    op: str = ""  # the op it points at: kernel, index conversion, merge, query gather, cache writer, config, ...

    def __post_init__(self):
        if not self.op:
            self.op = OPS.get(self.code, "")

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def place(self) -> tuple:
        """Where it happened, without the step: repeats across steps collapse on this key."""
        return (self.code, self.layer, self.role, tuple(self.ranks), tuple(self.heads))


@dataclass
class Verdict:
    name: str  # "laundered consensus", "divergent ranks"
    layer: int | None
    role: str | None
    explanation: str
    codes: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Coverage:
    """What one detector did over a dump's forwards.

    verified:      forwards it checked in full
    inapplicable:  forwards with nothing for it to check (DCP 1 for the merge audit), by reason
    skipped:       forwards it could not check in full, by reason
    gaps:          the subset of `skipped` reasons a bug could cause (a page the sharding says
                   was read but is not in the dump): while any is left, the dump is not "clean"
    """

    forwards: int = 0
    verified: int = 0
    inapplicable: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    gaps: dict = field(default_factory=dict)

    def add(self, status: tuple | None) -> None:
        """status: None (verified), ("inapplicable", reason), ("skipped", reason, gap)."""
        self.forwards += 1
        if status is None:
            self.verified += 1
        elif status[0] == "inapplicable":
            self.inapplicable[status[1]] = self.inapplicable.get(status[1], 0) + 1
        else:
            self.skipped[status[1]] = self.skipped.get(status[1], 0) + 1
            if status[2]:
                self.gaps[status[1]] = self.gaps.get(status[1], 0) + 1

    @property
    def unverified(self) -> int:
        return sum(self.gaps.values())

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # truncation, skipped checks: not findings
    errors: list[str] = field(default_factory=list)  # detectors that broke: the check is incomplete
    records: int = 0
    bytes_read: int = 0
    forwards: int = 0
    coverage: dict = field(default_factory=dict)  # detector code -> Coverage

    @property
    def clean(self) -> bool:
        """No findings (errors or warnings) and no failed detector. See `verified` for the gaps."""
        return not self.errors and not any(f.severity in ("error", "warning") for f in self.findings)

    @property
    def verified(self) -> bool:
        """Clean, and no detector skipped a forward for a reason a bug could cause."""
        return self.clean and not self.unverified()

    def unverified(self) -> list[tuple[str, int, int, str]]:
        """(detector, forwards unverified, forwards seen, reasons) for every detector with gaps."""
        out = []
        for code, cov in self.coverage.items():
            if cov.unverified:
                reasons = "; ".join(f"{reason} ({n}x)" if n > 1 else reason for reason, n in cov.gaps.items())
                out.append((code, cov.unverified, cov.forwards, reasons))
        return out

    def exit(self, strict: bool = False) -> int:
        """0 clean, 1 findings (or, with `strict`, an unverified forward), 2 when a detector could not run."""
        if self.errors:
            return 2
        if not self.clean:
            return 1
        return 1 if strict and self.unverified() else 0

    @property
    def exit_code(self) -> int:
        return self.exit(strict=False)

    def status_line(self) -> str:
        """The one-line outcome: clean, "no findings; <detector> unverified on N of M forwards (why)", or counts."""
        if self.errors:
            return (f"check incomplete: {len(self.errors)} detector run(s) failed; {len(self.findings)} findings "
                    f"in {self.records} records")
        if not self.clean:
            errors = sum(1 for f in self.findings if f.severity == "error")
            warnings = sum(1 for f in self.findings if f.severity == "warning")
            return (f"{len(self.findings)} findings ({errors} errors, {warnings} warnings) in {self.records} records, "
                    f"{len(self.verdicts)} verdict(s)")
        gaps = self.unverified()
        if gaps:
            return "no findings; " + "; ".join(f"{code} unverified on {n} of {m} forwards ({why})"
                                               for code, n, m, why in gaps)
        return f"clean: no findings in {self.records} records"

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def by_code(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    def to_json(self) -> dict:
        return {
            "clean": self.clean,
            "verdicts": [v.to_json() for v in self.verdicts],
            "findings": [f.to_json() for f in self.findings],
            "notes": self.notes,
            "errors": self.errors,
            "records": self.records,
            "bytes_read": self.bytes_read,
            "forwards": self.forwards,
            "verified": self.verified,
            "unverified": [dict(detector=c, forwards=n, of=m, reasons=why) for c, n, m, why in self.unverified()],
            "coverage": {code: cov.to_json() for code, cov in self.coverage.items()},
            "status": self.status_line(),
        }
