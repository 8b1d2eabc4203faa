"""`tensortap diff` throughput and peak memory on a multi-GB pair (DESIGN section 8).

    python benchmarks/diff.py [--a DIR --b DIR | --gib 2]

By default two dumps of the same run (bug config, glm5 sizes) are generated and diffed in a
fresh child process; throughput is both dumps' bytes over the wall time. Targets: >= 200 MB/s,
peak RSS < 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, resource, sys, time
import tensortap
from tensortap.diffing import diff
start = time.perf_counter()
a, b = tensortap.open(sys.argv[1]), tensortap.open(sys.argv[2])
report = diff(a, b)
seconds = time.perf_counter() - start
print(json.dumps(dict(seconds=seconds, bytes=a.nbytes + b.nbytes, read=report.bytes_read, pairs=len(report.pairs),
                      equal=report.equal, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a")
    parser.add_argument("--b")
    parser.add_argument("--gib", type=float, default=2.0, help="size of each generated dump")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bigdump import dumps

    with dumps([args.a, args.b], args.gib) as (a, b):
        result = subprocess.run([sys.executable, "-c", CHILD, a, b], check=True, capture_output=True, text=True)
        r = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"{'GiB (A+B)':>9} {'pairs':>7} {'seconds':>8} {'MB/s':>7} {'read MB/s':>9} {'peak RSS':>9} equal")
        print(f"{r['bytes'] / 2**30:9.2f} {r['pairs']:7d} {r['seconds']:8.1f} {r['bytes'] / r['seconds'] / 1e6:7.0f} "
              f"{r['read'] / r['seconds'] / 1e6:9.0f} {r['peak_rss'] / 2**20:7.0f}Mi {r['equal']}")
        print("targets: >= 200 MB/s; peak RSS < 1 GiB")


if __name__ == "__main__":
    main()
