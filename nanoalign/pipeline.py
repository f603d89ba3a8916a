"""
The whole pipeline in one command, on the built-in world:

    world -> tokenizer -> pretrain -> SFT -> reward model -> PPO, DPO (, GRPO) -> evaluate -> report

    python -m nanoalign.pipeline                  # the tiny preset: about 6 minutes on 2 CPU cores
    python -m nanoalign.pipeline --preset micro --out out/micro  # seconds per stage (the tests')
    python -m nanoalign.pipeline --sweep          # reward-KL frontier + over-optimisation (30 min)
    python -m nanoalign.pipeline --seeds 3        # three seeds, every figure as mean ± 95% CI

Each stage writes out/<run>/<stage>/ckpt.pt and a done.json with the hashes of its config, its
parent checkpoint and the world. Running again skips a stage whose hashes match, resumes one that
was interrupted, and re-runs one whose config or parent changed. --rerun forces stages.
"""

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import (common, config, doctor, record, report, train_distill, train_dpo,
                       train_grpo, train_ppo, train_pretrain, train_rm, train_sft, world)

# Per-stage overrides of each stage's own defaults ("tiny" is the defaults: one source of truth)
PRESETS = {
    "micro": {
        "world": dict(scale=0.05),
        "pretrain": dict(n_layer=2, n_head=2, n_embd=64, max_steps=40, batch_size=8,
                         eval_interval=20, eval_batches=2),
        "sft": dict(max_steps=20, batch_size=8, eval_interval=10, n_samples=1),
        "rm": dict(epochs=0.3, batch_size=8, eval_interval=10, norm_examples=32),
        "ppo": dict(iterations=3, batch_size=8, minibatches=2, ppo_epochs=2, max_new_tokens=32,
                    sample_interval=0, save_interval=2),
        "dpo": dict(epochs=0.2, batch_size=8, eval_interval=10),
        "grpo": dict(iterations=3, prompts_per_iter=4, group_size=2, minibatches=2, ppo_epochs=2,
                     max_new_tokens=32, save_interval=2),
        "pretrain_small": dict(n_layer=1, n_head=2, n_embd=32, max_steps=40, batch_size=8,
                               eval_interval=20, eval_batches=2),
        "distill": dict(max_steps=10, batch_size=8, max_new_tokens=32, save_interval=5),
        "evaluate": dict(n_prompts=24, max_new_tokens=48, batch_size=24),
    },
    "tiny": dict(world={}, pretrain={}, sft={}, rm={}, ppo={}, dpo={}, grpo={}, evaluate={},
                 pretrain_small=dict(n_layer=2, n_head=2, n_embd=64), distill={}),
    # one GPU: GPT-2-small's shape (87M parameters at this vocabulary) on the same world; bf16
    "gpu": {
        "world": dict(scale=4.0),
        "pretrain": dict(n_layer=12, n_head=12, n_embd=768, block_size=256, batch_size=64,
                         max_steps=3000, lr=6e-4, warmup=200, dtype="bfloat16",
                         eval_interval=500, vocab_size=2048),
        "sft": dict(max_steps=1000, batch_size=64, lr=1e-4, dtype="bfloat16"),
        "rm": dict(batch_size=64, lr=3e-5, dtype="bfloat16"),
        "ppo": dict(iterations=200, batch_size=256, minibatches=8, lr=1e-5, dtype="bfloat16"),
        "dpo": dict(batch_size=64, lr=5e-6, dtype="bfloat16"),
        "grpo": dict(iterations=200, prompts_per_iter=64, minibatches=8, lr=1e-5, dtype="bfloat16"),
        "pretrain_small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64,
                               max_steps=3000, lr=1e-3, warmup=200, dtype="bfloat16",
                               eval_interval=500, vocab_size=2048),
        "distill": dict(batch_size=64, max_steps=1000, lr=3e-4, dtype="bfloat16"),
        "evaluate": dict(n_prompts=800),
    },
}


STAGES = ["pretrain", "sft", "rm", "ppo", "dpo", "grpo", "rlvr", "online_dpo", "pretrain_small",
          "distill"]


