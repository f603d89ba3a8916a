"""
The whole pipeline in one command, on the built-in world:

    world -> tokenizer -> pretrain -> SFT -> reward model -> PPO, DPO (, GRPO) -> evaluate -> report + plots

    python -m nanoalign.pipeline                      # the tiny preset: about 10 minutes on 2 CPU cores
    python -m nanoalign.pipeline --preset micro --out out/micro    # seconds per stage (what the tests run)

Each stage writes out/<run>/<stage>/ckpt.pt and a done.json with the hash of its config and of its parent checkpoint.
Running the command again skips a stage only when both hashes match; a stage that was interrupted resumes from its
checkpoint; a stage whose config or parent changed is re-run (never a stale checkpoint reused). --rerun forces stages.
"""

import json
import os
import sys
import time
from dataclasses import dataclass

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import common, evaluate, train_dpo, train_grpo, train_ppo, train_pretrain, train_rm, train_sft, world

# Per-stage overrides of each stage's own defaults. "tiny" is the stage defaults themselves: one source of truth.
PRESETS = {
    "micro": {
        "world": {"scale": 0.05},
        "pretrain": {"n_layer": 2, "n_head": 2, "n_embd": 64, "max_steps": 40, "batch_size": 8, "eval_interval": 20,
                     "eval_batches": 2},
        "sft": {"max_steps": 20, "batch_size": 8, "eval_interval": 10, "n_samples": 1},
        "rm": {"epochs": 0.3, "batch_size": 8, "eval_interval": 10, "norm_examples": 32},
        "ppo": {"iterations": 3, "batch_size": 8, "minibatches": 2, "ppo_epochs": 2, "max_new_tokens": 32,
                "sample_interval": 0, "save_interval": 2},
        "dpo": {"epochs": 0.2, "batch_size": 8, "eval_interval": 10},
        "grpo": {"iterations": 3, "prompts_per_iter": 4, "group_size": 2, "minibatches": 2, "ppo_epochs": 2,
                 "max_new_tokens": 32, "save_interval": 2},
        "evaluate": {"n_prompts": 24, "max_new_tokens": 48, "batch_size": 24},
    },
    "tiny": {"world": {}, "pretrain": {}, "sft": {}, "rm": {}, "ppo": {}, "dpo": {}, "grpo": {}, "evaluate": {}},
    "gpu": {  # one GPU: a GPT-2-small-sized model (124M) on the same world; bf16 autocast
        "world": {"scale": 4.0},
        "pretrain": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 256, "batch_size": 64, "max_steps": 3000,
                     "lr": 6e-4, "warmup": 200, "dtype": "bfloat16", "eval_interval": 500, "vocab_size": 2048},
        "sft": {"max_steps": 1000, "batch_size": 64, "lr": 1e-4, "dtype": "bfloat16"},
        "rm": {"batch_size": 64, "lr": 3e-5, "dtype": "bfloat16"},
        "ppo": {"iterations": 200, "batch_size": 256, "minibatches": 8, "lr": 1e-5, "dtype": "bfloat16"},
        "dpo": {"batch_size": 64, "lr": 5e-6, "dtype": "bfloat16"},
        "grpo": {"iterations": 200, "prompts_per_iter": 64, "minibatches": 8, "lr": 1e-5, "dtype": "bfloat16"},
        "evaluate": {"n_prompts": 800},
    },
}


@dataclass
class PipelineConfig:
    preset: str = "tiny"  # micro | tiny | gpu
    out: str = "out/tiny"  # run directory: out/<run>/<stage>/
    world_dir: str = ""  # where the world's data go ("" = data/world for tiny, <out>/world otherwise)
    seed: int = 0  # seed of the world and of every stage
    stages: str = "pretrain,sft,rm,ppo,dpo,grpo"  # training stages to run, in order
    rerun: str = ""  # comma-separated stages to re-run even if done ("all" = every stage)
    online_dpo: bool = False  # add an online DPO stage (two rounds with RM labels) after offline DPO
    device: str = "auto"  # auto | cpu | cuda

    def validate(self):
        common.check(self.preset in PRESETS, "preset", f"one of {list(PRESETS)}")


