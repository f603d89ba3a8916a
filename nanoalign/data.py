"""
Readers for SFT, preference, prompt and verifiable-task JSONL files (ours, Alpaca, Anthropic HH:
data/README.md shows each), chat-template tokenisation and padding. The loaders return:
    SFT example         [{"role": "user" | "assistant" | "system", "content": str}, ...]
    preference example  {"prompt": [messages], "chosen": str, "rejected": str}
    prompt              [messages] ending with a user turn
    verifiable problem  {"prompt": [messages], "answer": str}
A bad record raises DataError "FILE:LINE: expected ..., found ..."; with skip_bad=True bad ones
are skipped, counted, and reported in one warning (never silently).
"""

import json
import os
import re
import warnings

import torch

from nanoalign.tokenizer import render_chat

ROLES = ("system", "user", "assistant")
MIN_PROMPT_TOKENS = 8  # truncation never leaves a prompt shorter than this (or than the prompt)
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class DataError(ValueError):
    """A bad input record; the message always starts with FILE:LINE."""


class Messages(list):
    """A message list that knows its FILE:LINE (for errors); compares equal to a plain list."""
    where = "<example>"


class Record(dict):
    """A dict that knows its FILE:LINE (for errors); compares equal to a plain dict."""
    where = "<example>"


def _tag(obj, where):
    obj.where = where
    return obj


def _expect(ok, where, expected, found):
    """Every check of a record: unless ok, DataError "FILE:LINE: expected ..., found ..."."""
    if not ok:
        raise DataError(f"{where}: expected {expected}, found {found}")


# ------------------------------------------------------------ reading JSONL, checking fields
def read_jsonl(path, parse=None, skip_bad=False) -> list:
    """[(1-based line number, record)], or [parse(record, "FILE:LINE")]. Blank lines are skipped;
    a bad one raises DataError, or with skip_bad is skipped, counted and reported in a warning."""
    with open(path, encoding="utf-8") as f:
        rows = [(i, line) for i, line in enumerate(f.read().splitlines(), 1) if line.strip()]
    _expect(rows, f"{path}:1", "JSON lines (one object per line)", "an empty file")
    out, bad = [], []
    for i, line in rows:
        where = f"{path}:{i}"
        try:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: expected a JSON object, found malformed JSON "
                                f"({e.msg} at column {e.colno})") from None
            _expect(isinstance(rec, dict), where, "a JSON object", type(rec).__name__)
            out.append((i, rec) if parse is None else parse(rec, where))
        except DataError as e:
            if not skip_bad:
                raise
            bad.append(str(e))
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} bad record(s) of {len(out) + len(bad)}; "
                      "first: " + "; ".join(bad[:3]))
    _expect(out, f"{path}:1", "at least one valid record", "none")
    return out


def _text(rec, key, where):
    _expect(key in rec, where, f"a field {key!r}", f"fields {sorted(rec)}")
    v = rec[key]
    _expect(isinstance(v, str), where, f"{key!r} to be a string", type(v).__name__)
    _expect(v.strip(), where, f"non-empty {key!r}", "an empty string")
    return v


def _messages(v, where, key="messages"):
    _expect(isinstance(v, list) and v, where, f"{key!r} to be a non-empty list of messages",
            type(v).__name__)
    out = []
    for j, m in enumerate(v):
        at = f"{where}: {key}[{j}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{at}: expected an object with 'role' and 'content', found "
                            f"{str(m)[:60]}")
        _expect(m["role"] in ROLES, at, "role 'system', 'user' or 'assistant'", repr(m["role"]))
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise DataError(f"{at}: expected non-empty string content, found "
                            f"{m['content']!r}"[:200])
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt(v, where, ends_with_user=True):
    """A prompt field: a string (one user turn) or messages ending with a user turn."""
    if isinstance(v, str):
        return [{"role": "user", "content": _text({"prompt": v}, "prompt", where)}]
    msgs = _messages(v, where, "prompt")
    _expect(not ends_with_user or msgs[-1]["role"] == "user", where,
            "the prompt to end with a user turn", repr(msgs[-1]["role"]))
    return msgs


