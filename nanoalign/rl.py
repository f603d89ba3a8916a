"""
Shared RL plumbing for the reward model, PPO, GRPO/RLOO, online DPO and evaluation: masked
statistics, the KL estimators, the reward model read at the last real token, a rollout (sample, then
score under one forward contract), PPO's clipped surrogate, and the reward sources.

Masks are bool tensors, True where a token counts. Every token reduction goes through masked_mean
or masked_sum.
"""

import importlib
import inspect
import math
from dataclasses import dataclass

import torch

from nanoalign.batching import concatenated_batch
from nanoalign.common import all_reduce_sum, autocast
from nanoalign.generate import (entropy_from_logits, fit_prompt, generate, last_true,
                                response_logprobs, sequence_logps)
from nanoalign.model import GPT
from nanoalign.record import load_checkpoint
from nanoalign.tokenizer import render_chat


# ----------------------------------------------------------------------------------- statistics

def masked_sum(x, mask, dim=None):
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x, mask, dim=None):
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8, global_stats=True):
    """(x - mean) / std over the masked entries only, with the biased variance (TensorFlow's
    moments, as the references use; Huang et al. 2024, "TensorFlow vs PyTorch"). global_stats:
    under DDP the mean and variance are over every rank's tokens (an all-reduce of the sum, the sum
    of squares and the count), so 2 ranks whiten exactly as one process would."""
    mask = mask.to(x.dtype)
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()])
    if global_stats:
        stats = all_reduce_sum(stats)
    total, total_sq, n = stats
    mean = total / n
    var = total_sq / n - mean * mean
    whitened = (x - mean) * torch.rsqrt(var.clamp(min=0) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def mean_stats(rows: list[dict]) -> dict:
    """The mean of each named statistic over rows (e.g. one row per minibatch update)."""
    if not rows:
        return {}
    return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]).mean() for k in rows[0]}


def kl_estimates(logp, ref_logp):
    """Per-token estimators of KL(pi || pi_ref) on tokens sampled from pi (Schulman 2020,
    "Approximating KL divergence"): k1 = log pi - log pi_ref (unbiased, can be negative),
    k2 = (log r)^2 / 2, k3 = (r - 1) - log r with r = pi_ref / pi (unbiased and >= 0)."""
    log_ratio = logp - ref_logp
    k1 = log_ratio
    k2 = 0.5 * log_ratio ** 2
    k3 = torch.expm1(-log_ratio) + log_ratio
    return k1, k2, k3


# ----------------------------------------------------------------------------------- pairs

def pair_rewards(model, pairs, pad_id, device, offset: float = 0.0):
    """The scalar head read at the last real token (the <|end|>) of each pair's chosen and rejected
    answer, minus the offset: (chosen (B,), rejected (B,)). One forward of the 2B right-padded rows
    (no attention mask needed: model.py). Reading a pad there instead is the classic bug."""
    tokens, _, mask = concatenated_batch(pairs, pad_id, device)  # [prompt+chosen; prompt+rejected]
    scores = model(tokens, output="scalar")  # (2B, T)
    rewards = scores.gather(1, last_true(mask)[:, None]).squeeze(1) - offset  # (2B,)
    return rewards[:len(pairs)], rewards[len(pairs):]


def concatenated_logps(model, pairs, pad_id, device):
    """(chosen (B,), rejected (B,)) sequence log-probs of a batch of pairs, in one forward of the 2B
    right-padded rows (the DPO reference's "concatenated forward"): DPO's and the evaluation's."""
    tokens, labels, _ = concatenated_batch(pairs, pad_id, device)
    logps = sequence_logps(model(tokens), labels)  # (2B,)
    return logps[:len(pairs)], logps[len(pairs):]


@torch.no_grad()
def score_last_token(reward_model, tokens, pad_mask, offset: float = 0.0):
    """The reward model's scalar at each row's last real token (the <|end|>, or the last token if
    it never ended), minus the normalisation offset. Padding, left or right, is never read.
    (B, T) -> (B,)"""
    scores = reward_model(tokens, pad_mask=pad_mask, output="scalar")  # (B, T), fp32
    return scores.gather(1, last_true(pad_mask)[:, None]).squeeze(1) - offset


def load_reward_model(path: str, device="cpu"):
    """(frozen reward model, normalisation offset) from an RM-stage checkpoint."""
    ckpt = load_checkpoint(path, stages=["rm"])
    model = GPT.from_checkpoint(ckpt, device).eval().requires_grad_(False)
    return model, float(ckpt.get("reward_offset") or 0.0)


