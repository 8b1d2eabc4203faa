"""The laundered-consensus bug on 4 GPUs (NCCL), one process a GPU, under torchrun.

    torchrun --nproc-per-node 4 examples/dcp_bug_gpu.py [--fixed] [--tap DIR]
    tensortap ls DIR
"""

import argparse

from tensortap.distributed import init_from_env
from tensortap.mla.scenario import Scenario, run_on_this_rank

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixed", action="store_true")
    parser.add_argument("--tap", default="dcp-bug-gpu-tap")
    args = parser.parse_args()
    rank, world = init_from_env("nccl")
    run_on_this_rank(Scenario(preset="glm5", ranks=world, dcp=world, fixed=args.fixed, dtype="bfloat16"), tap_dir=args.tap)
    if rank == 0:
        print(f"dump written to {args.tap}; run: tensortap ls {args.tap}")