# ------------------------------------------------------------ the loaders
def _sft(rec, where):
    if "messages" in rec:
        msgs = _messages(rec["messages"], where)
        _expect(any(m["role"] == "assistant" for m in msgs), where,
                "at least one assistant turn in 'messages'", "none")
        return _tag(Messages(msgs), where)
    if "chosen" in rec and "response" not in rec:  # a preference record (HH): SFT on the chosen
        p = _pref(rec, where)
        return _tag(Messages(p["prompt"] + [{"role": "assistant", "content": p["chosen"]}]), where)
    if "instruction" in rec:  # Alpaca
        prompt, inp = _text(rec, "instruction", where), rec.get("input") or ""
        _expect(isinstance(inp, str), where, "'input' to be a string", type(inp).__name__)
        prompt = prompt + "\n\n" + inp if inp.strip() else prompt
        answer = {"role": "assistant", "content": _text(rec, "output", where)}
        return _tag(Messages([{"role": "user", "content": prompt}, answer]), where)
    _expect("prompt" in rec, where, "'prompt' and 'response', 'messages', Alpaca 'instruction' "
            "and 'output', or a preference record's 'chosen'", f"fields {sorted(rec)}")
    prompt = _prompt(rec["prompt"], where)
    answer = {"role": "assistant", "content": _text(rec, "response", where)}
    return _tag(Messages(prompt + [answer]), where)


def load_sft(path, skip_bad=False) -> list[list[dict]]:
    return read_jsonl(path, _sft, skip_bad)


def _hh(rec, where):
    """Anthropic HH: both transcripts share the dialogue up to the last "\\n\\nAssistant:". We cut
    inside their longest common prefix: the DPO reference's right-most split, robust to pairs
    with different numbers of turns (direct-preference-optimization PR#86)."""
    chosen, rejected = _text(rec, "chosen", where), _text(rec, "rejected", where)
    cut = os.path.commonprefix([chosen, rejected]).rfind("\n\nAssistant:")
    _expect(cut >= 0 and chosen.startswith("\n\nHuman:"), where,
            "HH transcripts '\\n\\nHuman: ...\\n\\nAssistant: ...' sharing a prompt",
            repr(chosen[:40]))
    cut += len("\n\nAssistant:")
    answers = []
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        ans = text[cut:]
        _expect(not HH_TURN.search(ans), where, "chosen and rejected to differ only in the final "
                "Assistant answer", f"more turns in {key!r}")
        # "Assistant: text": one space belongs to the format
        answers.append(ans.removeprefix(" "))
    parts = HH_TURN.split(chosen[:cut])  # ["", "Human", " q1", "Assistant", " a1", ..., ""]
    turns = [{"role": "user" if role == "Human" else "assistant", "content": c.removeprefix(" ")}
             for role, c in zip(parts[1::2], parts[2::2])]
    return turns[:-1], answers[0], answers[1]  # the last "Assistant:" opens the answer


def _pref_side(v, key, where):
    """A response field: a string, or messages whose last one is the assistant's answer (earlier
    ones extend the prompt). Returns (extra prompt messages, answer)."""
    if isinstance(v, str):
        return [], _text({key: v}, key, where)
    msgs = _messages(v, where, key)
    _expect(msgs[-1]["role"] == "assistant", where,
            f"the last message of {key!r} to be the assistant's", repr(msgs[-1]["role"]))
    return msgs[:-1], msgs[-1]["content"]


