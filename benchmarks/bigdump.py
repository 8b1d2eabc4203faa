"""Make a multi-GB dump for the analyzer and diff benchmarks.

A real reference run (glm5 sizes, 4 gloo ranks, a few steps) is dumped once, then its
records are written again under new step numbers until the dump reaches the size asked
for. Every forward stays self-consistent, so the detectors and the oracle do real work.

    python benchmarks/bigdump.py OUT_DIR [--gib 2] [--fixed]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import tempfile

import tensortap
from tensortap.format import schema
from tensortap.distributed import spawn
from tensortap.mla.scenario import Scenario, run_rank


def make(out: str, gib: float, fixed: bool = False, steps: int = 2) -> str:
    """Write a dump of about `gib` GiB to `out` (which must not exist yet); returns `out`."""
    seed_dir = tempfile.mkdtemp(prefix="seed-")
    scn = Scenario(preset="glm5", steps=steps, spec_tokens=2, fixed=fixed)
    spawn(run_rank, 4, kwargs=dict(scenario=dataclasses.asdict(scn), tap_dir=seed_dir), timeout=600)
    seed = tensortap.open(seed_dir)
    copies = max(1, round(gib * 2**30 / seed.nbytes))
    tensortap.configure(dir=out, segment_bytes=512 << 20)
    for copy in range(copies):
        for rec in seed.iter():
            meta = {k: v for k, v in rec.meta.items()
                    if k not in schema.SYSTEM_FIELDS}
            meta["step"] = rec.step + copy * steps
            tensortap.point(rec.name, rec.tensor(), **meta)
    tensortap.close()
    seed.close()
    shutil.rmtree(seed_dir)
    return out


@contextlib.contextmanager
def dumps(given: list[str | None], gib: float):
    """The dumps given, or, for any not given, generated copies of one fresh dump (removed afterwards)."""
    if all(given):
        yield list(given)
        return
    scratch = tempfile.mkdtemp(prefix="bench-")
    try:
        first = make(os.path.join(scratch, "dump0"), gib)
        paths = []
        for i, path in enumerate(given):
            if path is None and i:
                path = os.path.join(scratch, f"dump{i}")
                shutil.copytree(first, path)
            paths.append(path or first)
        yield paths
    finally:
        shutil.rmtree(scratch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--fixed", action="store_true")
    args = parser.parse_args()
    if os.path.exists(args.out):
        raise SystemExit(f"{args.out} exists; pass a new directory")
    make(args.out, args.gib, args.fixed)
    print(tensortap.open(args.out))


if __name__ == "__main__":
    main()
