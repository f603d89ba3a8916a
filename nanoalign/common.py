"""
Runtime plumbing shared by every stage, kept out of the stage files so that they read as
algorithms: DDP (every collective lives here, each valid under NCCL), precision, the optimizer and
the learning-rate schedule, the data order, the seed and stop signals, and progress bars. A stage's
command line is config.py's; its logs and checkpoints are record.py's.
"""

import math
import os
import random
import signal
import sys
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from nanoalign.config import check_dtype


# ----------------------------------------------------------------------------------- DDP

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: str = "cpu"
    master: bool = True
    ddp: bool = False


def init_dist(device: str = "auto") -> Dist:
    """One process, or one process per rank under torchrun (RANK, LOCAL_RANK, WORLD_SIZE set).

    Under torchrun the process group always starts, even for one rank, so `--nproc_per_node=1` runs
    exactly the code path of many GPUs. On CUDA the group has two backends: NCCL for CUDA tensors
    (gradients, statistics) and gloo for CPU tensors and Python objects (RNG states), because NCCL
    alone rejects CPU tensors. On the CPU: gloo."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(device))
    return Dist(rank, local_rank, world, device, rank == 0, True)


def process_group_backend(device: str) -> str:
    return "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"


def cleanup_dist():
    if dist.is_initialized():
        dist.destroy_process_group()


# Every collective of nanoalign is one of the four below (a test checks that no other file calls
# torch.distributed). Each is the identity in a single process.

def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks: global token counts and statistics."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def all_reduce_min(x: int, device) -> int:
    """The smallest value over ranks: a step count every rank can take (or DDP waits forever)."""
    t = torch.tensor(x, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj, d: Dist) -> list:
    """Every rank's `obj` (e.g. an RNG state), in rank order."""
    out = [obj] * d.world
    if dist.is_initialized():
        dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(stats: dict, d: Dist) -> dict:
    """{name: mean over ranks} of per-rank statistics (floats or 0-d tensors; None stays None).
    One float64 tensor on the rank's own device, one all-reduce and one copy to the host, however
    many statistics there are."""
    names = [k for k, v in stats.items() if v is not None]
    if not names:
        return dict(stats)
    local = torch.stack([torch.as_tensor(stats[k], dtype=torch.float64, device=d.device).reshape(())
                         for k in names])  # (n_stats,)
    means = dict(zip(names, (all_reduce_sum(local) / d.world).tolist()))
    return {k: means.get(k) for k in stats}


def wrap_ddp(model, d: Dist):
    """DistributedDataParallel around the trained module only (frozen models stay plain)."""
    if not d.ddp:
        return model
    device_ids = [d.local_rank] if "cuda" in d.device else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def no_sync_unless(model, d: Dist, sync: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation window."""
    return model.no_sync() if d.ddp and not sync else nullcontext()


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers: what we save and sample from."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------------- precision

def autocast(device: str, dtype: str):
    """bf16 autocast (on CUDA, and on the CPU if asked); float32 and float64: no autocast. Losses,
    log-softmaxes and the scalar head stay in fp32 inside it (generate.upcast, GPT.forward)."""
    check_dtype(dtype)
    if dtype in ("float32", "float64"):
        return nullcontext()
    if device.startswith("cpu"):  # warnings.warn prints this once per call site
        warnings.warn(f"--dtype {dtype} on the CPU: fast only where the CPU has native bf16 "
                      "matmuls (AVX512-BF16, AMX), else many times slower than float32; python "
                      "-m nanoalign.bench measures yours", stacklevel=2)
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def with_precision(model, dtype: str):
    """float64 weights for exact comparisons (the DDP tests); other dtypes keep fp32 weights."""
    return model.double() if dtype == "float64" else model


# ----------------------------------------------------------------------------------- optimisation

def make_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.95), eps=1e-8):
    """AdamW, with weight decay on 2-D weights (matmuls, embeddings) only, not on biases and
    LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel per parameter for the whole update, on CUDA and on the CPU (where PyTorch's
    # default is a Python loop of ~10 small ops per parameter): the same AdamW, rounded differently
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def lr_at(step: int, total: int, lr: float, warmup: int = 0, min_lr_frac: float = 0.1,
          schedule="cosine") -> float:
    """Linear warmup, then cosine decay to min_lr_frac * lr (or linear to 0, as PPO's references
    anneal)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return lr * (1 - frac)
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(model, optimizer, grad_clip: float):
    """Clip the global gradient norm (grad_clip 0: no clipping), step, and clear the gradients."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def batch_indices(n: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: consecutive slices of a stream of epochs, each
    epoch a permutation seeded by (seed, epoch). Depends only on its arguments, so resume and DDP
    need no data-loader state."""
    out, start = [], step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.extend(perm[offset:offset + global_batch - len(out)].tolist())
    return out


def rank_rows(rows: list, micro: int, d: Dist, batch_size: int) -> list:
    """This rank's micro-batch `micro` of a global batch laid out as
    [micro 0: rank 0, rank 1, ...][micro 1: rank 0, rank 1, ...]..."""
    first = (micro * d.world + d.rank) * batch_size
    return rows[first:first + batch_size]


# ----------------------------------------------------------------------------------- seed + signals

def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StopSignal:
    """SIGINT/SIGTERM only set a flag; the loop checks it at a step boundary, saves and exits.
    Under DDP the flag is reduced over ranks, so every rank stops at the same step (none is left
    waiting in a collective)."""

    stopped = False  # did the last loop in this process stop at a signal? (the pipeline asks)

    def __init__(self, device="cpu"):
        self.flag, self.device = False, device
        StopSignal.stopped = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handler)

    def handler(self, signum, frame):
        if self.flag:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.flag = True
        print(f"\n[nanoalign] signal {signum}: finishing this step, saving a checkpoint, then "
              "exiting", flush=True)

    def should_stop(self) -> bool:
        stop = all_reduce_min(0 if self.flag else 1, self.device) == 0  # any rank's flag stops all
        StopSignal.stopped = StopSignal.stopped or stop
        return stop


# ----------------------------------------------------------------------------------- progress

def progress(total: int, initial: int = 0, desc: str = "", disable: bool = False):
    """A tqdm bar with ETA; when stderr is not a terminal (a log file, CI) it redraws every 10 s,
    so logs stay readable."""
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 10.0)



