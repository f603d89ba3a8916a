"""
Readers for SFT, preference, prompt and verifiable-task JSONL files (ours and common public schemas), tokenisation
in the chat template, and padding. Shared by every stage; independent of the model.

Normal forms every loader returns:
    SFT example         [{"role": "user" | "assistant" | "system", "content": str}, ...]   (>= 1 assistant turn)
    preference example  {"prompt": [messages], "chosen": str, "rejected": str}         (single assistant answers)
    prompt              [messages] ending with a user turn
    verifiable problem  {"prompt": [messages], "answer": str}

Accepted schemas (one JSON object per line; data/README.md has an example of each):
    SFT      {"prompt", "response"} | {"messages": [...]} | Alpaca {"instruction", "input", "output"}
    prefs    {"prompt", "chosen", "rejected"} with strings or message lists | Anthropic HH {"chosen", "rejected"} as
             "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts (split after the last shared "\\n\\nAssistant:")

Every problem is a DataError "FILE:LINE: expected ..., found ...". With skip_bad=True bad records are skipped,
counted, and reported in one warning (never silently).
"""

import json
import os
import re
import warnings

import torch

from nanoalign.tokenizer import render_chat

ROLES = ("system", "user", "assistant")
MIN_PROMPT_TOKENS = 8  # truncation never leaves a prompt shorter than this (or than the prompt itself)
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class DataError(ValueError):
    """A bad input record; the message always starts with FILE:LINE."""


class Messages(list):
    """A message list that remembers where it came from (FILE:LINE), so a tokenisation error can point at the record.
    Compares equal to a plain list."""
    where = "<example>"


class Record(dict):
    """A dict that remembers where it came from; compares equal to a plain dict."""
    where = "<example>"


def _tag(obj, where):
    obj.where = where
    return obj


