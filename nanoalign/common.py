"""
Runtime plumbing shared by every stage, kept out of the stage files so they read as algorithms:
config dataclass -> command line, DDP set-up, logging, checkpoints, learning-rate schedule, RNG state, stop signals.
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


# ---------------------------------------------------------------------------------------------- config -> CLI

def _field_comments(cls) -> dict:
    """The trailing `# comment` of each field in a config dataclass's source: they become the --help texts."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s+(\w+)\s*:[^=#]+=.*?#\s*(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2)
    return comments


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def parse_config(cls, argv=None, doc: str | None = None):
    """Build a config dataclass from `--field value` flags. Unknown flags and wrong types stop with the field
    named (argparse); then the dataclass's own `validate()` (if any) rejects impossible values before any work."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        typ = {bool: _parse_bool, "bool": _parse_bool}.get(f.type, None)
        if typ is None:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type if callable(f.type) else str)
        if "None" in str(f.type):  # e.g. `str | None`: the string "none" means None
            base = str(f.type).split("|")[0].strip()
            conv = {"int": int, "float": float}.get(base, str)
            typ = (lambda c: lambda s: None if s.lower() == "none" else c(s))(conv)
        flag = {"nargs": "?", "const": True} if typ is _parse_bool else {}  # a bare `--resume` means `--resume true`
        parser.add_argument(f"--{f.name}", f"--{f.name.replace('_', '-')}", dest=f.name, type=typ, default=default,
                            metavar=type(default).__name__ if default is not None else "X", **flag,
                            help=f"{comments.get(f.name, '')} (default: {default})".replace("%", "%%"))
    args = parser.parse_args(argv)
    cfg = cls(**vars(args))
    try:
        if getattr(cfg, "dtype", ""):  # "" = the default of whoever reads it (the pipeline's presets)
            check_dtype(cfg.dtype)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except ValueError as e:
        parser.error(str(e))
    return cfg


def check(cond: bool, field: str, msg: str):
    """Config validation helper: raise ValueError('--field: msg') when cond is false."""
    if not cond:
        raise ValueError(f"--{field}: {msg}")


def config_hash(cfg, roots: dict | None = None) -> str:
    """Hash of a config. roots {placeholder: path}: those path prefixes are replaced first, so that a run directory
    moved or copied elsewhere keeps its hashes."""
    d = dataclasses.asdict(cfg)
    for tag, root in (roots or {}).items():
        d = {k: v.replace(root, tag) if isinstance(v, str) and root else v for k, v in d.items()}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- DDP

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: str = "cpu"
    master: bool = True
    ddp: bool = False


def init_dist(device: str = "auto") -> Dist:
    """One process, or one process per rank under torchrun (RANK, LOCAL_RANK, WORLD_SIZE in the environment).

    Under torchrun the process group always starts, even for one rank, so `--nproc_per_node=1` runs exactly the code
    path of many GPUs. On CUDA the group has two backends: NCCL for CUDA tensors (gradients, statistics) and gloo for
    CPU tensors and Python objects (RNG states), because NCCL alone rejects CPU tensors. On CPU: gloo."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(device=device)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
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


# Every collective of nanoalign is one of the four below (tests/test_ddp.py checks that no other file calls
# torch.distributed). Each is the identity in a single process.

def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks: global token counts and statistics."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def all_reduce_min(x: int, device) -> int:
    """The smallest value over ranks: a step count every rank can take (or DDP would wait forever)."""
    t = torch.tensor(x, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj, d: "Dist") -> list:
    """Every rank's `obj` (e.g. an RNG state), in rank order."""
    out = [obj] * d.world
    if dist.is_initialized():
        dist.all_gather_object(out, obj)
    return out


def global_means(stats: dict, d: "Dist") -> dict:
    """{name: mean over ranks} of per-rank statistics (floats or 0-d tensors; None stays None). One float64 tensor
    on the rank's own device, one all-reduce and one copy to the host, however many statistics there are."""
    names = [k for k, v in stats.items() if v is not None]
    if not names:
        return dict(stats)
    local = torch.stack([torch.as_tensor(stats[k], dtype=torch.float64, device=d.device).reshape(())
                         for k in names])
    values = (all_reduce_sum(local) / d.world).tolist()
    return {k: values[names.index(k)] if k in names else None for k in stats}


def wrap_ddp(model, d: Dist):
    """DistributedDataParallel around the trained module only (frozen reference and reward models stay plain)."""
    if not d.ddp:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if "cuda" in d.device else None)