def stage_plan(cfg: PipelineConfig, world_dir: str) -> list:
    """(name, module, argv) for every training stage, wired parent -> child."""
    p, out, seed = PRESETS[cfg.preset], cfg.out, str(cfg.seed)
    ck = {s: os.path.join(out, s, "ckpt.pt") for s in ("pretrain", "sft", "rm", "dpo")}
    w = lambda name: os.path.join(world_dir, name)
    common_args = {"seed": seed, "device": cfg.device}
    plan = {
        "pretrain": (train_pretrain, {"data": w("pretrain.txt"), "val_data": w("pretrain_val.txt"),
                                      "tokenizer": w(f"tok{p['pretrain'].get('vocab_size', 512)}.tiktoken")}),
        "sft": (train_sft, {"init": ck["pretrain"], "data": w("sft_train.jsonl"), "val_data": w("sft_val.jsonl")}),
        "rm": (train_rm, {"init": ck["sft"], "data": w("prefs_train.jsonl"), "val_data": w("prefs_val.jsonl"),
                          "norm_data": w("sft_train.jsonl")}),
        "ppo": (train_ppo, {"init": ck["sft"], "reward_model": ck["rm"], "prompts": w("prompts_rl.jsonl")}),
        "dpo": (train_dpo, {"init": ck["sft"], "data": w("prefs_train.jsonl"), "val_data": w("prefs_val.jsonl")}),
        "grpo": (train_grpo, {"init": ck["sft"], "reward_model": ck["rm"], "prompts": w("prompts_rl.jsonl")}),
        "online_dpo": (train_dpo, {"init": ck["dpo"], "epochs": "0", "online_rounds": "2", "reward_model": ck["rm"],
                                   "online_prompts": w("prompts_rl.jsonl"), "val_data": w("prefs_val.jsonl")}),
    }
    names = [s for s in cfg.stages.split(",") if s] + (["online_dpo"] if cfg.online_dpo else [])
    out_plan = []
    for name in names:
        module, args = plan[name]
        overrides = p.get("dpo" if name == "online_dpo" else name, {})  # online DPO shares DPO's sizes
        args = {**common_args, **args, **{k: str(v) for k, v in overrides.items()}}
        if name == "online_dpo":
            args.update(epochs="0", online_rounds="2")
        args["out_dir"] = os.path.join(out, name)
        out_plan.append((name, module, args))
    return out_plan


def run_stage(name, module, args: dict, force: bool) -> float:
    """Run one stage unless its done.json matches (config hash + parent checkpoint hash). Returns wall seconds."""
    argv = [x for k, v in args.items() for x in (f"--{k}", str(v))]
    cfg_cls = {train_pretrain: train_pretrain.PretrainConfig, train_sft: train_sft.SFTConfig,
               train_rm: train_rm.RMConfig, train_ppo: train_ppo.PPOConfig, train_dpo: train_dpo.DPOConfig,
               train_grpo: train_grpo.GRPOConfig}[module]
    stage_cfg = common.parse_config(cfg_cls, argv)
    parent = getattr(stage_cfg, "init", "")
    stamp = {"config": common.config_hash(stage_cfg), "parent": common.file_hash(parent) if parent else None}
    done_path, ckpt = os.path.join(args["out_dir"], "done.json"), os.path.join(args["out_dir"], "ckpt.pt")
    if os.path.exists(done_path) and os.path.exists(ckpt) and not force:
        with open(done_path) as f:
            done = json.load(f)
        if {k: done.get(k) for k in stamp} == stamp:
            print(f"[pipeline] {name}: done (config and parent unchanged), skipping")
            return done["wall_seconds"]
        print(f"[pipeline] {name}: config or parent checkpoint changed since the last run: re-running it")
        os.remove(done_path)
    elif os.path.exists(ckpt) and not force and name != "online_dpo":
        print(f"[pipeline] {name}: found an unfinished run, resuming it")
        argv += ["--resume", "true"]
    print(f"[pipeline] {name}: python -m {module.__name__} {' '.join(argv)}")
    t0 = time.time()
    module.main(argv)
    wall = time.time() - t0
    with open(done_path, "w") as f:
        json.dump({**stamp, "wall_seconds": wall}, f)
    return wall


def main(argv=None):
    cfg = common.parse_config(PipelineConfig, argv, __doc__)
    t_start = time.time()
    world_dir = cfg.world_dir or ("data/world" if cfg.preset == "tiny" else os.path.join(cfg.out, "world"))
    wall = {"world": world.ensure_world(world_dir, cfg.seed, **PRESETS[cfg.preset]["world"])}
    force = set(s for s in cfg.rerun.split(",") if s)
    for name, module, args in stage_plan(cfg, world_dir):
        wall[name] = run_stage(name, module, args, "all" in force or name in force)
    evaluate.write_report(cfg.out, world_dir, cfg.preset, PRESETS[cfg.preset]["evaluate"], wall, t_start, cfg.device,
                          cfg.seed)
    print(f"[pipeline] done in {time.time() - t_start:.0f} s: {os.path.join(cfg.out, 'report.md')}")


if __name__ == "__main__":
    main()