# ----------------------------------------------------------------------------- reading JSONL
def _lines(path):
    """(line number, record or the DataError that line raises). Blank lines are skipped."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    rows = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not rows:
        raise DataError(f"{path}:1: expected JSON lines (one object per line), found an empty file")
    for i, line in rows:
        where = f"{path}:{i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            yield i, DataError(f"{where}: expected a JSON object, found malformed JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(rec, dict):
            yield i, DataError(f"{where}: expected a JSON object, found {type(rec).__name__}")
            continue
        yield i, rec


def read_jsonl(path) -> list[tuple[int, dict]]:
    """[(1-based line number, record)]; the first bad line raises DataError."""
    out = []
    for i, rec in _lines(path):
        if isinstance(rec, DataError):
            raise rec
        out.append((i, rec))
    return out


def _load(path, parse, skip_bad):
    """Apply parse(record, where) to every record, raising or (skip_bad) skipping and counting bad ones."""
    out, bad = [], []
    for i, rec in _lines(path):
        try:
            if isinstance(rec, DataError):
                raise rec
            out.append(parse(rec, f"{path}:{i}"))
        except DataError as e:
            if not skip_bad:
                raise
            bad.append(str(e))
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} bad record(s) of {len(out) + len(bad)}; first: "
                      + "; ".join(bad[:3]))
    if not out:
        raise DataError(f"{path}:1: expected at least one valid record, found none")
    return out


# ----------------------------------------------------------------------------- field checks
def _text(rec, key, where):
    if key not in rec:
        raise DataError(f"{where}: expected a field {key!r}, found fields {sorted(rec)}")
    v = rec[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: expected {key!r} to be a string, found {type(v).__name__}")
    if not v.strip():
        raise DataError(f"{where}: expected non-empty {key!r}, found an empty string")
    return v


def _messages(v, where, key="messages"):
    if not isinstance(v, list) or not v:
        raise DataError(f"{where}: expected {key!r} to be a non-empty list of messages, found {type(v).__name__}")
    out = []
    for j, m in enumerate(v):
        at = f"{where}: {key}[{j}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{at}: expected an object with 'role' and 'content', found {str(m)[:60]}")
        if m["role"] not in ROLES:
            raise DataError(f"{at}: expected role 'system', 'user' or 'assistant', found {m['role']!r}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise DataError(f"{at}: expected non-empty string content, found {m['content']!r}"[:200])
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt(v, where, ends_with_user=True):
    """A prompt field: a string (one user turn) or messages ending with a user turn."""
    if isinstance(v, str):
        return [{"role": "user", "content": _text({"prompt": v}, "prompt", where)}]
    msgs = _messages(v, where, "prompt")
    if ends_with_user and msgs[-1]["role"] != "user":
        raise DataError(f"{where}: expected the prompt to end with a user turn, found {msgs[-1]['role']!r}")
    return msgs


# ----------------------------------------------------------------------------- SFT
def _sft(rec, where):
    if "messages" in rec:
        msgs = _messages(rec["messages"], where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: expected at least one assistant turn in 'messages', found none")
        return _tag(Messages(msgs), where)
    if "chosen" in rec and "response" not in rec:  # a preference record (e.g. Anthropic HH): SFT on the chosen answer
        ex = _pref(rec, where)
        return _tag(Messages(list(ex["prompt"]) + [{"role": "assistant", "content": ex["chosen"]}]), where)
    if "instruction" in rec:  # Alpaca
        prompt, inp = _text(rec, "instruction", where), rec.get("input") or ""
        if not isinstance(inp, str):
            raise DataError(f"{where}: expected 'input' to be a string, found {type(inp).__name__}")
        prompt = prompt + "\n\n" + inp if inp.strip() else prompt
        return _tag(Messages([{"role": "user", "content": prompt},
                              {"role": "assistant", "content": _text(rec, "output", where)}]), where)
    if "prompt" not in rec:
        raise DataError(f"{where}: expected 'prompt' and 'response', 'messages', Alpaca 'instruction' and 'output', "
                        f"or a preference record's 'chosen', found fields {sorted(rec)}")
    return _tag(Messages(_prompt(rec["prompt"], where) +
                         [{"role": "assistant", "content": _text(rec, "response", where)}]), where)


def load_sft(path, skip_bad=False) -> list[list[dict]]:
    return _load(path, _sft, skip_bad)


# ----------------------------------------------------------------------------- preferences
def _hh(rec, where):
    """Anthropic HH: both transcripts share the dialogue up to the last "\\n\\nAssistant:" and differ in the final
    answer. We cut inside the longest common prefix (the DPO reference's right-most split, but robust to the outliers
    where the two transcripts have different numbers of turns, direct-preference-optimization PR#86)."""
    chosen, rejected = _text(rec, "chosen", where), _text(rec, "rejected", where)
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind("\n\nAssistant:")
    if cut < 0 or not chosen.startswith("\n\nHuman:"):
        raise DataError(f"{where}: expected HH transcripts '\\n\\nHuman: ...\\n\\nAssistant: ...' sharing a prompt, "
                        f"found {chosen[:40]!r}")
    cut += len("\n\nAssistant:")
    answers = []
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        ans = text[cut:]
        if HH_TURN.search(ans):
            raise DataError(f"{where}: expected chosen and rejected to differ only in the final Assistant answer, "
                            f"found more turns in {key!r}")
        answers.append(ans[1:] if ans.startswith(" ") else ans)  # "Assistant: text": one space belongs to the format
    parts = HH_TURN.split(chosen[:cut])  # ["", "Human", " q1", "Assistant", " a1", ..., "Assistant", ""]
    prompt = [{"role": "user" if role == "Human" else "assistant", "content": c[1:] if c.startswith(" ") else c}
              for role, c in zip(parts[1::2], parts[2::2])][:-1]  # the last "Assistant:" opens the answer
    return prompt, answers[0], answers[1]


def _pref_side(v, key, where):
    """A response field: a string, or messages whose last one is the assistant's answer (earlier ones extend the
    prompt). Returns (extra prompt messages, answer)."""
    if isinstance(v, str):
        return [], _text({key: v}, key, where)
    msgs = _messages(v, where, key)
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: expected the last message of {key!r} to be the assistant's, found "
                        f"{msgs[-1]['role']!r}")
    return msgs[:-1], msgs[-1]["content"]


def _pref(rec, where):
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise DataError(f"{where}: expected fields 'chosen' and 'rejected', found fields {sorted(rec)}")
    if "prompt" not in rec and isinstance(rec["chosen"], str):
        prompt, chosen, rejected = _hh(rec, where)
    else:
        # the prompt may end with an assistant turn when chosen/rejected carry the final user turn: checked below
        prompt = _prompt(rec["prompt"], where, ends_with_user=False) if "prompt" in rec else []
        (extra_c, chosen), (extra_r, rejected) = (_pref_side(rec[k], k, where) for k in ("chosen", "rejected"))
        if extra_c != extra_r:
            raise DataError(f"{where}: expected 'chosen' and 'rejected' to share every message before the answer, "
                            f"found different conversations")
        prompt = prompt + extra_c
        if not prompt or prompt[-1]["role"] != "user":
            raise DataError(f"{where}: expected a prompt ending with a user turn, found "
                            f"{prompt[-1]['role'] if prompt else 'no prompt'}")
    if not chosen.strip() or not rejected.strip():
        raise DataError(f"{where}: expected non-empty chosen and rejected answers, found an empty one")
    if chosen == rejected:
        raise DataError(f"{where}: expected chosen and rejected to differ, found the same answer twice")
    gold = {k: float(rec[k]) for k in ("gold_chosen", "gold_rejected") if isinstance(rec.get(k), (int, float))}
    return _tag(Record(prompt=_tag(Messages(prompt), where), chosen=chosen, rejected=rejected, **gold), where)


