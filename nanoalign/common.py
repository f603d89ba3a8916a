"""
Runtime plumbing shared by every stage, kept out of the stage files so that they read as algorithms:
the config dataclass as a command line, DDP (every collective lives here), precision, the optimizer
and learning-rate schedule, RNG state and stop signals, logging, and checkpoints.
"""

import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from nanoalign.model import grow_vocab, load_gpt2
from nanoalign.tokenizer import load_tokenizer


# ----------------------------------------------------------------------------------- config -> CLI

def field_help(cls) -> dict:
    """Each config field's comment, which becomes its --help text: the comment on the field's own
    line, or else the comment lines just above it."""
    helps = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        above = []
        for line in inspect.getsource(klass).splitlines():
            field = re.match(r"\s+(\w+)\s*:[^=#]+=[^#]*(?:#\s*(.*))?$", line)
            if line.strip().startswith("#"):
                above.append(line.strip().lstrip("#").strip())
            elif field:
                helps[field.group(1)] = field.group(2) or " ".join(above)
                above = []
            else:
                above = []
    return helps


def parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def field_parser(f):
    """The string -> value conversion of one config field."""
    if f.type in (bool, "bool"):
        return parse_bool
    if "None" in str(f.type):  # e.g. `str | None`: the string "none" means None
        base = {"int": int, "float": float}.get(str(f.type).split("|")[0].strip(), str)
        return lambda s: None if s.lower() == "none" else base(s)
    return {"int": int, "float": float, "str": str}.get(f.type, f.type if callable(f.type) else str)


def parse_config(cls, argv=None, doc: str | None = None):
    """Build a config dataclass from `--field value` flags (`--field-name` works too). Unknown flags
    and wrong types stop with the field named (argparse); then the dataclass's own `validate()`
    rejects impossible values before any work."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        convert = field_parser(f)
        names = dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"])  # once if equal
        # a bare `--resume` means `--resume true`
        bare = {"nargs": "?", "const": True} if convert is parse_bool else {}
        parser.add_argument(*names, dest=f.name, type=convert, default=default, **bare,
                            metavar=type(default).__name__ if default is not None else "X",
                            help=f"{helps.get(f.name, '')} (default: {default})".replace("%", "%%"))
    cfg = cls(**vars(parser.parse_args(argv)))
    try:
        if getattr(cfg, "dtype", ""):  # "": the default of whoever reads it (a pipeline preset)
            check_dtype(cfg.dtype)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except ValueError as e:
        parser.error(str(e))
    return cfg


def check(cond: bool, field: str, msg: str):
    """Config validation: raise ValueError('--field: msg') when cond is false."""
    if not cond:
        raise ValueError(f"--{field}: {msg}")


def config_hash(cfg, roots: dict | None = None) -> str:
    """Hash of a config. roots {placeholder: path}: those path prefixes are replaced first, so that
    a run directory moved or copied elsewhere keeps its hashes."""
    d = dataclasses.asdict(cfg)
    for tag, root in (roots or {}).items():
        d = {k: v.replace(root, tag) if isinstance(v, str) and root else v for k, v in d.items()}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


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

DTYPES = ("float32", "bfloat16", "float64")


def check_dtype(dtype: str):
    """float16 would need a gradient scaler (its 5-bit exponent underflows small gradients), which
    nanoalign leaves out: bfloat16 has float32's range, on every GPU since Ampere."""
    hint = " (float16 needs a gradient scaler: use bfloat16)" if dtype == "float16" else ""
    check(dtype in DTYPES, "dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}{hint}")


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


# ----------------------------------------------------------------------------------- RNG + signals

def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(s: dict):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class StopSignal:
    """SIGINT/SIGTERM only set a flag; the loop checks it at a step boundary, saves and exits.
    Under DDP the flag is reduced over ranks, so every rank stops at the same step (none is left
    waiting in a collective)."""

    def __init__(self, device="cpu"):
        self.flag, self.device = False, device
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handler)

    def handler(self, signum, frame):
        if self.flag:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.flag = True
        print(f"\n[nanoalign] signal {signum}: finishing this step, saving a checkpoint, then "
              "exiting", flush=True)

    def should_stop(self) -> bool:
        return all_reduce_min(0 if self.flag else 1, self.device) == 0  # any rank's flag stops all


# ----------------------------------------------------------------------------------- logging