@dataclass
class PipelineConfig:
    preset: str = "tiny"  # micro | tiny | gpu
    out: str = "out/tiny"  # run directory: out/<run>/<stage>/
    world_dir: str = ""  # the world's data ("" = data/world for tiny, else <out>/world)
    seed: int = 0  # seed of every stage and of the evaluation's sampling
    world_seed: int = 0  # the built-in world's seed (the benchmark: keep it fixed across seeds)
    seeds: int = 1  # N > 1: seeds seed..seed+N-1 in <out>, <out>_seed<k>...; mean ± CI in seeds.md
    stages: str = "pretrain,sft,rm,ppo,dpo,grpo"  # stages to train, in order (+ rlvr, ...: STAGES)
    rerun: str = ""  # comma-separated stages to re-run even if done ("all" = every stage)
    online_dpo: bool = False  # add online DPO (two rounds, RM labels) after offline DPO
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = ""  # every stage's: float32 | bfloat16 ("" = the preset's: bfloat16 in gpu only)
    sweep: bool = False  # then the reward-KL frontier and over-optimisation runs, in <out>/sweep
    ppo_betas: str = "0.01,0.02,0.1,0.2"  # sweep: PPO kl_coef values (besides the main run's)
    dpo_betas: str = "0.03,0.3,1.0"  # sweep: DPO beta values (besides the main run's)
    best_of: str = "1,2,4,8,16"  # sweep: n of best-of-n (the RM's pick of n SFT samples)
    overopt_iters: int = 120  # sweep: iterations of the beta = 0 PPO run (0 = skip that run)

    def validate(self):
        config.check(self.preset in PRESETS, "preset", f"one of {list(PRESETS)}")
        unknown = [s for s in self.stages.split(",") if s and s not in STAGES]
        config.check(not unknown, "stages",
                     f"unknown stage(s) {unknown}; known: {','.join(STAGES)}")
        for name in ("ppo_betas", "dpo_betas", "best_of"):
            try:
                values = floats(getattr(self, name))
            except ValueError:
                values = None
            config.check(bool(values) and min(values) > 0, name,
                         "a comma-separated list of numbers > 0")
        config.check(all(n == int(n) for n in floats(self.best_of)), "best_of", "whole numbers")
        config.check(self.seeds >= 1, "seeds", "must be >= 1")
        config.check(not (self.sweep and self.seeds > 1), "seeds",
                     "run --sweep and --seeds separately")


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def stage_plan(cfg: PipelineConfig, world_dir: str) -> list:
    """(name, module, argv) for every training stage, wired parent -> child."""
    p, out, seed = PRESETS[cfg.preset], cfg.out, str(cfg.seed)
    ck = {s: os.path.join(out, s, "ckpt.pt") for s in STAGES}
    w = lambda name: os.path.join(world_dir, name)
    shared = {"seed": seed, "device": cfg.device, **({"dtype": cfg.dtype} if cfg.dtype else {})}
    pretrain = {"data": w("pretrain.txt"), "val_data": w("pretrain_val.txt"),
                "val_nll": w("pretrain_val_logp.json"),
                "tokenizer": w(f"tok{p['pretrain'].get('vocab_size', 512)}.tiktoken")}
    prefs = {"data": w("prefs_train.jsonl"), "val_data": w("prefs_val.jsonl")}
    rl = {"init": ck["sft"], "reward_model": ck["rm"], "prompts": w("prompts_rl.jsonl")}
    plan = {
        "pretrain": (train_pretrain, pretrain),
        "sft": (train_sft, {"init": ck["pretrain"], "data": w("sft_train.jsonl"),
                            "val_data": w("sft_val.jsonl")}),
        "rm": (train_rm, {"init": ck["sft"], **prefs, "norm_data": w("sft_train.jsonl")}),
        "ppo": (train_ppo, rl),
        "dpo": (train_dpo, {"init": ck["sft"], **prefs}),
        "grpo": (train_grpo, rl),
        # RLVR: 0/1 rewards, so bigger groups, DAPO's dropping of unanimous groups, a light KL
        "rlvr": (train_grpo, {"init": ck["sft"], "reward": "verifiable",
                              "prompts": w("verifiable_train.jsonl"), "group_size": 8,
                              "prompts_per_iter": 8, "drop_equal_groups": "true",
                              "kl_coef": 0.01, "iterations": 60}),
        "online_dpo": (train_dpo, {"init": ck["dpo"], "epochs": "0", "online_rounds": "2",
                                   "reward_model": ck["rm"], "val_data": w("prefs_val.jsonl"),
                                   "online_prompts": w("prompts_rl.jsonl")}),
        # distillation: a smaller GPT pretrained on the same text, then taught by the PPO model
        "pretrain_small": (train_pretrain, pretrain),
        "distill": (train_distill, {"teacher": ck["ppo"], "init": ck["pretrain_small"],
                                    "prompts": w("prompts_rl.jsonl")}),
    }
    names = [s for s in cfg.stages.split(",") if s] + (["online_dpo"] if cfg.online_dpo else [])
    out_plan = []
    for name in names:
        module, args = plan[name]
        # online DPO and RLVR: the same sizes as their base stage
        overrides = p.get({"online_dpo": "dpo", "rlvr": "grpo"}.get(name, name), {})
        if name == "pretrain_small":  # the teacher's pretraining, at the student's sizes
            overrides = {**p.get("pretrain", {}), **overrides}
        args = {**args, **{k: str(v) for k, v in overrides.items()}, **shared}
        if name == "online_dpo":
            args.update(epochs="0", online_rounds="2")
        args["out_dir"] = os.path.join(out, name)
        out_plan.append((name, module, args))
    return out_plan


