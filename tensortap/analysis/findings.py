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
class Report:
    findings: list[Finding] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # truncation, skipped checks: not findings
    errors: list[str] = field(default_factory=list)  # detectors that broke: the check is incomplete
    records: int = 0
    bytes_read: int = 0

    @property
    def clean(self) -> bool:
        return not self.errors and not any(f.severity in ("error", "warning") for f in self.findings)

    @property
    def exit_code(self) -> int:
        """0 clean, 1 findings, 2 when a detector could not run (the check is incomplete)."""
        if self.errors:
            return 2
        return 0 if self.clean else 1

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
        }
