"""nanoalign: the LLM alignment pipeline (pretrain, SFT, RM, PPO, DPO, GRPO) in plain PyTorch."""