def load_prefs(path, skip_bad=False) -> list[dict]:
    return _load(path, _pref, skip_bad)


# ----------------------------------------------------------------------------- prompts and verifiable problems
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
    raise DataError(f"{where}: expected a field 'prompt', 'messages' or a preference record's 'chosen', found fields "
                    f"{sorted(rec)}")


def load_prompts(path, skip_bad=False) -> list[list[dict]]:
    return _load(path, _prompt_record, skip_bad)


def _verifiable(rec, where):
    return _tag(Record(prompt=_prompt_record(rec, where), answer=_text(rec, "answer", where).strip()), where)


def load_verifiable(path, skip_bad=False) -> list[dict]:
    return _load(path, _verifiable, skip_bad)


# ----------------------------------------------------------------------------- tokenisation and batching
def _fit(prompt, responses, max_len, truncate_response, where):
    """Make prompt + the longest response fit in max_len: drop the oldest prompt tokens first (the request sits at
    the end of the prompt; the first token, the opening <|user|>, is kept), never below MIN_PROMPT_TOKENS; then, if
    allowed, cut the responses' ends. Returns (kept prompt indices, response length limit)."""
    longest, n = max(len(r) for r in responses), len(prompt)
    floor = min(n, MIN_PROMPT_TOKENS, max_len - 1)
    if n + longest <= max_len:
        return list(range(n)), longest
    if longest + floor > max_len:
        if not truncate_response:
            raise DataError(f"{where}: prompt leaves no room for a response: the response has {longest} tokens, at "
                            f"least {floor} prompt tokens must stay, max_len is {max_len} (raise max_len, or allow "
                            f"truncated responses)")
        keep = max(floor, min(n, max_len // 2))  # share the budget: the prompt keeps up to half
    else:
        keep = max_len - longest
    return [0] + list(range(n - keep + 1, n)), max_len - keep


def tokenize_sft(tok, messages, max_len, truncate_response=False) -> tuple[list[int], list[int]]:
    """(ids, labels) in the chat template; labels cover every assistant turn's content and <|end|>. The last assistant
    turn is the response; everything before it is prompt and may be truncated from the left."""
    ids, labels = render_chat(tok, messages)
    r = max(i for i, t in enumerate(ids) if t == tok.assistant_id) + 1  # first token of the last assistant turn
    keep, limit = _fit(ids[:r], [ids[r:]], max_len, truncate_response, getattr(messages, "where", "<example>"))
    return [ids[i] for i in keep] + ids[r:r + limit], [labels[i] for i in keep] + labels[r:r + limit]


def tokenize_pref(tok, ex, max_len, truncate_response=True) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids ending with <|assistant|>, chosen ids, rejected ids), each response = content + <|end|>. Too long:
    the prompt loses its oldest tokens first, then the responses their ends (each keeps >= 1 token)."""
    prompt, _ = render_chat(tok, ex["prompt"], add_generation_prompt=True)
    chosen, rejected = (tok.encode(ex[k]) + [tok.end_id] for k in ("chosen", "rejected"))
    keep, limit = _fit(prompt, [chosen, rejected], max_len, truncate_response, getattr(ex, "where", "<example>"))
    return [prompt[i] for i in keep], chosen[:limit], rejected[:limit]


def pad(seqs: list[list[int]], pad_value: int, side="right") -> torch.LongTensor:
    """(B, T) tensor of the sequences padded to the longest with pad_value, on the right or the left."""
    assert side in ("right", "left"), f"side must be 'right' or 'left', got {side!r}"
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_value, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        if s:
            if side == "right":
                out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            else:
                out[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
    return out


def concatenated_batch(pairs, pad_id, device):
    """[prompt+chosen for every pair; prompt+rejected for every pair], right-padded: tokens, labels, pad_mask (2B, T).
    Labels are -100 on the prompt and padding, so only response tokens (and their <|end|>) are scored. One forward
    then serves both answers of every pair (the reward model, DPO, the evaluation's preference accuracy)."""
    seqs = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    prompts = [p for p, _, _ in pairs] * 2
    tokens = pad(seqs, pad_id)
    labels = pad([[-100] * len(p) + s[len(p):] for p, s in zip(prompts, seqs)], -100)
    mask = pad([[1] * len(s) for s in seqs], 0).bool()
    return tokens.to(device), labels.to(device), mask.to(device)