# ----------------------------------------------------------------------------------- rollouts

@dataclass
class Rollout:
    """One batch of sampled responses and all that is computed from them before the update (all
    detached)."""
    tokens: torch.Tensor  # (B, P+N) left-padded prompt + right-padded response
    pad_mask: torch.Tensor  # (B, P+N) True at real tokens
    P: int  # prompt width: response token t sits at column P + t
    response_mask: torch.Tensor  # (B, N) True for response tokens up to and including <|end|>
    ended: torch.Tensor  # (B,) True where the response emitted <|end|>
    logprobs: torch.Tensor  # (B, N) policy log-probs at the sampling temperature
    ref_logprobs: torch.Tensor  # (B, N) reference log-probs at the sampling temperature
    values: torch.Tensor | None  # (B, N) value estimates (PPO only)


@torch.no_grad()
def rollout(policy, ref, prompts, end_id, pad_id, max_new_tokens, temperature, generator=None,
            with_values=False, dtype="float32", minibatch=0):
    """Sample responses with the KV cache, then recompute the policy's log-probs (and values) and
    the reference's with the training forward on the same padded tensors, under the update's
    autocast and in chunks of its minibatch size: both sides of every ratio come from the same
    kernels at the same shapes, so PPO's first ratio is exactly 1, in bf16 too (on a GPU a
    matmul's rounding can depend on the batch size)."""
    tokens, pad_mask, P = generate(policy, prompts, max_new_tokens, end_id, pad_id, temperature,
                                   generator=generator)
    policy.eval()
    logprobs, ref_logprobs, values = [], [], []
    for rows in torch.arange(len(prompts), device=tokens.device).split(minibatch or len(prompts)):
        t, m = tokens[rows], pad_mask[rows]
        with autocast(str(tokens.device), dtype):
            out = policy(t, pad_mask=m, output="both" if with_values else "logits")
            ref_logits = ref(t, pad_mask=m)
        logits = out[0] if with_values else out
        logprobs.append(response_logprobs(logits, t, P, temperature))
        ref_logprobs.append(response_logprobs(ref_logits, t, P, temperature))
        if with_values:  # V(s_t) is read at the state that predicts response token t
            values.append(out[1][:, P - 1:-1])
    return Rollout(tokens, pad_mask, P, response_mask=pad_mask[:, P:],
                   ended=(tokens[:, P:] == end_id).any(1), logprobs=torch.cat(logprobs),
                   ref_logprobs=torch.cat(ref_logprobs),
                   values=torch.cat(values) if with_values else None)