def _pref(rec, where):
    _expect("chosen" in rec and "rejected" in rec, where, "fields 'chosen' and 'rejected'",
            f"fields {sorted(rec)}")
    if "prompt" not in rec and isinstance(rec["chosen"], str):
        prompt, chosen, rejected = _hh(rec, where)
    else:
        # the prompt may end with an assistant turn if chosen/rejected add a user turn (below)
        prompt = _prompt(rec["prompt"], where, ends_with_user=False) if "prompt" in rec else []
        extra_c, chosen = _pref_side(rec["chosen"], "chosen", where)
        extra_r, rejected = _pref_side(rec["rejected"], "rejected", where)
        _expect(extra_c == extra_r, where, "'chosen' and 'rejected' to share every message "
                "before the answer", "different conversations")
        prompt = prompt + extra_c
        _expect(prompt and prompt[-1]["role"] == "user", where, "a prompt ending with a user turn",
                prompt[-1]["role"] if prompt else "no prompt")
    _expect(chosen.strip() and rejected.strip(), where, "non-empty chosen and rejected answers",
            "an empty one")
    _expect(chosen != rejected, where, "chosen and rejected to differ", "the same answer twice")
    gold = {k: float(rec[k]) for k in ("gold_chosen", "gold_rejected")
            if isinstance(rec.get(k), (int, float))}
    prompt = _tag(Messages(prompt), where)
    return _tag(Record(prompt=prompt, chosen=chosen, rejected=rejected, **gold), where)


def load_prefs(path, skip_bad=False) -> list[dict]:
    return read_jsonl(path, _pref, skip_bad)


def _prompt_record(rec, where):
    if "prompt" in rec:
        return _tag(Messages(_prompt(rec["prompt"], where)), where)
    if "messages" in rec:  # an SFT conversation: everything before its final assistant turn
        msgs = _messages(rec["messages"], where)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        return _tag(Messages(_prompt(msgs, where)), where)
    if "chosen" in rec:  # a preference record (e.g. Anthropic HH): its shared prompt
        return _pref(rec, where)["prompt"]
    raise DataError(f"{where}: expected a field 'prompt', 'messages' or a preference record's "
                    f"'chosen', found fields {sorted(rec)}")


def load_prompts(path, skip_bad=False) -> list[list[dict]]:
    return read_jsonl(path, _prompt_record, skip_bad)


def _verifiable(rec, where):
    prompt = _prompt_record(rec, where)
    return _tag(Record(prompt=prompt, answer=_text(rec, "answer", where).strip()), where)


def load_verifiable(path, skip_bad=False) -> list[dict]:
    return read_jsonl(path, _verifiable, skip_bad)


# ------------------------------------------------------------ tokenisation and batching
def _fit(prompt, responses, max_len, truncate_response, where):
    """Fit prompt + the longest response in max_len: drop the oldest prompt tokens first (the
    request is at the end; the opening <|user|> stays), never below MIN_PROMPT_TOKENS; then, if
    allowed, cut the responses' ends. Returns (kept prompt indices, response length limit)."""
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
    return [0] + list(range(n - keep + 1, n)), max_len - keep


def tokenize_sft(tok, messages, max_len, truncate_response=False) -> tuple[list[int], list[int]]:
    """(ids, labels) in the chat template; labels cover every assistant turn's content and
    <|end|>. The last assistant turn is the response; everything before it is prompt and may be
    truncated from the left."""
    ids, labels = render_chat(tok, messages)
    r = max(i for i, t in enumerate(ids) if t == tok.assistant_id) + 1  # the last answer's start
    where = getattr(messages, "where", "<example>")
    keep, limit = _fit(ids[:r], [ids[r:]], max_len, truncate_response, where)
    return ([ids[i] for i in keep] + ids[r:r + limit],
            [labels[i] for i in keep] + labels[r:r + limit])


def tokenize_pref(tok, ex, max_len,
                  truncate_response=True) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids ending with <|assistant|>, chosen ids, rejected ids), each response = content
    + <|end|>. Too long: the prompt loses its oldest tokens first, then the responses their ends
    (each keeps >= 1 token)."""
    prompt, _ = render_chat(tok, ex["prompt"], add_generation_prompt=True)
    chosen, rejected = (tok.encode(ex[k]) + [tok.end_id] for k in ("chosen", "rejected"))
    where = getattr(ex, "where", "<example>")
    keep, limit = _fit(prompt, [chosen, rejected], max_len, truncate_response, where)
    return [prompt[i] for i in keep], chosen[:limit], rejected[:limit]


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