def run_info(cfg) -> dict:
    """Everything needed to reproduce a run: command line, config, versions, git commit."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=here).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"argv": sys.argv, "config": dataclasses.asdict(cfg),
            "python": platform.python_version(), "torch": torch.__version__, "git_commit": commit,
            "machine": machine_name(), "time": time.time()}


def machine_name(device: str = "") -> str:
    """The GPU's name, or the CPU's model and threads: figures differ slightly between machines."""
    if device.startswith("cuda") or (not device and torch.cuda.is_available()):
        return torch.cuda.get_device_name(device or 0)
    name = f"{platform.machine()} CPU"
    if os.path.exists("/proc/cpuinfo"):
        lines = open("/proc/cpuinfo").read().splitlines()
        models = [s.split(":", 1)[1].strip() for s in lines if s.startswith("model name")]
        name = models[0] if models else name
    return f"{name}, {torch.get_num_threads()} threads"


def progress(total: int, initial: int = 0, desc: str = "", disable: bool = False):
    """A tqdm bar with ETA; when stderr is not a terminal (a log file, CI) it redraws every 10 s,
    so logs stay readable."""
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 10.0)


class HealthError(RuntimeError):
    pass


class MetricsLog:
    """Appends one JSON object per line to out_dir/metrics.jsonl (rank 0 only); run.json records
    the run. A non-finite loss stops training before the row's step is checkpointed (python -m
    nanoalign.doctor reads a finished log for the other failure signatures).

    resume_step: the step (or PPO/GRPO iteration) of the checkpoint a resumed run continues from.
    Rows logged after it, between the last checkpoint and a crash, are dropped: the resumed run logs
    those steps again."""

    def __init__(self, out_dir: str, cfg, master: bool = True, resume_step: int | None = None):
        self.master, self.path = master, os.path.join(out_dir, "metrics.jsonl")
        if master:
            os.makedirs(out_dir, exist_ok=True)
            kept = []
            if resume_step is not None and os.path.exists(self.path):
                kept = [r for r in read_metrics(self.path)
                        if r.get("step", r.get("iter", 0)) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            with open(os.path.join(out_dir, "run.json"), "w") as f:
                json.dump(run_info(cfg), f, indent=1, default=str)

    def log(self, **metrics):
        metrics = {k: (float(v) if torch.is_tensor(v) else v) for k, v in metrics.items()}
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        loss = metrics.get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):  # every rank: the rows are reduced
            raise HealthError(f"non-finite loss at {metrics}: stopped; the checkpoint on disk is "
                              "from before it. Lower --lr, or use float32.")


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str, **state):
    """Atomic: write a temporary file in the same directory, then rename it over the target. A crash
    mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


class CheckpointError(ValueError):
    pass


def load_checkpoint(path: str, stages=None, tokenizer: str | None = None) -> dict:
    """Load a checkpoint (or a Hugging Face GPT-2 directory) and check its lineage: the stage that
    wrote it (a policy where a policy is expected) and the tokenizer identity."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    if os.path.isdir(path):
        ckpt = gpt2_checkpoint(path)
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if stages is not None and ckpt.get("stage") not in stages:
        raise CheckpointError(f"{path}: is a '{ckpt.get('stage')}' checkpoint, expected one of "
                              f"{list(stages)}")
    if tokenizer is not None and ckpt.get("tokenizer") != tokenizer:
        raise CheckpointError(f"{path}: trained with tokenizer {ckpt.get('tokenizer')}, but "
                              f"{tokenizer} is in use")
    return ckpt


def gpt2_checkpoint(directory: str) -> dict:
    """A Hugging Face GPT-2 directory (model.safetensors or pytorch_model.bin, config.json,
    vocab.json, merges.txt) as a pretrain-stage checkpoint, the embedding grown for the chat
    tokens: any stage's --init can start from GPT-2."""
    for name in ("vocab.json", "merges.txt"):
        if not os.path.exists(os.path.join(directory, name)):
            raise CheckpointError(f"{directory}: a GPT-2 directory needs {name} (the tokenizer) "
                                  "beside the weights")
    tok = load_tokenizer(directory)
    model = grow_vocab(load_gpt2(directory), tok.n_vocab)
    return {"stage": "pretrain", "model": model.state_dict(), "model_config": asdict(model.config),
            "tokenizer": tok.name, "tokenizer_path": directory, "parent": None}


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def generator_states(generator: torch.Generator, d: Dist) -> list:
    """Every rank's sampling generator state, for the checkpoint (a collective: all ranks call)."""
    return all_gather_object(generator.get_state(), d)


def save_stage(path: str, d: Dist, stage: str, model, optimizer, step: int, cfg, tok,
               tokenizer_path: str, parent: str | None, **extra):
    """Every rank's RNG state is gathered (a collective, so every rank calls this); rank 0 writes
    one atomic file with the lineage (stage, parent, tokenizer) and all that --resume needs."""
    rngs = all_gather_object(rng_state(), d)  # a resumed run continues each rank's stream
    if d.master:
        parent = os.path.abspath(parent) if parent else None
        save_checkpoint(path, stage=stage, model=unwrap(model).state_dict(),
                        model_config=asdict(unwrap(model).config), optimizer=optimizer.state_dict(),
                        step=step, config=asdict(cfg), tokenizer=tok.name,
                        tokenizer_path=tokenizer_path, parent=parent, rng=rngs, **extra)


def restore(ckpt: dict, model, optimizer, d: Dist) -> int:
    """Load weights, optimizer and this rank's RNG state; return the step to continue from."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"][min(d.rank, len(ckpt["rng"]) - 1)])
    return ckpt["step"]
