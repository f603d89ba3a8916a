#!/usr/bin/env bash
# Every figure and table of README, docs/ and tutorials/ from one machine, in one go:
#
#     bash tutorials/make_figures.sh    # about 50 min on 2 CPU cores; finished stages are skipped
#
# Each line is a command that a chapter or a doc shows beside the figure it draws. The runs go
# to out/ (seed 0 is out/tiny, which the chapters read); the figures to tutorials/figures/.
set -euo pipefail
F=tutorials/figures

# 1. the runs: README's table (three seeds), chapter 7's extra stages, chapter 4's sweep
python -m nanoalign.pipeline --seeds 3 --stages pretrain,sft,rm,ppo,dpo,grpo,rlvr
python -m nanoalign.pipeline --stages pretrain,sft,rm,ppo,dpo,grpo,rlvr,pretrain_small,distill \
    --online_dpo
python -m nanoalign.pipeline --sweep    # draws out/tiny/sweep/frontier.png, overoptimisation.png
cp out/tiny/sweep/frontier.png out/tiny/sweep/overoptimisation.png $F/

# 2. one figure per chapter, each drawn by the command its chapter shows
python -m nanoalign.plot out/tiny/pretrain --keys loss+val_loss --logy \
    --title "pretraining loss, nats per token" --out $F/01-pretraining-loss.png
python -m nanoalign.plot out/tiny/sft --keys loss+val_loss \
    --title "SFT loss, nats per answer token" --out $F/02-sft-loss.png
python -m nanoalign.plot --reward_model out/tiny/rm/ckpt.pt --pairs data/world/prefs_val.jsonl \
    --title "the reward model on the 1,000 held-out pairs" --out $F/03-reward-model-pairs.png
python -m nanoalign.plot out/tiny/ppo --keys score+gold,kl,explained_variance \
    --title "PPO: the rollouts of each iteration" --out $F/04-ppo-curves.png
python -m nanoalign.plot out/tiny/dpo \
    --keys rewards/margins,rewards/chosen+rewards/rejected,logps/chosen+logps/rejected \
    --title "DPO: implicit rewards and log-probs of each batch" --out $F/05-dpo-margins.png
python -m nanoalign.plot out/tiny/ppo out/tiny/grpo --keys score,gold,kl \
    --title "PPO and GRPO with the same reward model and KL penalty" \
    --out $F/06-grpo-rloo-ppo-vs-grpo.png
python -m nanoalign.plot out/tiny/rlvr --keys score,kl \
    --title "RLVR: the share of exact answers among each iteration's rollouts" \
    --out $F/06-rlvr-accuracy.png
python -m nanoalign.plot out/tiny/distill --keys kl,ce \
    --title "distillation: the student's KL to the PPO teacher" --out $F/07-distill-kl.png
python -m nanoalign.plot --report out/tiny/report.json \
    --title "every model of the run: gold score against KL to SFT" --out $F/07-gold-vs-kl.png