def clipped_surrogate(logprobs, old_logprobs, advantages, cliprange: float):
    """PPO's clipped surrogate per token (Schulman et al. 2017, eq. 7), written as a loss to
    minimise: max(-A r, -A clip(r, 1 - eps, 1 + eps)) with r = exp(log pi - log pi_old). Once the
    ratio leaves the clip range on the side the advantage favours, the max picks the clipped term, a
    constant: no gradient pushes it further. PPO and GRPO both use it.
    Returns (per-token loss, ratio, clipped: True where the clipped term was chosen)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    return torch.max(unclipped, clipped), ratio, clipped > unclipped


def policy_entropy(logits, temperature: float, with_grad: bool):
    """Per-token entropy of the sampling distribution softmax(z / temperature). (B, N, V) -> (B, N).
    Without with_grad (no entropy bonus) it is a statistic: no graph over the whole vocabulary."""
    if with_grad:
        return entropy_from_logits(logits, temperature)
    with torch.no_grad():
        return entropy_from_logits(logits.detach(), temperature)


def prompt_text(messages: list[dict]) -> str:
    """The text a judge sees as the prompt: the last user turn."""
    return [m["content"] for m in messages if m["role"] == "user"][-1]


def response_texts(tok, tokens, pad_mask, P: int) -> list[str]:
    """Decoded responses without padding and without the closing <|end|>."""
    return [tok.decode([t for t in row[P:][m[P:]].tolist() if t != tok.end_id])
            for row, m in zip(tokens, pad_mask)]


@torch.no_grad()
def rollout_pairs(policy, tok, prompts: list[list[dict]], max_new_tokens, temperature, generator,
                  max_len, rm=None, judge=None):
    """Online preference data: two samples per prompt from `policy`; the higher-scored one is
    "chosen". Scored by the reward model `rm` = (model, offset), or by
    `judge(prompt_texts, response_texts) -> scores`. Ties are dropped.
    Returns [(prompt_ids, chosen_ids, rejected_ids)] in the layout tokenize_pref produces."""
    ids = [fit_prompt(render_chat(tok, m, add_generation_prompt=True)[0], max_len - max_new_tokens)
           for m in prompts]
    tokens, mask, P = generate(policy, ids + ids, max_new_tokens, tok.end_id, tok.pad_id,
                               temperature, generator=generator)
    responses = [row[P:][m[P:]].tolist() for row, m in zip(tokens, mask)]
    if rm is not None:
        scores = score_last_token(rm[0], tokens, mask, rm[1]).tolist()
    else:
        scores = judge([prompt_text(m) for m in prompts] * 2, response_texts(tok, tokens, mask, P))
    n, pairs = len(prompts), []
    for i in range(n):
        a, b, score_a, score_b = responses[i], responses[n + i], scores[i], scores[n + i]
        if a != b and score_a != score_b:
            pairs.append((ids[i], a, b) if score_a > score_b else (ids[i], b, a))
    return pairs


# ----------------------------------------------------------------------------------- reward sources

# The built-in world's judges, named like any other (a stage never imports the world itself)
JUDGES = {"gold": "nanoalign.world:gold_scores", "verifiable": "nanoalign.world:verifiable_rewards"}


def reward_function(spec: str):
    """A judge by name: "gold" (the built-in world's), "verifiable" (its exact answers), or
    "module:function", importable from where you run (e.g. myreward.py in the current directory:
    "myreward:brevity"). function(prompts, responses[, answers]) -> list of floats."""
    module, _, name = JUDGES.get(spec, spec).partition(":")
    if not name:
        raise ValueError(f"--reward {spec!r}: expected 'rm', 'verifiable', 'gold' or "
                         "'module:function'")
    return getattr(importlib.import_module(module), name)


def load_judge(spec: str):
    """(kind, function) of an evaluation judge: "gold" or "module:function", as reward_function
    finds it. Two required arguments make a pointwise judge, function(prompts, answers) -> scores
    (what --reward takes); three a pairwise one, function(prompts, answers_a, answers_b) -> for
    each prompt 1 (A is better), 0 (B is) or 0.5 (a tie). Prompts and answers are strings."""
    function = reward_function(spec)
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in inspect.signature(function).parameters.values()
                if p.kind in positional and p.default is inspect.Parameter.empty]
    if len(required) not in (2, 3):
        raise SystemExit(f"--judge {spec}: expected a function of (prompts, answers) or (prompts, "
                         f"answers_a, answers_b), found one of {len(required)} required arguments")
    kind = "pointwise" if len(required) == 2 else "pairwise"
    lo, hi = (-math.inf, math.inf) if kind == "pointwise" else (0.0, 1.0)

    def checked(prompts, *answers):  # one float per prompt, in range, or a clear error
        values = [float(v) for v in function(prompts, *answers)]
        if len(values) != len(prompts) or not all(lo <= v <= hi for v in values):
            raise ValueError(f"judge {spec}: expected {len(prompts)} numbers in [{lo}, {hi}], "
                             f"one per prompt, found {len(values)}: {values[:5]}")
        return values
    return kind, checked


def make_scorer(spec: str, reward_model_path: str | None, tok, device):
    """A reward source for RL: score(prompts: list of message lists, ro: Rollout, answers=None)
    -> (B,) tensor.

    "rm": the learned reward model at the last real token (minus its offset); "verifiable": 1 if
    the response gives the problem's exact answer, else 0 (needs answers); "gold": the built-in
    world's judge (an oracle: a ceiling, never evidence that a method works); "module:function":
    your own function(prompts: list[str], responses: list[str]) -> list[float]."""
    if spec == "rm":
        rm, offset = load_reward_model(reward_model_path, device)
        return lambda prompts, ro, answers=None: score_last_token(rm, ro.tokens, ro.pad_mask,
                                                                  offset)
    judge = reward_function(spec)

    def score(prompts, ro, answers=None):
        texts = response_texts(tok, ro.tokens, ro.pad_mask, ro.P)
        questions = [prompt_text(m) for m in prompts]
        values = judge(questions, texts) if answers is None else judge(questions, texts, answers)
        assert len(values) == len(texts), \
            f"reward function returned {len(values)} scores for {len(texts)} responses"
        return torch.tensor([float(v) for v in values], device=ro.tokens.device)
    return score
