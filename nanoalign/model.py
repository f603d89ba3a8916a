"""
The GPT: a GPT-2-style decoder, with the three things alignment needs on top of nanoGPT's model.

1. Left padding that is exactly right. Batched generation pads prompts on the left, so every
   forward takes an optional `pad_mask` (B, T) (True = real token) from which it builds
     - position ids = (number of real tokens before this one), so the first real token is position
       0 however much padding precedes it (Huang et al. 2024, "N implementation details", detail
       3), and
     - an attention mask: causal AND key is real, plus every query attends to itself, so a pad
       query never has an empty row (an all-masked row is 0/0 = NaN on some SDPA backends;
       PyTorch issue #103749).
2. A key/value cache for incremental decoding (`KVCache`): keys and values are stored at their
   absolute slot, and the prompt's pads stay masked at every decoding step (`GPT.decode`, the
   decoding step that generation runs, written for speed).
3. A scalar head for reward models and PPO's value function, on the same trunk
   (`output="scalar"` or `"both"`).

Shape legend: B batch, T time (tokens in this call), S cached + new tokens, C n_embd, V vocab,
nh heads, hs = C/nh.
"""

import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoalign.hf_format import read_safetensors


@dataclass
class GPTConfig:
    block_size: int = 128   # longest sequence (prompt + response) the model sees
    vocab_size: int = 512   # including special tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0    # pretraining/SFT only; RM, PPO and DPO switch it off (set_dropout)
    bias: bool = True       # biases in Linear and LayerNorm, as in GPT-2
    # "none": the exact GELU (nanoGPT's); "tanh": GPT-2's approximation, which its weights were
    # trained with (load_gpt2 sets it). On the CPU the tanh form is a slower kernel
    gelu: str = "none"


