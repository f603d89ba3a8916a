"""
Batched sampling with the KV cache, and log-probabilities of given tokens: the one "forward
contract" every stage uses.

Layout of a generated batch (B rows, P = longest prompt, N = new tokens): prompts are left-padded to
P, responses right-padded after their <|end|>:

    [pad pad p0 p1 p2 | r0 r1 <|end|> pad pad]
     <------ P ------>  <-------- N --------->

The logits at position P-1+t score response token t (the next-token shift; Ziegler et al. 2019).
Every log-prob used in RL is computed from logits / temperature, the same temperature the sampler
used (Huang et al. 2024, policy detail 1).
"""

import torch
import torch.nn.functional as F

from nanoalign.model import GPT, KVCache


def pad_left(prompts: list[list[int]], pad_id: int, device="cpu"):
    """(B, P) token ids and (B, P) bool mask with each prompt flush right."""
    P = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = True
    return tokens.to(device), mask.to(device)


def fit_prompt(ids: list[int], limit: int) -> list[int]:
    """A prompt cut to its last `limit` tokens, keeping its opening token (<|user|>): the request is
    at the end, and the conversation must still open as the model was trained (batching._fit
    cuts files the same way)."""
    return ids if len(ids) <= limit else ids[:1] + ids[len(ids) - limit + 1:]


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row from logits (B, V). temperature 0 = greedy. RL uses pure ancestral
    sampling (top_k=0, top_p=1): any truncation makes the sampled distribution differ from the one
    PPO's log-probs describe."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p
        drop = cum - sorted_logits.softmax(-1) > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # inverse-CDF sampling: the first token whose cumulative probability passes u ~ U(0, 1), the
    # same distribution as torch.multinomial from one random number per row, not one per token.
    # In fp64 a tiny probability keeps its share; the sum is scaled to end at exactly 1 > u, so
    # a zero-probability token (a flat step of the sum) is never chosen
    cdf = logits.softmax(-1).cumsum(-1, dtype=torch.float64)  # (B, V)
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    return torch.searchsorted(cdf / cdf[:, -1:], u, right=True).squeeze(-1)  # (B,)


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, end_id: int, pad_id: int,
             temperature=1.0, top_k=0, top_p=1.0, generator=None, use_cache=True):
    """Sample continuations of a batch of prompts until every row has emitted `end_id`, or
    max_new_tokens.

    Returns (tokens (B, P+N), pad_mask (B, P+N), P). After a row's end token every token is pad
    (mask False).
    No collective ops inside: under DDP each rank generates on its own (pass the unwrapped model).
    """
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    tokens, mask = pad_left(prompts, pad_id, device)
    B, P = tokens.shape
    max_new_tokens = min(max_new_tokens, model.config.block_size - P)
    assert max_new_tokens > 0, \
        f"a prompt of {P} tokens leaves no room in block_size {model.config.block_size}"
    # written in place, one column a step
    tokens = torch.cat([tokens, tokens.new_full((B, max_new_tokens), pad_id)], 1)  # (B, P+N)
    mask = F.pad(mask, (0, max_new_tokens))  # (B, P+N)
    # inference mode: no autograd bookkeeping for the step's many small tensors (~6% a step);
    # tokens and mask are written in place, so they stay ordinary tensors
    with torch.inference_mode():
        cache = KVCache(model, B, P + max_new_tokens) if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(P, P + max_new_tokens):
            if not use_cache:  # recompute the whole prefix each step: the slow reference path
                logits = model(tokens[:, :t], pad_mask=mask[:, :t])[:, -1]
            elif t == P:  # the prompt, once, into the cache
                logits = model(tokens[:, :P], pad_mask=mask[:, :P], cache=cache)[:, -1]
            else:  # then only the new token's slot is computed
                logits = model.decode(tokens[:, t - 1], cache)  # (B, V)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            tokens[:, t] = nxt.masked_fill_(done, pad_id)
            mask[:, t] = ~done
            done |= nxt == end_id
            if done.all():
                break
    tokens, mask = tokens[:, :t + 1].contiguous(), mask[:, :t + 1].contiguous()
    model.train(was_training)
    return tokens, mask, P


def upcast(x):
    """At least fp32 for softmaxes and losses: bf16 logits are upcast, fp64 (the DDP tests') stays
    fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def logprobs_from_logits(logits, labels):
    """log softmax(logits)[label], in fp32 (a bf16 log-softmax makes PPO's ratios and KL noisy).
    (B, T, V) -> (B, T)."""
    return torch.gather(F.log_softmax(upcast(logits), -1), 2, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits, temperature=1.0):
    """Entropy of softmax(z / temperature): -sum p log p = logsumexp(z) - sum softmax(z) z, per
    position. (B, T, V) -> (B, T). A policy's entropy is that of the distribution it samples from,
    at its temperature."""
    logits = upcast(logits) / temperature
    return torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)


def response_logprobs(logits, tokens, start: int, temperature=1.0):
    """Log-probs of tokens[:, start:] under logits (B, T, V) of the full sequence: the logits at
    start-1+t score token start+t. Returns (B, T-start). Upcast before dividing by the temperature:
    a bf16 quotient would be rounded again."""
    return logprobs_from_logits(upcast(logits[:, start - 1:-1]) / temperature, tokens[:, start:])


def sequence_logps(logits, labels):
    """Sum of log p(label) over the labelled tokens (labels != -100), shifted by one: the logits
    at t score the label at t + 1. (B, T, V), (B, T) -> (B,). DPO's and the evaluation's
    log pi(y|x)."""
    labels = labels[:, 1:]  # (B, T-1)
    logp = logprobs_from_logits(logits[:, :-1], labels.clamp(min=0))  # (B, T-1); -100 read as 0
    return (logp * (labels != -100)).sum(-1)


def last_true(mask):
    """Index of the last True in each row of a (B, T) bool mask: the last real token of a padded
    sequence, however it is padded. (B, T) -> (B,)"""
    T = mask.size(1)
    idx = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask, idx, -1).max(1).values  # (B,)
