"""
Knowledge distillation: a smaller student learns to answer like an aligned teacher (Hinton et al.
2015).

Each step the teacher answers a batch of prompts (sequence-level distillation: the student learns
from the teacher's own outputs, Kim & Rush 2016), then, on every token t of those answers,

    L_t = alpha T^2 KL(softmax(z_teacher / T) || softmax(z_student / T))
          + (1 - alpha) CE(z_student, y_t)

averaged over the answer tokens of the whole batch (all ranks), like SFT. The soft term carries the
teacher's whole next-token distribution ("dark knowledge": how much it likes the runner-up words),
softened by the temperature T; its gradient shrinks as 1/T^2, so T^2 keeps the two terms on the
same scale whatever T is. The hard term is the plain cross-entropy of the token the teacher
sampled. The teacher is frozen and never gets a gradient.

The student starts from a smaller pretrained checkpoint with the same tokenizer (the pipeline
pretrains one: `pretrain_small`), or from scratch with --init scratch and its sizes below.

    python -m nanoalign.train_distill --teacher out/tiny/ppo/ckpt.pt \\
        --init out/tiny/pretrain_small/ckpt.pt
    torchrun --standalone --nproc_per_node=2 nanoalign/train_distill.py --batch_size 16
"""

import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `torchrun nanoalign/train_distill.py` runs this file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import common, config, record
from nanoalign.data import load_prompts
from nanoalign.generate import generate, upcast
from nanoalign.model import GPT, GPTConfig, set_dropout
from nanoalign.tokenizer import render_chat


@dataclass
class DistillConfig:
    out_dir: str = "out/tiny/distill"  # checkpoint, metrics.jsonl and run.json go here
    teacher: str = "out/tiny/ppo/ckpt.pt"  # the aligned model to imitate (frozen)
    # the student's start: a smaller pretrained checkpoint, or "scratch"
    init: str = "out/tiny/pretrain_small/ckpt.pt"
    n_layer: int = 2  # student sizes with --init scratch
    n_head: int = 2
    n_embd: int = 64
    prompts: str = "data/world/prompts_rl.jsonl"  # prompts the teacher answers
    temperature: float = 2.0  # T: softens both distributions in the KL term
    alpha: float = 0.5  # weight of the soft (KL) term; 1 - alpha on the hard cross-entropy
    sample_temperature: float = 1.0  # the teacher's sampling temperature for the answers
    max_new_tokens: int = 80  # answer length limit (prompt + answer must fit the block)
    batch_size: int = 32  # prompts per step per rank
    max_steps: int = 300  # optimizer steps
    lr: float = 1e-3  # peak learning rate (warmup, then cosine)
    warmup: int = 20  # linear warmup steps
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    save_interval: int = 100  # steps between checkpoints
    seed: int = 0  # prompt order and sampling
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    resume: bool = False  # continue from out_dir/ckpt.pt exactly where it stopped
    stop_at: int = 0  # stop with a checkpoint after this step (0 = run to max_steps)

    def validate(self):
        config.check(self.temperature > 0 and self.sample_temperature > 0, "temperature",
                     "must be > 0")
        config.check(0 <= self.alpha <= 1, "alpha", "must be in [0, 1]")
        config.check(self.max_steps > 0 and self.batch_size > 0, "max_steps",
                     "max_steps and batch_size must be > 0")


def distill_loss(student_logits, teacher_logits, targets, mask, T: float, alpha: float, n_tokens):
    """Summed per-token alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE over the mask,
    divided by n_tokens. Logits (B, N, V) at the positions that predict targets (B, N).
    Returns (loss, mean KL per token, mean CE per token)."""
    s = F.log_softmax(upcast(student_logits) / T, -1)  # (B, N, V)
    t = F.log_softmax(upcast(teacher_logits) / T, -1)  # (B, N, V)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, N): KL(teacher || student) at temperature T, forward KL
    ce = F.cross_entropy(upcast(student_logits).transpose(1, 2), targets, reduction="none")  # T = 1
    per_token = alpha * T * T * kl + (1 - alpha) * ce
    m = mask.float()
    kl_mean, ce_mean = (kl * m).sum().detach() / m.sum(), (ce * m).sum().detach() / m.sum()
    return (per_token * m).sum() / n_tokens, kl_mean, ce_mean


@torch.no_grad()
def new_tokens_per_s(model, prompts, tok, max_new_tokens, device) -> float:
    """Sampling speed with the KV cache: the speed-up a smaller student buys at inference."""
    g = torch.Generator(device=device).manual_seed(0)
    t0 = time.time()
    tokens, mask, P = generate(model, prompts, max_new_tokens, tok.end_id, tok.pad_id, 1.0,
                               generator=g)
    return mask[:, P:].sum().item() / (time.time() - t0)


def new_student(cfg: DistillConfig, teacher, tok, device) -> GPT:
    """A fresh student of --n_layer/--n_head/--n_embd, or a smaller pretrained checkpoint. It must
    share the teacher's tokenizer: the KL compares the two next-token distributions entry by
    entry, so both vocabularies must be the same tokens in the same order."""
    if cfg.init == "scratch":
        c = teacher.config
        sizes = GPTConfig(c.block_size, c.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd)
        return GPT(sizes).to(device)
    ckpt = record.load_checkpoint(cfg.init, stages=["pretrain", "sft"], tokenizer=tok.name)
    return GPT.from_checkpoint(ckpt, device)


