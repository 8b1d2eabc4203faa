"""The vLLM plugin's costs, as ratios against baselines measured in the same run (issue 10 item 5,
issue 8 item 7).

    python benchmarks/vllm_plugin.py [--rounds 1] [--calls 200000] [--no-load]

1. `load_general_plugins()` in fresh processes (vLLM imported first, not timed), rounds interleaved:
   TAP unset, TAP set (register() patches what is imported and hooks the rest: no model code is
   imported), and the eager baseline: TAP set and the plugin's target modules imported, which is what
   a register() that imports its targets (the plugin before issue 10) pays. Needs vLLM; --no-load skips it.
2. One layer call that the filter rejects, in the plugin: the wrapped DeepseekV32Attention.forward
   against the same function unwrapped, ns per call (budget: <= 2 us). `layers=78` rejects the layer by
   name (one dict lookup); `steps=999999` keeps the layer's name and rejects the step (one wants() call).
   No vLLM needed: the rejected path imports none of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import timeit

LOAD = """
import time, importlib, sys
from vllm.plugins import load_general_plugins
t = time.perf_counter()
load_general_plugins()
{extra}
print("SECONDS", time.perf_counter() - t)
"""
EAGER = ("from tensortap.integrations import vllm as p\n"
         "for m in sorted({t[0] for t in p.targets()}):\n"
         "    importlib.import_module(m)")


def load_seconds(tap: str | None, eager: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("TAP", "VLLM_PLUGINS")}
    if tap:
        env["TAP"] = tap
    code = LOAD.format(extra=EAGER if eager else "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"load_general_plugins failed: {out.stderr[-1500:]}")
    return float([line for line in out.stdout.splitlines() if line.startswith("SECONDS")][-1].split()[1])


def bench_load(rounds: int, tap_dir: str) -> None:
    runs = {"TAP unset": [], "TAP set": [], "TAP set, targets imported (eager baseline)": []}
    for _ in range(rounds):
        runs["TAP unset"].append(load_seconds(None, False))
        runs["TAP set"].append(load_seconds(tap_dir, False))
        runs["TAP set, targets imported (eager baseline)"].append(load_seconds(tap_dir, True))
    base = statistics.median(runs["TAP unset"])
    print("load_general_plugins() in a fresh process (median of %d):" % rounds)
    for name, values in runs.items():
        value = statistics.median(values)
        print(f"  {name:45s} {value * 1e3:9.1f} ms   {value / base:6.2f}x TAP unset")


def bench_untapped(calls: int, tap_dir: str) -> None:
    import tensortap
    from tensortap.integrations.vllm import layers, points, state

    def forward(self, positions, hidden):  # the model's own layer call, reduced to nothing
        return hidden

    class Module:
        layer_name = "model.layers.3.self_attn.attn"
        _tensortap = layers._Layer(3, "target", False)

    wrapped = points.wrap_dsa_forward(forward)
    module, positions, hidden = Module(), object(), object()
    state.ENGINE.phase, state.ENGINE.step = "run", 10
    print(f"one layer call the filter rejects ({calls} calls, best of 5):")
    rows = []
    for tap in (f"{tap_dir};layers=78", f"{tap_dir};steps=999999"):
        tensortap.configure(tap)
        bare = min(timeit.repeat(lambda: forward(module, positions, hidden), number=calls, repeat=5)) / calls
        tapped = min(timeit.repeat(lambda: wrapped(module, positions, hidden), number=calls, repeat=5)) / calls
        assert tensortap.stats()["records"] == 0
        rows.append((tap.split(";", 1)[1], bare, tapped))
    tensortap.close()
    for filt, bare, tapped in rows:
        print(f"  {filt:15s} unwrapped {bare * 1e9:7.0f} ns   wrapped {tapped * 1e9:7.0f} ns   "
              f"plugin cost {(tapped - bare) * 1e9:6.0f} ns (budget 2000 ns)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--no-load", action="store_true", help="skip the load_general_plugins() part (no vLLM)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tap_dir = os.path.join(tmp, "tap")
        bench_untapped(args.calls, tap_dir)
        if not args.no_load:
            bench_load(args.rounds, tap_dir)


if __name__ == "__main__":
    main()
