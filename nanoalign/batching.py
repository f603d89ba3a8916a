"""
From the readers' message lists (data.py) to token ids the stages train on: the chat template,
truncation to max_len, padding, and the chosen/rejected batch that reward model and DPO share.

Truncation is never silent: a stage tokenises a whole file with tokenize_all, which counts the
examples that did not fit and says so in one warning (how many, what they lost, the longest and
where it is).
"""

import warnings

import torch

from nanoalign.files import DataError
from nanoalign.tokenizer import render_chat

MIN_PROMPT_TOKENS = 8  # truncation never leaves a prompt shorter than this (or than the prompt)


def _fit(prompt, responses, max_len, truncate_response, where, truncated=None):
    """Fit prompt + the longest response in max_len: drop the oldest prompt tokens first (the
    request is at the end; the opening <|user|> stays), never below MIN_PROMPT_TOKENS; then, if
    allowed, cut the responses' ends. Returns (kept prompt indices, response length limit).
    A truncated example is appended to `truncated` (a list) as (where, its length, prompt cut,
    responses cut): tokenize_all reports them."""
    longest, n = max(len(r) for r in responses), len(prompt)
    floor = min(n, MIN_PROMPT_TOKENS, max_len - 1)
    if n + longest <= max_len:
        return list(range(n)), longest
    if longest + floor > max_len:
        if not truncate_response:
            raise DataError(f"{where}: prompt leaves no room for a response: the response has "
                            f"{longest} tokens, at least {floor} prompt tokens must stay, max_len "
                            f"is {max_len} (raise max_len, or allow truncated responses)")
        keep = max(floor, min(n, max_len // 2))  # share the budget: the prompt keeps up to half
    else:
        keep = max_len - longest
    if truncated is not None:
        truncated.append((where, n + longest, keep < n, max_len - keep < longest))
    return [0] + list(range(n - keep + 1, n)), max_len - keep


def tokenize_sft(tok, messages, max_len, truncate_response=False,
                 truncated=None) -> tuple[list[int], list[int]]:
    """(ids, labels) in the chat template; labels cover every assistant turn's content and
    <|end|>. The last assistant turn is the response; everything before it is prompt and may be
    truncated from the left."""
    ids, labels = render_chat(tok, messages)
    r = max(i for i, t in enumerate(ids) if t == tok.assistant_id) + 1  # the last answer's start
    where = getattr(messages, "where", "<example>")
    keep, limit = _fit(ids[:r], [ids[r:]], max_len, truncate_response, where, truncated)
    return ([ids[i] for i in keep] + ids[r:r + limit],
            [labels[i] for i in keep] + labels[r:r + limit])


def tokenize_pref(tok, ex, max_len, truncate_response=True,
                  truncated=None) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids ending with <|assistant|>, chosen ids, rejected ids), each response = content
    + <|end|>. Too long: the prompt loses its oldest tokens first, then the responses their ends
    (each keeps >= 1 token)."""
    prompt, _ = render_chat(tok, ex["prompt"], add_generation_prompt=True)
    chosen, rejected = (tok.encode(ex[k]) + [tok.end_id] for k in ("chosen", "rejected"))
    where = getattr(ex, "where", "<example>")
    keep, limit = _fit(prompt, [chosen, rejected], max_len, truncate_response, where, truncated)
    return [prompt[i] for i in keep], chosen[:limit], rejected[:limit]


def tokenize_all(tokenize, tok, examples, max_len, **kwargs) -> list:
    """[tokenize(tok, example, max_len)] over a file's examples (tokenize = tokenize_sft or
    tokenize_pref), then one warning if any was truncated: how many, what they lost, the longest
    and where it is."""
    truncated = []
    out = [tokenize(tok, ex, max_len, truncated=truncated, **kwargs) for ex in examples]
    if truncated:
        prompt_cut = sum(1 for t in truncated if t[2])
        response_cut = sum(1 for t in truncated if t[3])
        where, longest, _, _ = max(truncated, key=lambda t: t[1])
        warnings.warn(f"{len(truncated)} of {len(examples)} examples were longer than max_len "
                      f"{max_len} tokens and were truncated: {prompt_cut} lost their oldest "
                      f"prompt tokens, {response_cut} their responses' ends; the longest "
                      f"({longest:,} tokens) is at {where}")
    return out


def pad(seqs: list[list[int]], pad_value: int, side="right") -> torch.LongTensor:
    """(B, T): the sequences padded to the longest with pad_value, on the right or the left."""
    assert side in ("right", "left"), f"side must be 'right' or 'left', got {side!r}"
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_value, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        out[i, cols] = torch.tensor(s, dtype=torch.long)
    return out


def concatenated_batch(pairs, pad_id, device):
    """[prompt+chosen for each pair; prompt+rejected for each pair], right-padded: tokens, labels,
    pad_mask (2B, T). Labels are -100 on prompt and padding: only responses (and <|end|>) count.
    One forward serves both answers of every pair (reward model, DPO, preference accuracy)."""
    seqs = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    prompts = [p for p, _, _ in pairs] * 2
    tokens = pad(seqs, pad_id)
    labels = pad([[-100] * len(p) + s[len(p):] for p, s in zip(prompts, seqs)], -100)
    mask = pad([[1] * len(s) for s in seqs], 0).bool()
    return tokens.to(device), labels.to(device), mask.to(device)
