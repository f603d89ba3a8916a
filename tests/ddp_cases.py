"""Stage settings shared by the DDP driver (2 ranks under torchrun) and its single-process twin in
test_ddp.py. The global batch is the same for both: per-rank batch = GLOBAL // world_size. Learning
rates are large so that the weights move far beyond the comparison tolerance."""

import copy
import dataclasses
import functools
import os

import torch

from nanoalign import (common, record, train_distill, train_dpo, train_grpo, train_ppo,
                       train_pretrain, train_rm, train_sft)
from nanoalign.model import GPT
from nanoalign.rl import masked_whiten, rollout
from nanoalign.tokenizer import render_chat

GLOBAL = 8


def w(run, name):
    return os.path.join(run, "world", name)


def ck(run, stage):
    return os.path.join(run, stage, "ckpt.pt")


STAGES = {
    "pretrain": (train_pretrain, lambda r, world_size: [
        "--data", w(r, "pretrain.txt"), "--val_data", w(r, "pretrain_val.txt"),
        "--tokenizer", w(r, "tok512.tiktoken"), "--n_layer", "1", "--n_embd", "32", "--n_head", "2",
        "--max_steps", "3", "--eval_interval", "100", "--lr", "1e-2", "--warmup", "0",
        "--batch_size", str(GLOBAL // world_size), "--dtype", "float64"]),
    "sft": (train_sft, lambda r, world_size: [
        "--init", ck(r, "pretrain"), "--data", w(r, "sft_train.jsonl"), "--val_data", "",
        "--max_steps", "3", "--lr", "1e-2", "--warmup", "0", "--eval_interval", "100",
        "--batch_size", str(GLOBAL // world_size), "--dtype", "float64"]),
    "rm": (train_rm, lambda r, world_size: [
        "--init", ck(r, "sft"), "--data", w(r, "prefs_train.jsonl"), "--val_data", "",
        "--norm_data", "", "--epochs", "0.06", "--lr", "1e-2", "--warmup", "0",
        "--eval_interval", "100", "--batch_size", str(GLOBAL // world_size), "--dtype", "float64"]),
    "dpo": (train_dpo, lambda r, world_size: [
        "--init", ck(r, "sft"), "--data", w(r, "prefs_train.jsonl"), "--val_data", "",
        "--epochs", "0.06", "--lr", "1e-2", "--warmup", "0", "--eval_interval", "100",
        "--batch_size", str(GLOBAL // world_size), "--dtype", "float64"]),
    "ppo": (train_ppo, lambda r, world_size: [
        "--init", ck(r, "sft"), "--reward_model", ck(r, "rm"),
        "--prompts", w(r, "prompts_rl.jsonl"), "--iterations", "2", "--batch_size", "4",
        "--minibatches", "2", "--ppo_epochs", "1", "--max_new_tokens", "10",
        "--adaptive_kl", "true", "--kl_horizon", "10", "--save_interval", "100"]),
    "grpo": (train_grpo, lambda r, world_size: [
        "--init", ck(r, "sft"), "--reward_model", ck(r, "rm"),
        "--prompts", w(r, "prompts_rl.jsonl"), "--iterations", "2", "--prompts_per_iter", "2",
        "--group_size", "2", "--minibatches", "1", "--ppo_epochs", "1", "--max_new_tokens", "10",
        "--save_interval", "100"]),
    "distill": (train_distill, lambda r, world_size: [
        "--teacher", ck(r, "ppo"), "--init", ck(r, "pretrain_small"),
        "--prompts", w(r, "prompts_rl.jsonl"), "--max_steps", "2", "--batch_size", "2",
        "--max_new_tokens", "10", "--save_interval", "100"]),
    # a PPO policy carries a value head that SFT and DPO never read: DDP must not see it (or step 2
    # stops)
    "sft_from_ppo": (train_sft, lambda r, world_size: [
        "--init", ck(r, "ppo"), "--data", w(r, "sft_train.jsonl"), "--val_data", "",
        "--max_steps", "3", "--eval_interval", "100", "--batch_size", str(GLOBAL // world_size)]),
    "dpo_from_ppo": (train_dpo, lambda r, world_size: [
        "--init", ck(r, "ppo"), "--data", w(r, "prefs_train.jsonl"), "--val_data", "",
        "--epochs", "0.06", "--eval_interval", "100", "--batch_size", str(GLOBAL // world_size)]),
}
# stages whose 2-rank run must equal one process
SAME_GLOBAL_BATCH = ["pretrain", "sft", "rm", "dpo"]


class RecordingOptimizer:
    """Records the gradients each step is given (after DDP's all-reduce), then steps the real
    optimizer."""

    def __init__(self, optimizer):
        self.optimizer, self.param_groups, self.grads = optimizer, optimizer.param_groups, []

    def step(self):
        self.grads.append([p.grad.detach().clone()
                           for g in self.param_groups for p in g["params"]])
        self.optimizer.step()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


def fixed_rollout_update(run, whiten: str):
    """One PPO update (2 epochs, one minibatch) in float64 on a rollout that is identical whatever
    the world size; this rank takes its share. whiten="local" whitens advantages per rank: the
    negative control. Returns the model and the first minibatch's gradients, before any step (no
    clipping: grad_clip is huge)."""
    d = common.init_dist("cpu")
    sft_ckpt = record.load_checkpoint(ck(run, "sft"))
    tok = record.checkpoint_tokenizer(sft_ckpt)
    torch.manual_seed(0)
    policy = GPT.from_checkpoint(sft_ckpt).add_scalar_head("zero")
    ref = copy.deepcopy(policy).requires_grad_(False)
    animals = ("cat", "dog", "bird", "fish", "frog", "duck", "cow", "fox")
    chats = [[{"role": "user", "content": f"Tell me a story about a {a}."}] for a in animals]
    prompts = [render_chat(tok, chat, True)[0] for chat in chats]
    ro = rollout(policy, ref, prompts, tok.end_id, tok.pad_id, 12, 1.0,
                 torch.Generator().manual_seed(0), True)
    policy, ref = policy.double(), ref.double()
    scores = torch.linspace(-1, 1, GLOBAL, dtype=torch.float64)
    share = slice(d.rank * GLOBAL // d.world, (d.rank + 1) * GLOBAL // d.world)
    fields = {f.name: getattr(ro, f.name) for f in dataclasses.fields(ro)}
    ro = type(ro)(**{k: (v[share].double() if torch.is_tensor(v) and v.is_floating_point() else
                         v[share] if torch.is_tensor(v) else v) for k, v in fields.items()})
    cfg = train_ppo.PPOConfig(batch_size=GLOBAL // d.world, minibatches=1, ppo_epochs=2,
                              iterations=1, lr=3e-2, vf_coef=1.0, grad_clip=1e9)
    original = train_ppo.masked_whiten
    if whiten == "local":
        train_ppo.masked_whiten = functools.partial(masked_whiten, global_stats=False)
    try:
        adv, ret, _ = train_ppo.advantages_and_returns(ro, scores[share], 0.05, cfg)
    finally:
        train_ppo.masked_whiten = original
    model = torch.nn.parallel.DistributedDataParallel(policy) if d.ddp else policy
    opt = RecordingOptimizer(common.make_optimizer(model, cfg.lr, 0.0))
    train_ppo.ppo_update(model, opt, ro, adv, ret, cfg, 0, d)
    return common.unwrap(model), opt.grads[0]
