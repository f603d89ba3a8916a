"""
A run's record on disk: run.json and metrics.jsonl as it trains, and its checkpoints (the lineage,
the weights, the optimizer, every rank's RNG state), which the next stage starts from and --resume
continues exactly.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import pickle
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

from nanoalign.common import Dist, all_gather_object, unwrap
from nanoalign.machine import machine_name
from nanoalign.model import grow_vocab, load_gpt2
from nanoalign.tokenizer import Tokenizer, load_tokenizer


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
        # every rank checks (the rows are reduced); PPO logs pg_loss and vf_loss
        losses = [v for k, v in metrics.items() if k.endswith("loss") and isinstance(v, float)]
        if not all(math.isfinite(v) for v in losses):
            raise HealthError(f"non-finite loss at {metrics}: stopped; the checkpoint on disk is "
                              "from before it. Lower --lr, or use float32.")


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    """This process's RNG states as plain data (numpy's keys as a tensor), so that a checkpoint
    loads with weights_only=True."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    return {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state(),
            "cuda": cuda}


def set_rng_state(s: dict):
    random.setstate(s["python"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


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
    wrote it (a policy where a policy is expected) and the tokenizer identity. weights_only: a
    checkpoint holds tensors, numbers, strings, lists and dicts, never code to run."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    if os.path.isdir(path):
        return check_lineage(gpt2_checkpoint(path), path, stages, tokenizer)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: holds pickled objects, as checkpoints of older nanoalign "
                              "did; if you trust the file, convert it once: python -m "
                              f"nanoalign.record --convert {path}") from e
    if "tokenizer_state" not in ckpt:
        raise CheckpointError(f"{path}: names its tokenizer by path instead of carrying it: "
                              f"convert it once: python -m nanoalign.record --convert {path}")
    return check_lineage(ckpt, path, stages, tokenizer)


def check_lineage(ckpt: dict, path: str, stages, tokenizer) -> dict:
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
            "tokenizer": tok.name, "tokenizer_state": tok.state(), "parent": None}


def checkpoint_tokenizer(ckpt: dict) -> Tokenizer:
    """The tokenizer a checkpoint carries."""
    return Tokenizer.from_state(ckpt["tokenizer_state"])


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
               parent: str | None, **extra):
    """Every rank's RNG state is gathered (a collective, so every rank calls this); rank 0 writes
    one atomic file with the lineage (stage, parent, the tokenizer itself) and all that --resume
    needs."""
    rngs = all_gather_object(rng_state(), d)  # a resumed run continues each rank's stream
    if d.master:
        parent = os.path.abspath(parent) if parent else None
        save_checkpoint(path, stage=stage, model=unwrap(model).state_dict(),
                        model_config=asdict(unwrap(model).config), optimizer=optimizer.state_dict(),
                        step=step, config=asdict(cfg), tokenizer=tok.name,
                        tokenizer_state=tok.state(), parent=parent, rng=rngs, **extra)


def restore(ckpt: dict, model, optimizer, d: Dist) -> int:
    """Load weights, optimizer and this rank's RNG state; return the step to continue from."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"][min(d.rank, len(ckpt["rng"]) - 1)])
    return ckpt["step"]


def convert(path: str):
    """Rewrite a checkpoint of an older nanoalign (pickled numpy RNG state, tokenizer named by a
    path) as one that loads with weights_only=True from any directory. Loading the old file runs
    its pickles: only for files you trust."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "tokenizer_state" not in ckpt:
        ckpt["tokenizer_state"] = load_tokenizer(ckpt.pop("tokenizer_path")).state()
    for s in ckpt.get("rng", []):
        if isinstance(s["numpy"][1], np.ndarray):
            name, keys, pos, has_gauss, cached = s["numpy"]
            s["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    save_checkpoint(path, **ckpt)
    print(f"{path}: converted (tokenizer {ckpt['tokenizer']})")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert checkpoints of an older nanoalign.")
    parser.add_argument("--convert", nargs="+", required=True, metavar="CKPT", help="files to fix")
    for path in parser.parse_args(argv).convert:
        convert(path)


if __name__ == "__main__":
    main()
