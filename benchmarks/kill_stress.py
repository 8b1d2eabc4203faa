"""SIGKILL a tapping process at a random moment 0-80 ms after a flush, many times, and classify what
the reader finds at once (docs/crash-safety.md):

    [KILL_DIR=/dev/shm] python benchmarks/kill_stress.py KILLS WORKERS [scope]

Kills alternate writer=thread (the writer dies with the server) and writer=process (only the server
dies: the reader waits for its writer process to commit). Without `scope`, each record is its own
batch (one flush per record: the worst case); with it, a scope of three records per step.

    ok        every forward flushed before the kill is readable
    salvaged  the same, but the record list was torn and batches were found by name
    LOST      a flushed forward is missing (the reader's truncation note is printed)
    ERROR     opening the dump raised
"""
import collections
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

FLUSHED = 4  # forwards captured and flushed before the kill

def child(directory, writer, scoped, report):
    import torch, tensortap
    try:
        tensortap.configure(dir=directory, writer=writer)
        def steps(rng):
            for step in rng:
                if scoped:
                    with tensortap.scope(step=step, layer=0):
                        for pos in range(3):
                            tensortap.point("layers.0.attn.lse", torch.full((4, 16), float(step)), spec_pos=pos)
                else:
                    for pos in range(3):
                        tensortap.point("layers.0.attn.lse", torch.full((4, 16), float(step)), step=step, spec_pos=pos)
        steps(range(FLUSHED)); tensortap.flush(timeout=60)
        os.write(report, b"F")
        steps(range(FLUSHED, 100000)); time.sleep(60)
    finally:
        os._exit(0)

def one(args):
    i, writer, scoped = args
    import tensortap
    rng = random.Random(i)
    base = tempfile.mkdtemp(dir=os.environ.get("KILL_DIR"))  # default: the temporary directory (a disk)
    directory = os.path.join(base, "tap")
    read, report = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read); child(directory, writer, scoped, report)
    os.close(report)
    try:
        assert os.read(read, 1) == b"F"
        time.sleep(rng.uniform(0.0, 0.08))
    finally:
        os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0); os.close(read)
    try:
        if writer == "process":
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and any(f.endswith(".tmp") for f in os.listdir(directory)):
                time.sleep(0.05)
        d = tensortap.open(directory)
        steps = collections.defaultdict(set)
        for r in d:
            steps[r.step].add(r.meta["spec_pos"])
        ok = all(steps.get(s) == {0, 1, 2} for s in range(FLUSHED))
        trunc = " | ".join(s.truncation for s in d.truncated)
        kind = ("salvaged" if "found by name" in trunc else "ok") if ok else "LOST"
        return kind, trunc[:200] if kind != "ok" else ""
    except Exception as exc:
        return "ERROR", f"{type(exc).__name__}: {exc}"[:300]
    finally:
        shutil.rmtree(base, ignore_errors=True)

if __name__ == "__main__":
    kills, workers = int(sys.argv[1]), int(sys.argv[2])
    scoped = len(sys.argv) > 3 and sys.argv[3] == "scope"
    jobs = [(i, ("thread", "process")[i % 2], scoped) for i in range(kills)]
    results = collections.Counter(); notes = collections.Counter()
    with ProcessPoolExecutor(workers) as pool:
        for (i, writer, _), (kind, note) in zip(jobs, pool.map(one, jobs)):
            results[(writer, kind)] += 1
            if note: notes[(writer, kind, note)] += 1
    print(f"{kills} kills, {'one scope of 3 per step' if scoped else 'no scope: one flush per record'}")
    for k, v in sorted(results.items()): print(f"  {k[0]:8s} {k[1]:9s} {v}")
    for k, v in notes.most_common(8): print(f"  note x{v}: {k}")