def roots(cfg: PipelineConfig, world_dir: str) -> dict:
    """Path prefixes left out of the config hashes: a run directory copied elsewhere stays done."""
    return {"<world>": world_dir, "<out>": cfg.out}


def world_id(world_dir: str) -> str:
    """Seed, scale and world.py hash of the world: a stage trained on another is never reused."""
    w = record.read_json(os.path.join(world_dir, "world.json"))
    return f"{w.get('seed')}:{w.get('scale')}:{w.get('world_hash')}"


def run_stage(name, module, args: dict, force: bool, path_roots: dict | None = None,
              world: str | None = None) -> float:
    """Run one stage unless its done.json matches (config hash + parent checkpoint hash + the
    world it was trained on). Returns wall seconds."""
    argv = [x for k, v in args.items() for x in (f"--{k}", str(v))]
    cfg_cls = {train_pretrain: train_pretrain.PretrainConfig, train_sft: train_sft.SFTConfig,
               train_rm: train_rm.RMConfig, train_ppo: train_ppo.PPOConfig,
               train_dpo: train_dpo.DPOConfig, train_grpo: train_grpo.GRPOConfig,
               train_distill: train_distill.DistillConfig}[module]
    stage_cfg = config.parse_config(cfg_cls, argv)
    parent = getattr(stage_cfg, "init", "")
    stamp = {"config": config.config_hash(stage_cfg, path_roots),
             "parent": record.file_hash(parent) if parent else None, "world": world}
    # the other checkpoints a stage reads: a re-trained reward model (or teacher) re-runs the
    # stages that use it. DPO reads the reward model only to label online pairs.
    if hasattr(stage_cfg, "online_rounds"):
        uses_rm = stage_cfg.online_rounds > 0 and stage_cfg.online_judge == "rm"
    else:
        uses_rm = getattr(stage_cfg, "reward", "") == "rm"
    inputs = {k: record.file_hash(v) for k, v in vars(stage_cfg).items()
              if (k == "teacher" or k == "reward_model" and uses_rm) and os.path.isfile(v)}
    if inputs:
        stamp["inputs"] = inputs
    done_path, ckpt = (os.path.join(args["out_dir"], f) for f in ("done.json", "ckpt.pt"))
    if os.path.exists(done_path) and os.path.exists(ckpt) and not force:
        done = record.read_json(done_path)
        if {k: done.get(k) for k in stamp} == stamp:
            print(f"[pipeline] {name}: done (config, parent and world unchanged), skipping")
            return done["wall_seconds"]
        print(f"[pipeline] {name}: config, parent checkpoint or world changed: re-running it")
        os.remove(done_path)
    elif os.path.exists(ckpt) and not force and name != "online_dpo":
        print(f"[pipeline] {name}: found an unfinished run, resuming it")
        argv += ["--resume", "true"]
    print(f"[pipeline] {name}: python -m {module.__name__} {' '.join(argv)}")
    t0 = time.time()
    module.main(argv)
    wall = time.time() - t0
    if common.StopSignal.stopped:  # its checkpoint is a point to resume from, not a finished stage
        raise SystemExit(f"[pipeline] {name} stopped at a signal and saved its checkpoint; run the "
                         "same command to resume it")
    # the run doctor: known failure signatures in what the stage logged
    for line in doctor.examine(os.path.join(args["out_dir"], "metrics.jsonl")):
        print(line)
    with open(done_path, "w") as f:
        json.dump({**stamp, "wall_seconds": wall}, f)
    return wall


def main(argv=None):
    cfg = config.parse_config(PipelineConfig, argv, __doc__)
    return run_seeds(cfg) if cfg.seeds > 1 else run(cfg)