def no_sync_unless(model, d: Dist, sync: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation window."""
    return model.no_sync() if d.ddp and not sync else nullcontext()


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers: what we save and what generation calls."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


DTYPES = ("float32", "bfloat16", "float64")


def check_dtype(dtype: str):
    """float16 would need a gradient scaler (its 5-bit exponent underflows small gradients), which nanoalign leaves
    out: bfloat16 has float32's range and runs on the GPUs that have fast float16 (Ampere and newer)."""
    check(dtype in DTYPES, "dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}" + (
        " (float16 needs a gradient scaler: use bfloat16, which has float32's range)" if dtype == "float16" else ""))


def autocast(device: str, dtype: str):
    """bf16 autocast (on CUDA, and on the CPU if asked); float32 and float64 = no autocast. Losses, log-softmaxes and
    the scalar head stay in fp32 inside it (generate.upcast, GPT.forward)."""
    check_dtype(dtype)
    if dtype in ("float32", "float64"):
        return nullcontext()
    if device.startswith("cpu"):  # warnings.warn prints this once per call site
        warnings.warn(f"--dtype {dtype} on the CPU: most CPUs have no native {dtype} matmul, so this is usually many "
                      "times slower than float32 (19x on the reference machine; python -m nanoalign.bench measures "
                      "yours)", stacklevel=2)
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


# ---------------------------------------------------------------------------------------------- optimisation

def with_precision(model, dtype: str):
    """float64 weights for exact comparisons (the DDP tests); other dtypes keep fp32 weights and use autocast."""
    return model.double() if dtype == "float64" else model


def make_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.95), eps=1e-8):
    """AdamW with weight decay on 2-D weights (matmuls, embeddings) only, not on biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel per parameter for the whole update. On CUDA and on CPU (where PyTorch's default is a Python
    # loop of ~10 small ops per parameter) it is the same AdamW, rounded differently, and faster (bench.py)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def lr_at(step: int, total: int, lr: float, warmup: int = 0, min_lr_frac: float = 0.1, schedule="cosine") -> float:
    """Linear warmup, then cosine decay to min_lr_frac * lr (or linear to 0, as PPO implementations anneal)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return lr * (1 - frac)
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def batch_indices(n: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: consecutive slices of a stream of epochs, each epoch a permutation
    seeded by (seed, epoch). Depends only on its arguments, so resume and DDP need no data-loader state."""
    out, start = [], step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.extend(perm[offset:offset + global_batch - len(out)].tolist())
    return out


def rank_rows(rows: list, micro: int, d: "Dist", batch_size: int) -> list:
    """This rank's micro-batch `micro` of a global batch laid out as [micro 0: rank 0, rank 1, ...][micro 1: ...]."""
    first = (micro * d.world + d.rank) * batch_size
    return rows[first:first + batch_size]


# ---------------------------------------------------------------------------------------------- RNG + signals

def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class StopSignal:
    """SIGINT/SIGTERM only set a flag; the loop checks it at a step boundary, saves, and exits cleanly.
    Under DDP the flag is all-reduced so every rank stops at the same step (no rank left waiting in a collective)."""

    def __init__(self, device="cpu"):
        self.flag, self.device = False, device
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.flag:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.flag = True
        print(f"\n[nanoalign] signal {signum}: finishing this step, saving a checkpoint, then exiting", flush=True)

    def should_stop(self) -> bool:
        return all_reduce_min(0 if self.flag else 1, self.device) == 0  # any rank's flag stops every rank


# ---------------------------------------------------------------------------------------------- logging

def run_info(cfg) -> dict:
    """Everything needed to reproduce a run: command line, config, versions, git commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"argv": sys.argv, "config": dataclasses.asdict(cfg), "python": platform.python_version(),
            "torch": torch.__version__, "git_commit": commit, "machine": machine_name(), "time": time.time()}


def machine_name(device: str = "") -> str:
    """The GPU's name, or the CPU's model with its threads: figures differ between CPUs (rounding, native bf16)."""
    if device.startswith("cuda") or (not device and torch.cuda.is_available()):
        return torch.cuda.get_device_name(device or 0)
    lines = open("/proc/cpuinfo").read().splitlines() if os.path.exists("/proc/cpuinfo") else []
    name = next((s.split(":", 1)[1].strip() for s in lines if s.startswith("model name")), f"{platform.machine()} CPU")
    flags = set(next((s.split(":", 1)[1].split() for s in lines if s.startswith("flags")), []))
    # "AMD EPYC" names several CPU generations; whether bf16 can be fast here depends on these flags
    native = [label for flag, label in [("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16")] if flag in flags]
    return name + (f" ({', '.join(native)})" if native else "") + f", {torch.get_num_threads()} threads"


def progress(total: int, initial: int = 0, desc: str = "", disable: bool = False):
    """A tqdm bar with ETA; when stderr is not a terminal (a log file, CI) it redraws every 10 s, not 10 times a
    second, so logs stay readable."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 10.0)


class HealthError(RuntimeError):
    pass


TUTORIAL = "tutorials/{}#healthy-and-unhealthy-curves"


class Doctor:
    """The run doctor: reads every logged row for the known failure signatures and warns once per signature with what
    it usually means and where the tutorials explain it. A non-finite loss stops the run at once (the checkpoint on
    disk is then the last good one: rows are logged before a save); with --strict every warning stops it."""

    def __init__(self, strict: bool = False, master: bool = True):
        self.strict, self.master, self.rows, self.warned = strict, master, [], set()

    def check(self, row: dict):
        self.rows.append(row)
        for name, message in diagnose(self.rows):
            if name not in self.warned:
                self.warned.add(name)
                text = f"[doctor] {name}: {message}"
                if name == "non-finite loss" or self.strict:
                    raise HealthError(text)
                if self.master:
                    print(text, file=sys.stderr)


def diagnose(rows: list[dict]) -> list[tuple[str, str]]:
    """(signature, explanation) of each failure signature that the rows logged so far show. Thresholds are loose on
    purpose: a healthy run of any preset stays silent."""
    row, found = rows[-1], []
    window = lambda key, a, b: [r[key] for r in rows[a:b] if isinstance(r.get(key), (int, float))]
    mean = lambda xs: sum(xs) / len(xs)
    if isinstance(row.get("loss"), float) and not math.isfinite(row["loss"]):
        found.append(("non-finite loss", "the loss is NaN or inf: the learning rate is too high, or fp16 overflowed. "
                      "Stopped; the checkpoint on disk is from before it. Lower --lr, or use bfloat16/float32."))
    if isinstance(row.get("kl"), float) and row["kl"] < -1.0:  # the mean of k1 over samples of pi cannot be < 0
        found.append(("negative KL", "the sampled KL to the reference is clearly negative: the log-probs are not those "
                      "of the sampling distribution (temperature, top-k/top-p). See " + TUTORIAL.format("04-ppo.md")))
    if isinstance(row.get("kl"), float) and row["kl"] > 50.0:
        found.append(("exploding KL", f"the policy is {row['kl']:.0f} nats from the reference: beta too small or lr too"
                      " high, and the reward model is being exploited. See " + TUTORIAL.format("04-ppo.md")))
    if isinstance(row.get("entropy"), float) and row["entropy"] < 0.05:
        found.append(("entropy collapse", "the policy is nearly deterministic: every answer looks the same and RL "
                      "has nothing left to compare. See " + TUTORIAL.format("04-ppo.md")))
    ends = window("end_rate", -50, len(rows)) if "end_rate" in row else []  # windows only where the row has the key
    if len(ends) >= 4 and max(ends[:-3]) > 0.5 and max(ends[-3:]) == 0.0:
        found.append(("no end token", "no answer emits <|end|> any more: the policy learned to ramble. See "
                      + TUTORIAL.format("04-ppo.md")))
    chosen = window("logps/chosen", 0, len(rows)) if "logps/chosen" in row else []
    rejected = window("logps/rejected", 0, len(rows)) if "logps/rejected" in row else []
    if len(chosen) >= 10 and len(rejected) >= 10:
        c0, r0, c1, r1 = mean(chosen[:5]), mean(rejected[:5]), mean(chosen[-5:]), mean(rejected[-5:])
        if c1 < 1.25 * c0 and r1 < r0:  # (log-probs are negative) chosen lost a quarter of its log-prob, rejected too
            found.append(("DPO log-probs collapsing", f"log p(chosen) {c0:.1f} -> {c1:.1f} and log p(rejected) "
                          f"{r0:.1f} -> {r1:.1f}: both answers lose probability, a known DPO failure (raise --beta, "
                          "lower --lr, or use --label_smoothing). See " + TUTORIAL.format("05-dpo.md")))
    score, gold = window("score", -20, -10), window("gold", -20, -10)
    score_now, gold_now = window("score", -10, len(rows)), window("gold", -10, len(rows))
    if "gold" in row and len(rows) >= 20 and len(gold) == len(gold_now) == 10 and len(score) == len(score_now) == 10:
        if mean(score_now) > mean(score) + 0.1 and mean(gold_now) < mean(gold) - 0.1:
            found.append(("over-optimisation", "the reward rises while the gold judge's score falls: the policy is "
                          "exploiting the reward model. Raise --kl_coef or stop earlier. See "
                          + TUTORIAL.format("04-ppo.md")))
    if row.get("tokens_per_s") == 0:
        found.append(("no trainable tokens", "a step had no answer tokens to train on: every answer was truncated "
                      "away? Raise --max_len or shorten the prompts."))
    return found


class MetricsLog:
    """Appends one JSON object per line to out_dir/metrics.jsonl (rank 0 only); run.json records the run. Every row
    also goes to the run doctor (on every rank: the rows are all-reduced, so every rank stops together).

    resume_step: the step (or PPO/GRPO iteration) of the checkpoint a resumed run continues from. Rows logged after
    it, between the last checkpoint and a crash, are dropped: the resumed run logs those steps again."""

    def __init__(self, out_dir: str, cfg, master: bool = True, resume_step: int | None = None):
        self.master, self.doctor = master, Doctor(getattr(cfg, "strict", False), master)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if master:
            os.makedirs(out_dir, exist_ok=True)
            kept = []
            if resume_step is not None and os.path.exists(self.path):
                kept = [r for r in read_metrics(self.path) if r.get("step", r.get("iter", 0)) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            with open(os.path.join(out_dir, "run.json"), "w") as f:
                json.dump(run_info(cfg), f, indent=1, default=str)

    def log(self, **metrics):
        metrics = {k: (float(v) if torch.is_tensor(v) else v) for k, v in metrics.items()}
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        self.doctor.check(metrics)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str, **state):
    """Atomic: write a temp file in the same directory, then rename over the target. A crash mid-write leaves the
    previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


class CheckpointError(ValueError):
    pass


def load_checkpoint(path: str, stages=None, tokenizer: str | None = None, map_location="cpu") -> dict:
    """Load a checkpoint and check its lineage: the stage that wrote it (e.g. a policy where a policy is expected)
    and the tokenizer identity."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    ckpt = gpt2_checkpoint(path) if os.path.isdir(path) else torch.load(path, map_location=map_location,
                                                                          weights_only=False)
    if stages is not None and ckpt.get("stage") not in stages:
        raise CheckpointError(f"{path}: is a '{ckpt.get('stage')}' checkpoint, expected one of {list(stages)}")
    if tokenizer is not None and ckpt.get("tokenizer") != tokenizer:
        raise CheckpointError(f"{path}: trained with tokenizer {ckpt.get('tokenizer')}, but {tokenizer} is in use")
    return ckpt


