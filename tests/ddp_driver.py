"""Run under `torchrun --nproc_per_node=2` by tests/test_ddp.py (one launch for every stage).

Usage: torchrun --standalone --nproc_per_node=2 tests/ddp_driver.py MICRO_RUN_DIR OUT_DIR
Each stage trains with its per-rank batch; each rank then writes a checksum of its weights (and
PPO's beta), so the test can check that ranks agree and compare rank 0's checkpoint with a single
process on the same global batch. The PPO update is also run on a fixed rollout (identical on
every world size) with global and with per-rank whitening.
"""

import json
import os
import sys

import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]  # ddp_cases, and nanoalign without an install
from ddp_cases import STAGES, fixed_rollout_update  # noqa: E402

from nanoalign import common  # noqa: E402


def main():
    run, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    common.init_dist("cpu")
    # one process group for every stage
    cleanup, common.cleanup_dist = common.cleanup_dist, lambda: None
    sums = {}
    for name, (module, argv) in STAGES.items():
        args = argv(run, world_size=2) + ["--out_dir", os.path.join(out, "ddp", name),
                                          "--device", "cpu"]
        model = module.main(args)
        sums[name] = [float(p.detach().double().sum()) for p in model.parameters()]
        if name == "ppo":
            torch.distributed.barrier()  # rank 0 writes the checkpoint
            ck = torch.load(os.path.join(out, "ddp", name, "ckpt.pt"), weights_only=True)
            sums["ppo_kl_coef"] = ck["kl_coef"]
    for whiten in ("global", "local"):
        model, grads = fixed_rollout_update(run, whiten)
        sums[f"ppo_fixed_rollout_{whiten}"] = [float(p.detach().double().sum())
                                               for p in model.parameters()]
        if rank == 0:
            torch.save({"model": model.state_dict(), "grads": grads},
                       os.path.join(out, f"ppo_fixed_{whiten}_ddp.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(sums, f)
    cleanup()


if __name__ == "__main__":
    main()