def run_seeds(cfg: PipelineConfig) -> dict:
    """The whole pipeline once per seed (same world), then each metric's mean and 95% CI."""
    reports = []
    for k in range(cfg.seeds):
        out = cfg.out if k == 0 else f"{cfg.out}_seed{cfg.seed + k}"
        print(f"[pipeline] seed {cfg.seed + k} of {cfg.seeds} -> {out}")
        run(dataclasses.replace(cfg, seed=cfg.seed + k, out=out, seeds=1))
        reports.append(record.read_json(os.path.join(out, "report.json")))
    summary = report.summarise_seeds(reports, [cfg.seed + k for k in range(cfg.seeds)])
    with open(os.path.join(cfg.out, "seeds.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(cfg.out, "seeds.md"), "w") as f:
        f.write(report.seeds_markdown(summary))
    print(f"[pipeline] {cfg.seeds} seeds done: {os.path.join(cfg.out, 'seeds.md')}")
    return summary


def run(cfg: PipelineConfig):
    t_start = time.time()
    world_dir = cfg.world_dir or ("data/world" if cfg.preset == "tiny"
                                  else os.path.join(cfg.out, "world"))
    wall = {"world": world.ensure_world(world_dir, cfg.world_seed, **PRESETS[cfg.preset]["world"])}
    force = set(s for s in cfg.rerun.split(",") if s)
    for name, module, args in stage_plan(cfg, world_dir):
        wall[name] = run_stage(name, module, args, "all" in force or name in force,
                               roots(cfg, world_dir), world_id(world_dir))
    if cfg.sweep:
        return run_sweep(cfg, world_dir, t_start)
    report.write_report(cfg.out, world_dir, cfg.preset, PRESETS[cfg.preset]["evaluate"], wall,
                        t_start, cfg.device, cfg.seed)
    print(f"[pipeline] done in {time.time() - t_start:.0f} s: {os.path.join(cfg.out, 'report.md')}")


def run_sweep(cfg: PipelineConfig, world_dir: str, t_start: float):
    """The reward-KL frontier (the DPO paper's sentiment experiment, small): PPO at several KL
    coefficients, DPO at several betas and best-of-n, all from the main run's SFT model, on the
    same held-out prompts; and over-optimisation: a long PPO run with beta = 0, its rollouts scored
    by the reward model (the proxy) and the gold judge (Gao et al. 2023). Into <out>/sweep/;
    finished runs are skipped like pipeline stages."""
    plan = {name: (module, args) for name, module, args in stage_plan(cfg, world_dir)}
    missing = [name for name in ("ppo", "dpo") if name not in plan]
    config.check(not missing, "stages", f"--sweep needs {missing}: the sweep starts from them")
    sweep_dir = os.path.join(cfg.out, "sweep")
    ck = lambda stage: os.path.join(cfg.out, stage, "ckpt.pt")
    runs = {"ppo": [("ppo", "kl_coef", ck("ppo"))], "dpo": [("dpo", "beta", ck("dpo"))],
            "grpo": [("grpo", "kl_coef", ck("grpo"))] if "grpo" in plan else []}
    variants = [("overopt", "kl_coef", 0.0)] if cfg.overopt_iters else []
    variants += [("ppo", "kl_coef", b) for b in floats(cfg.ppo_betas)]
    variants += [("dpo", "beta", b) for b in floats(cfg.dpo_betas)]
    for method, key, value in variants:
        module, args = plan["ppo" if method == "overopt" else method]
        name = f"{method}_{key}{value:g}"
        args = {**args, key: str(value), "out_dir": os.path.join(sweep_dir, name)}
        if method == "overopt":  # long, and without the sample printing
            args.update(iterations=str(cfg.overopt_iters),
                        save_interval=str(max(1, cfg.overopt_iters // 4)))
        run_stage(name, module, args, False, roots(cfg, world_dir), world_id(world_dir))
        if method != "overopt":
            runs[method].append((name, key, os.path.join(sweep_dir, name, "ckpt.pt")))
    ecfg = report.eval_config(cfg.out, world_dir, PRESETS[cfg.preset]["evaluate"], cfg.device,
                              cfg.seed)
    overopt = os.path.join(sweep_dir, "overopt_kl_coef0", "metrics.jsonl")
    sweep = report.write_sweep(sweep_dir, ecfg, runs, [int(n) for n in floats(cfg.best_of)],
                               overopt if cfg.overopt_iters else "", cfg.preset, t_start)
    print(f"[pipeline] sweep done in {time.time() - t_start:.0f} s: {sweep_dir}/sweep.json, "
          f"frontier.png, overoptimisation.png")
    return sweep


if __name__ == "__main__":
    main()