class KVCache:
    """What incremental decoding keeps between steps: per layer, keys and values at their absolute
    slot (row b's token at slot s has key kv[i][0, b, :, s]); for GPT.decode, the attention bias of
    every slot (0 = real token, -inf = pad), each row's next position, and the weights transposed
    once. A cache serves one generate() call: the model's weights must not change meanwhile."""

    def __init__(self, model, batch_size: int, max_len: int):
        cfg, w = model.config, model.lm_head.weight
        shape = (2, batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.kv = [w.new_zeros(shape) for _ in range(cfg.n_layer)]  # keys and values
        self.bias = w.new_zeros(batch_size * cfg.n_head, 1, max_len)  # (B*nh, 1, max_len)
        self.len, self.pos = 0, None  # slots filled; each row's next position (B,): see GPT
        # the CPU's BLAS is fastest with a row-major (in, out) matrix at few rows; cuBLAS: a view
        self.t = {m: m.weight.t() if w.is_cuda else m.weight.t().contiguous()
                  for m in model.modules() if isinstance(m, nn.Linear)}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this layer's k, v (B, nh, T, hs) at slots len..len+T-1; return all len+T slots."""
        S = self.len + k.size(2)
        self.kv[layer][:, :, :, self.len:S] = torch.stack([k, v])
        return self.kv[layer][:, :, :, :S].unbind()  # keys, values: (B, nh, S, hs)

    def linear(self, x, m: nn.Linear):  # m(x) for x (B, in), by the transposed weight
        return x @ self.t[m] if m.bias is None else torch.addmm(m.bias, x, self.t[m])


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.dropout = cfg.n_head, cfg.dropout

    def forward(self, x, attn_mask, cache, layer):
        B, T, C = x.shape
        # (B, T, 3C) -> 3 x (B, nh, T, hs)
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, S, hs)
        p = self.dropout if self.training else 0.0
        # no mask (no padding, no cache): the fast fused causal kernel
        y = F.scaled_dot_product_attention(q, k, v, attn_mask, p, is_causal=attn_mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.approximate = cfg.gelu

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask, cache, layer):
        # pre-LayerNorm residual blocks (GPT-2)
        x = x + self.attn(self.ln_1(x), attn_mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


def positions_and_mask(pad_mask, T: int, past: int):
    """Position ids (B, T) and boolean attention mask (B, 1, T, S) for the last T of S = past + T
    tokens. pad_mask: (B, S) bool, True where the token is real. Position = exclusive cumulative
    count of real tokens, so left padding does not shift positions; pads get position 0."""
    S = pad_mask.size(1)
    pos = (pad_mask.long().cumsum(1) - 1).clamp(min=0)[:, past:]  # (B, T)
    q_slot = torch.arange(past, S, device=pad_mask.device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=pad_mask.device)[None, :]  # (1, S)
    causal = k_slot <= q_slot  # (T, S)
    mask = causal[None] & pad_mask[:, None, :]  # (B, T, S): causal and the key is a real token
    # every query sees itself: no all-masked row, so no NaN for pad queries
    mask = mask | (k_slot == q_slot)[None]
    return pos, mask[:, None]  # (B, T), (B, 1, T, S)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (GPT-2; Press & Wolf 2017)
        self.scalar_head = None  # add_scalar_head(): reward models and PPO's value function
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            # GPT-2: the residual projections are scaled by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, device="cpu", scalar_head: bool = True) -> "GPT":
        """The model of a checkpoint dict (load_checkpoint reads one), with its scalar head if
        it had one and scalar_head is true. A stage whose loss never reads a parent's head (SFT or
        DPO from a PPO policy) drops it: under DDP an unused parameter stops the second step."""
        model = cls(GPTConfig(**ckpt["model_config"]))
        weights = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in ckpt["model"].items()}
        if scalar_head and any(k.startswith("scalar_head.") for k in weights):
            model.add_scalar_head()
        if not scalar_head:
            weights = {k: v for k, v in weights.items() if not k.startswith("scalar_head.")}
        model.load_state_dict(weights)
        return model.to(device)

    def add_scalar_head(self, init: str = "reward"):
        """A Linear(C, 1) read on the trunk's last hidden state.
        init="reward": N(0, 1/sqrt(C+1)), bias 0 (Ziegler et al. 2019 code; Huang et al. 2024).
        init="zero": all zeros, so a fresh value head predicts 0 and cannot disturb the shared trunk
        early on (Ziegler et al. 2019 zero-initialise the value head)."""
        head = nn.Linear(self.config.n_embd, 1, bias=True)
        nn.init.zeros_(head.bias)
        if init == "zero":
            nn.init.zeros_(head.weight)
        else:
            nn.init.normal_(head.weight, std=1 / math.sqrt(self.config.n_embd + 1))
        self.scalar_head = head.to(self.lm_head.weight.device)
        return self

    def forward(self, idx, pad_mask=None, cache: KVCache | None = None, output: str = "logits"):
        """idx (B, T) token ids; pad_mask (B, S) with S = cached + T tokens, True at real tokens.
        pad_mask=None: no padding, or padding on the right only. Causal attention already keeps
        every real token from seeing a later pad, so a right-padded batch (SFT, RM, DPO) needs no
        mask and gets the fast fused causal kernel (flash attention on CUDA); the pads' own
        outputs are junk that the caller never reads.
        output: "logits" -> (B, T, V); "scalar" -> (B, T); "both" -> ((B, T, V), (B, T))."""
        B, T = idx.shape
        past = cache.len if cache is not None else 0
        assert past + T <= self.config.block_size, \
            f"{past + T} tokens > block_size {self.config.block_size}"
        if pad_mask is None and cache is None:  # plain causal attention: the fast fused kernel
            pos, attn_mask = torch.arange(T, device=idx.device)[None], None
        else:
            if pad_mask is None:
                pad_mask = torch.ones(B, past + T, dtype=torch.bool, device=idx.device)
            pos, attn_mask = positions_and_mask(pad_mask, T, past)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, cache, i)
        if cache is not None:  # for decode(): which slots are real tokens, each row's next position
            real = pad_mask.repeat_interleave(self.config.n_head, 0)[:, None]  # (B*nh, 1, S)
            cache.bias[:, :, :past + T] = torch.where(real, 0.0, float("-inf"))
            cache.len, cache.pos = past + T, pad_mask.sum(1)  # (B,)
        h = self.transformer.ln_f(x)  # (B, T, C)
        if output == "logits":
            return self.lm_head(h)  # (B, T, V)
        scalar = self.scalar_on_fp32(h)  # (B, T)
        return scalar if output == "scalar" else (self.lm_head(h), scalar)

    def decode(self, idx, cache: KVCache):
        """One new token per row, idx (B,), after the tokens in `cache` -> logits (B, V):
        forward()'s arithmetic at one query (tested against it) in fewer, cheaper operations, as a
        rollout's time goes to calling ~100 small ones a step. Weights transposed once per cache;
        attention as two batched matmuls, the mask an additive bias; no dropout (eval mode). A
        decoded token is always a real key: after its row's end token, nothing reads it."""
        B, nh, S, tf = idx.size(0), self.config.n_head, cache.len + 1, self.transformer
        bias, scale = cache.bias[:, :, :S], 1.0 / math.sqrt(self.config.n_embd // nh)
        x = tf.wte(idx) + tf.wpe(cache.pos)  # (B, C)
        for block, kv in zip(tf.h, cache.kv):
            attn, mlp = block.attn, block.mlp
            qkv = cache.linear(block.ln_1(x), attn.c_attn).view(B, 3, nh, -1)  # (B, 3, nh, hs)
            kv[:, :, :, S - 1] = qkv[:, 1:].transpose(0, 1)  # this token's key and value
            k, v = kv[:, :, :, :S].flatten(1, 2)  # (B*nh, S, hs) each
            # softmax(q k^T / sqrt(hs) + bias) v, one query per row and head: (B*nh, 1, S) scores
            att = torch.baddbmm(bias, qkv[:, 0].reshape(B * nh, 1, -1), k.transpose(1, 2),
                                alpha=scale).softmax(-1)
            x = x + cache.linear(torch.bmm(att, v).view(B, -1), attn.c_proj)  # (B, nh*hs)
            h = cache.linear(block.ln_2(x), mlp.c_fc)
            x = x + cache.linear(F.gelu(h, approximate=mlp.approximate), mlp.c_proj)
        cache.len, cache.pos = S, cache.pos + 1
        return cache.linear(tf.ln_f(x), self.lm_head)  # (B, V)

    def scalar_on_fp32(self, h):
        """The scalar head outside autocast, on (at least) fp32 hidden states: under bf16 a reward
        or value would be rounded to 8 bits of mantissa (+-0.4%), noise in every advantage."""
        with torch.autocast(h.device.type, enabled=False):
            return self.scalar_head(h.to(torch.promote_types(h.dtype, torch.float32))).squeeze(-1)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, T: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls (forward 2N + backward 4N) plus 12*L*C*T
        for attention (Kaplan et al. 2020; PaLM appendix B), as nanoGPT's estimate_mfu counts."""
        cfg, T = self.config, T or self.config.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T


def set_dropout(model: nn.Module, p: float = 0.0):
    """RM, PPO and DPO run with dropout off: with it on, PPO's ratio is not 1 before any update
    (Ziegler et al.). Attention dropout is not a module (SDPA takes it as a number), so it is set
    on the attention layers too."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if isinstance(m, CausalSelfAttention):
            m.dropout = p
    return model


# --------------------------------------------------------------------------------------------
# GPT-2 weights from a local Hugging Face checkpoint (pytorch_model.bin or model.safetensors)

def gpt2_from_state_dict(sd: dict, block_size: int | None = None, n_head: int | None = None,
                         gelu: str = "tanh") -> GPT:
    """Build our GPT from a Hugging Face GPT-2 state dict (with or without the "transformer."
    prefix). n_head is not in the weights: pass it (config.json's "n_head"), or else GPT-2's sizes
    imply it (64-dim heads). gelu: "tanh" for GPT-2's own weights, "none" for config.json's
    activation_function "gelu" (export.py writes that for our exact-GELU models)."""
    # the legacy causal-mask buffers are not weights
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()
          if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    sd.pop("lm_head.weight", None)  # tied to wte: may be absent, and is the same tensor if present
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
    vocab, n_embd = sd["wte.weight"].shape
    n_pos = sd["wpe.weight"].shape[0]
    n_head = n_head or max(1, n_embd // 64)  # 12, 16, 20, 25 heads: GPT-2 small, medium, large, xl
    cfg = GPTConfig(block_size=block_size or n_pos, vocab_size=vocab, n_layer=n_layer,
                    n_head=n_head, n_embd=n_embd, dropout=0.0, bias=True, gelu=gelu)
    assert cfg.block_size <= n_pos, f"block_size {cfg.block_size} > the checkpoint's {n_pos}"
    model = GPT(cfg)
    ours = model.state_dict()
    # HF's GPT-2 uses Conv1D layers that store weights as (in, out); nn.Linear stores (out, in)
    transposed = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    for k, v in sd.items():
        key = "transformer." + k
        assert key in ours, f"unexpected key in GPT-2 checkpoint: {k}"
        if k.endswith(transposed):
            v = v.t()
        if k == "wpe.weight":
            v = v[:cfg.block_size]
        assert v.shape == ours[key].shape, \
            f"{k}: checkpoint shape {tuple(v.shape)} != model {tuple(ours[key].shape)}"
        with torch.no_grad():
            ours[key].copy_(v)
    missing = set(ours) - {"transformer." + k for k in sd} - {"lm_head.weight"}
    assert not missing, f"GPT-2 checkpoint lacks {sorted(missing)}"
    return model


def grow_vocab(model: GPT, n: int) -> GPT:
    """Give the tied embedding n rows (GPT-2 + our chat tokens): the new rows start at the mean of
    the old ones (Hewitt 2021), so new tokens begin as an average token. Old tokens keep their
    logits exactly: with tied weights a logit is h . w_token, and no old row or hidden state
    changes."""
    old = model.lm_head.weight
    V, C = old.shape
    if n <= V:
        return model
    mean_row = old.detach().mean(0, keepdim=True)  # (1, C)
    weight = nn.Parameter(torch.cat([old.detach(), mean_row.expand(n - V, C)]))  # (n, C)
    model.lm_head.weight = model.transformer.wte.weight = weight
    model.lm_head.out_features = model.transformer.wte.num_embeddings = model.config.vocab_size = n
    return model


def load_gpt2(path: str, block_size: int | None = None, n_head: int | None = None) -> GPT:
    """path: a pytorch_model.bin, a model.safetensors, or a directory holding one of them (and
    config.json, whose n_head and activation_function it follows)."""
    hf = {}
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            with open(os.path.join(path, "config.json")) as f:
                hf = json.load(f)
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin here")
    sd = read_safetensors(path) if path.endswith(".safetensors") else \
        torch.load(path, map_location="cpu", weights_only=True)
    # HF's "gelu" is the exact GELU; "gelu_new" (GPT-2's) and "gelu_pytorch_tanh" the tanh form
    gelu = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
    act = hf.get("activation_function", "gelu_new")
    assert act in gelu, f"{path}: activation_function {act!r} is not a GELU our GPT has"
    return gpt2_from_state_dict(sd, block_size, n_head or hf.get("n_head"), gelu[act])
