"""
Sample from any checkpoint. A chat-stage checkpoint (SFT, RM-free policies) is prompted in the
chat template; a pretrained one continues plain text.

    python -m nanoalign.sample --ckpt out/tiny/sft/ckpt.pt --prompt "Tell me a story about a cat."
    python -m nanoalign.sample --ckpt out/tiny/pretrain/ckpt.pt --prompt "Once upon a time" --n 3
    python -m nanoalign.sample --ckpt out/tiny/ppo/ckpt.pt --compare out/tiny/sft/ckpt.pt  # beside
    python -m nanoalign.sample --ckpt out/tiny/ppo/ckpt.pt --chat  # multi-turn chat

In --chat mode each line you type is a user turn; the conversation so far (yours and the model's
turns, in the chat template) is the prompt of the next answer, cut from the left to fit the
context. /reset starts over; an empty line or end of input quits. With --compare both models
answer every turn, each continuing its own conversation.
"""

import os
import sys
from dataclasses import dataclass

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import common, config, record
from nanoalign.generate import fit_prompt, generate
from nanoalign.tokenizer import render_chat
from nanoalign.model import GPT


@dataclass
class SampleConfig:
    ckpt: str = "out/tiny/sft/ckpt.pt"  # any checkpoint written by a stage (or a GPT-2 directory)
    # the user's message (or plain text for a base model)
    prompt: str = "Tell me a story about a cat in the park."
    # a second checkpoint (same tokenizer): its answers are printed beside the first's
    compare: str = ""
    chat: bool = False  # multi-turn chat from standard input (see above)
    # "auto" (the chat template unless the checkpoint is a pretrained base model), "yes" or "no"
    template: str = "auto"
    n: int = 1  # how many samples per model
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    top_p: float = 1.0  # nucleus sampling mass (1 = off)
    max_new_tokens: int = 96  # length limit of each answer
    seed: int = 0  # sampling seed
    device: str = "auto"  # auto | cpu | cuda

    def validate(self):
        config.check(self.template in ("auto", "yes", "no"), "template",
                     f"auto, yes or no, not {self.template!r}")


def load(path: str, device: str):
    ckpt = record.load_checkpoint(path)
    return ckpt, record.checkpoint_tokenizer(ckpt), GPT.from_checkpoint(ckpt, device).eval()


def answers(model, tok, prompt_ids: list[int], stop: int, cfg: SampleConfig, device) -> list[str]:
    """cfg.n sampled continuations of one prompt, as text (the stop token removed)."""
    prompt_ids = fit_prompt(prompt_ids, model.config.block_size - cfg.max_new_tokens)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    tokens, mask, P = generate(model, [prompt_ids] * cfg.n, cfg.max_new_tokens, stop, tok.pad_id,
                               cfg.temperature, cfg.top_k, cfg.top_p, generator=g)
    return [tok.decode([t for t in row[P:][m[P:]].tolist() if t != stop])
            for row, m in zip(tokens, mask)]


def check_messages(messages) -> list[dict]:
    """A conversation the model can answer: a list of {role, content} (user and assistant turns,
    as render_chat takes them) that ends with a user turn; ValueError saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: a non-empty list of {role, content}")
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in ("user", "assistant")
                and isinstance(m.get("content"), str)):
            raise ValueError("messages: each one {role: user|assistant, content: text}")
    if messages[-1]["role"] != "user":
        raise ValueError("messages must end with a user turn (the one to answer)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def reply(model, tok, messages: list[dict], cfg: SampleConfig, device) -> str:
    """The model's next turn after a conversation in the chat template; answers() cuts it from the
    left to fit block_size - max_new_tokens (the page of serve.py and --chat both answer here)."""
    ids = render_chat(tok, messages, add_generation_prompt=True)[0]
    return answers(model, tok, ids, tok.end_id, cfg, device)[0]


def chat_loop(models: dict, cfg: SampleConfig, device) -> dict:
    """Multi-turn chat on stdin; every model keeps its own conversation. Returns name -> list of
    its answers."""
    history = {name: [] for name in models}
    said = {name: [] for name in models}
    while True:
        print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():  # an empty line or end of input
            return said
        if line.strip() == "/reset":
            history = {name: [] for name in models}
            continue
        for name, (ckpt, tok, model) in models.items():
            history[name].append({"role": "user", "content": line.strip()})
            text = reply(model, tok, history[name], cfg, device)
            history[name].append({"role": "assistant", "content": text})
            said[name].append(text)
            print(f"{name}> {text}")


def main(argv=None):
    cfg = config.parse_config(SampleConfig, argv, __doc__)
    device = common.init_dist(cfg.device).device
    models = {}
    for path in [cfg.ckpt] + ([cfg.compare] if cfg.compare else []):
        # out/x/ppo/ckpt.pt -> "ppo"
        where = path if os.path.isdir(path) else os.path.dirname(path) or "."
        name = os.path.basename(os.path.abspath(where))
        models[name if name not in models else name + "'"] = load(path, device)
    names = {tok.name for _, tok, _ in models.values()}
    config.check(len(names) == 1, "compare",
                 f"the two checkpoints use different tokenizers {sorted(names)}")
    if cfg.chat:
        return chat_loop(models, cfg, device)
    outs = {}
    for name, (ckpt, tok, model) in models.items():
        chat = cfg.template == "yes" or (cfg.template == "auto" and ckpt.get("stage") != "pretrain")
        if chat:
            messages = [{"role": "user", "content": cfg.prompt}]
            ids = render_chat(tok, messages, add_generation_prompt=True)[0]
        else:
            ids = tok.encode(cfg.prompt)
        outs[name] = answers(model, tok, ids, tok.end_id if chat else tok.eot_id, cfg, device)
        for text in outs[name]:
            print(f"--- {name} ({ckpt.get('stage')}) | {cfg.prompt!r}\n{text}")
    return outs if cfg.compare else outs[next(iter(outs))]


if __name__ == "__main__":
    main()
