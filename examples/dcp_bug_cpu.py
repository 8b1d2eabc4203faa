"""The laundered-consensus bug on 4 CPU ranks (gloo), then a look at the dump.

    python examples/dcp_bug_cpu.py [--fixed]
"""

import dataclasses
import sys
import tempfile

import tensortap
from tensortap.distributed import spawn
from tensortap.mla.scenario import Scenario, run_rank

if __name__ == "__main__":
    scenario = Scenario(preset="glm5", ranks=4, dcp=4, fixed="--fixed" in sys.argv)
    tap_dir = tempfile.mkdtemp(prefix="dcp-bug-")
    spawn(run_rank, 4, kwargs=dict(scenario=dataclasses.asdict(scenario), tap_dir=tap_dir))

    d = tensortap.open(tap_dir)
    print(d)
    zero_heads = d.select(point="merged_out", role="draft", step=0, spec_pos=0).records[["rank", "zero_heads"]]
    print("draft layer, step 0: all-zero heads per rank\n", zero_heads.to_string(index=False))
    hidden = d.stack("hidden", over="rank", role="draft", step=0, spec_pos=0)  # [4, T, C]
    print("hidden identical on every rank:", all(bool((h == hidden[0]).all()) for h in hidden))