def train(cfg: DistillConfig):
    # 0. set-up: ranks, the frozen teacher (a PPO checkpoint's value head dropped), the student,
    #    the prompts, the optimizer, resume
    d = common.init_dist(cfg.device)
    common.set_seed(cfg.seed)
    parent = record.load_checkpoint(cfg.teacher,
                                    stages=["sft", "ppo", "dpo", "grpo", "distill"])
    tok = record.checkpoint_tokenizer(parent)
    teacher = GPT.from_checkpoint(parent, d.device, scalar_head=False)
    teacher = teacher.eval().requires_grad_(False)
    student = set_dropout(new_student(cfg, teacher, tok, d.device), 0.0)
    prompts = [render_chat(tok, m, add_generation_prompt=True)[0]
               for m in load_prompts(cfg.prompts)]
    config.check(max(map(len, prompts)) + cfg.max_new_tokens <= student.config.block_size,
                 "max_new_tokens", f"the longest prompt + {cfg.max_new_tokens} new tokens > "
                 f"block_size {student.config.block_size}")
    optimizer = common.make_optimizer(student, cfg.lr, 0.0)
    # each rank samples its own stream: the ranks' answers must differ
    generator = torch.Generator(device=d.device).manual_seed(cfg.seed * 100003 + d.rank)
    step, ckpt_path = 0, os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume:
        ckpt = record.load_checkpoint(ckpt_path, stages=["distill"], tokenizer=tok.name)
        step = record.restore(ckpt, student, optimizer, d)
        generator.set_state(ckpt["generators"][min(d.rank, len(ckpt["generators"]) - 1)])
    raw_student, student = student, common.wrap_ddp(student, d)
    log = record.MetricsLog(cfg.out_dir, cfg, d.master, resume_step=step if cfg.resume else None)
    stop = common.StopSignal(d.device)
    sizes = {"teacher": teacher.num_params(), "student": raw_student.num_params()}
    if d.master:
        print(f"teacher {sizes['teacher'] / 1e6:.2f}M -> student {sizes['student'] / 1e6:.2f}M "
              f"parameters | {cfg.batch_size * d.world} prompts/step | {d.world} rank(s)")

    def save(**extra):
        record.save_stage(ckpt_path, d, "distill", raw_student, optimizer, step, cfg, tok,
                          cfg.init if cfg.init != "scratch" else None,
                          generators=record.generator_states(generator, d), teacher=cfg.teacher,
                          **extra)

    bar = common.progress(cfg.max_steps, step, "distill", not d.master)
    last = cfg.stop_at if cfg.stop_at > 0 else cfg.max_steps
    while step < min(cfg.max_steps, last):
        t0 = time.time()
        lr = common.lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup)
        common.set_lr(optimizer, lr)
        # 1. the teacher answers this rank's prompts (a different slice per rank and step)
        first = (step * d.world + d.rank) * cfg.batch_size
        batch = [prompts[(first + i) % len(prompts)] for i in range(cfg.batch_size)]
        tokens, pad_mask, P = generate(teacher, batch, cfg.max_new_tokens, tok.end_id, tok.pad_id,
                                       cfg.sample_temperature, generator=generator)
        targets, mask = tokens[:, P:], pad_mask[:, P:]  # the answers, <|end|> included
        # the global mean is over every rank's tokens (DDP averages the gradients: / world)
        n_tokens = common.all_reduce_sum(mask.sum().float()) / d.world
        # 2. both models read the whole sequence; the logits at P-1 .. end-1 predict the answer
        with torch.no_grad(), common.autocast(d.device, cfg.dtype):
            teacher_logits = teacher(tokens, pad_mask=pad_mask)[:, P - 1:-1]
        student.train()
        with common.autocast(d.device, cfg.dtype):
            student_logits = student(tokens, pad_mask=pad_mask)[:, P - 1:-1]
        loss, kl, ce = distill_loss(student_logits, teacher_logits, targets, mask,
                                    cfg.temperature, cfg.alpha, n_tokens.clamp(min=1))
        # 3. the optimizer step
        loss.backward()
        common.optimizer_step(student, optimizer, cfg.grad_clip)
        step += 1
        # 4. statistics over all ranks, logging, checkpoints
        g = common.all_reduce_mean({"loss": loss.detach(), "kl": kl, "ce": ce}, d)
        log.log(step=step, **g, lr=lr, answer_length=mask.sum(1).float().mean().item(),
                tokens_per_s=n_tokens.item() * d.world / (time.time() - t0))
        bar.update(1)
        bar.set_postfix(loss=f"{g['loss']:.3f}", kl=f"{g['kl']:.3f}")
        if step % cfg.save_interval == 0:
            save()
        if stop.should_stop():
            break
    bar.close()
    # 5. what the smaller model buys: sampling speed at the same batch
    speed = {}
    if step == cfg.max_steps and d.master:
        models = {"teacher": teacher, "student": raw_student.eval()}
        speed = {name: new_tokens_per_s(m, prompts[:cfg.batch_size], tok, cfg.max_new_tokens,
                                        d.device) for name, m in models.items()}
        log.log(step=step, teacher_params=sizes["teacher"], student_params=sizes["student"],
                teacher_new_tokens_per_s=speed["teacher"],
                student_new_tokens_per_s=speed["student"])
    save(sampling_speed=speed, params=sizes)
    common.cleanup_dist()
    return raw_student


def main(argv=None):
    return train(config.parse_config(DistillConfig, argv, __doc__))


if __name__ == "__main__":
    main()