def gpt2_checkpoint(directory: str) -> dict:
    """A Hugging Face GPT-2 directory (model.safetensors or pytorch_model.bin, config.json, vocab.json, merges.txt) as
    a pretrain-stage checkpoint, the embedding grown for the chat tokens: any stage's --init can start from GPT-2."""
    from nanoalign.model import grow_vocab, load_gpt2
    from nanoalign.tokenizer import load_tokenizer
    for name in ("vocab.json", "merges.txt"):
        if not os.path.exists(os.path.join(directory, name)):
            raise CheckpointError(f"{directory}: a GPT-2 directory needs {name} (the tokenizer) beside the weights")
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
    """Every rank's sampling generator state, for the checkpoint (a collective: all ranks call it)."""
    return all_gather_object(generator.get_state(), d)


def save_stage(path: str, d: Dist, stage: str, model, optimizer, step: int, cfg, tok, tokenizer_path: str,
               parent: str | None, **extra):
    """Every rank's RNG state is gathered (a collective, so all ranks call this); rank 0 writes one atomic file with
    the lineage (stage, parent, tokenizer) and everything --resume needs."""
    rngs = all_gather_object(rng_state(), d)  # every rank's RNG state: a resumed run continues each stream
    if d.master:
        save_checkpoint(path, stage=stage, model=model_state(model), model_config=asdict(unwrap(model).config),
                        optimizer=optimizer.state_dict(), step=step, config=asdict(cfg), tokenizer=tok.name,
                        tokenizer_path=tokenizer_path, parent=os.path.abspath(parent) if parent else None, rng=rngs,
                        **extra)


def restore(ckpt: dict, model, optimizer, d: Dist) -> int:
    """Load weights, optimizer and this rank's RNG state from a checkpoint; return the step to continue from."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"][min(d.rank, len(ckpt["rng"]) - 1)])
    return ckpt["step"]


def model_state(model) -> dict:
    """The state dict of the unwrapped model (no 'module.' or '_orig_mod.' prefixes)."""
    return unwrap(model).state_dict()


def build_model(ckpt: dict, device="cpu", scalar_head: bool = True):
    """Rebuild the GPT from a checkpoint dict, with its scalar head if it had one and scalar_head is true. A stage
    whose loss never reads a parent's head (SFT or DPO from a PPO policy) must drop it: under DDP an unused parameter
    stops the second step ("Expected to have finished reduction in the prior iteration")."""
    from nanoalign.model import GPT, GPTConfig
    model = GPT(GPTConfig(**ckpt["model_config"]))
    sd = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in ckpt["model"].items()}
    if scalar_head and any(k.startswith("scalar_head.") for k in sd):
        model.add_scalar_head()
    if not scalar_head:
        sd = {k: v for k, v in sd.items() if not k.startswith("scalar_head.")}
    model.load_state_dict(sd)
    return model.to(device)
