"""
Sample from any checkpoint. A chat-stage checkpoint (SFT, RM-free policies) is prompted in the chat template; a
pretrained one continues plain text.

    python -m nanoalign.sample --ckpt out/tiny/sft/ckpt.pt --prompt "Tell me a story about a cat in the park."
    python -m nanoalign.sample --ckpt out/tiny/pretrain/ckpt.pt --prompt "Once upon a time" --n 3
"""

import os
import sys
from dataclasses import dataclass

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import common
from nanoalign.generate import generate
from nanoalign.tokenizer import load_tokenizer, render_chat


@dataclass
class SampleConfig:
    ckpt: str = "out/tiny/sft/ckpt.pt"  # any checkpoint written by a stage
    prompt: str = "Tell me a story about a cat in the park."  # the user's message (or plain text for a base model)
    chat: str = "auto"  # "auto" (chat template unless the checkpoint is a pretrained base model), "yes" or "no"
    n: int = 1  # how many samples
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    top_p: float = 1.0  # nucleus sampling mass (1 = off)
    max_new_tokens: int = 96  # length limit of each answer
    seed: int = 0  # sampling seed
    device: str = "auto"  # auto | cpu | cuda


def main(argv=None):
    cfg = common.parse_config(SampleConfig, argv, __doc__)
    device = common.init_dist(cfg.device).device
    ckpt = common.load_checkpoint(cfg.ckpt)
    tok = load_tokenizer(ckpt["tokenizer_path"])
    model = common.build_model(ckpt, device).eval()
    chat = cfg.chat == "yes" or (cfg.chat == "auto" and ckpt.get("stage") != "pretrain")
    if chat:
        prompt = render_chat(tok, [{"role": "user", "content": cfg.prompt}], add_generation_prompt=True)[0]
    else:
        prompt = tok.encode(cfg.prompt)
    stop = tok.end_id if chat else tok.eot_id
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    tokens, mask, P = generate(model, [prompt] * cfg.n, cfg.max_new_tokens, stop, tok.pad_id, cfg.temperature,
                               cfg.top_k, cfg.top_p, generator=g)
    outs = []
    for row, m in zip(tokens, mask):
        text = tok.decode([t for t in row[P:][m[P:]].tolist() if t != stop])
        outs.append(text)
        print(f"--- {ckpt.get('stage')} | {cfg.prompt!r}\n{text}")
    return outs


if __name__ == "__main__":
    main()
