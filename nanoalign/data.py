"""
Readers for SFT, preference, prompt and verifiable-task files: ours, TRL's standard formats,
Alpaca, ShareGPT, Anthropic HH (data/README.md shows each), as JSONL or as one JSON array
(files.py reads the file; this module reads the schema). The loaders return:
    SFT example         [{"role": "user" | "assistant" | "system", "content": str}, ...]
    preference example  {"prompt": [messages], "chosen": str, "rejected": str}
    prompt              [messages] ending with a user turn
    verifiable problem  {"prompt": [messages], "answer": str}
A bad record raises DataError "FILE:LINE: expected ..., found ..."; with skip_bad=True bad ones
are skipped, counted, and reported in one warning (never silently). Tokenisation is batching.py's.
"""

import os
import re

from nanoalign.files import DataError, expect, read_jsonl

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class Messages(list):
    """A message list that knows its FILE:LINE (for errors); compares equal to a plain list."""
    where = "<example>"


class Record(dict):
    """A dict that knows its FILE:LINE (for errors); compares equal to a plain dict."""
    where = "<example>"


def _tag(obj, where):
    obj.where = where
    return obj


# ------------------------------------------------------------ checking fields
def _text(rec, key, where):
    expect(key in rec, where, f"a field {key!r}", f"fields {sorted(rec)}")
    v = rec[key]
    expect(isinstance(v, str), where, f"{key!r} to be a string", type(v).__name__)
    expect(v.strip(), where, f"non-empty {key!r}", "an empty string")
    return v


def _messages(v, where, key="messages"):
    expect(isinstance(v, list) and v, where, f"{key!r} to be a non-empty list of messages",
           type(v).__name__)
    out = []
    for j, m in enumerate(v):
        at = f"{where}: {key}[{j}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{at}: expected an object with 'role' and 'content', found "
                            f"{str(m)[:60]}")
        expect(m["role"] in ROLES, at, "role 'system', 'user' or 'assistant'", repr(m["role"]))
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
    expect(not ends_with_user or msgs[-1]["role"] == "user", where,
           "the prompt to end with a user turn", repr(msgs[-1]["role"]))
    return msgs


# ------------------------------------------------------------ the loaders
def _conversation(rec, where):
    """'messages' [{role, content}], or ShareGPT's 'conversations' [{from, value}]."""
    if "messages" in rec:
        return _messages(rec["messages"], where)
    turns = rec["conversations"]
    expect(isinstance(turns, list), where, "'conversations' to be a list", type(turns).__name__)
    for j, t in enumerate(turns):
        ok = isinstance(t, dict) and t.get("from") in SHAREGPT_ROLES and "value" in t
        expect(ok, f"{where}: conversations[{j}]", "ShareGPT's {'from': 'human', 'gpt' or "
               "'system', 'value': ...}", str(t)[:60])
    msgs = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]
    return _messages(msgs, where, "conversations")


def _completion(v, where):
    """TRL's 'completion': a string, or the assistant messages (typically one) after the prompt."""
    if isinstance(v, str):
        return [{"role": "assistant", "content": _text({"completion": v}, "completion", where)}]
    msgs = _messages(v, where, "completion")
    roles = [m["role"] for m in msgs]
    expect(set(roles) == {"assistant"}, where, "'completion' to hold assistant messages only",
           f"roles {roles}")
    return msgs


def _sft(rec, where):
    if "messages" in rec or "conversations" in rec:
        msgs = _conversation(rec, where)
        expect(any(m["role"] == "assistant" for m in msgs), where,
               "at least one assistant turn in the conversation", "none")
        return _tag(Messages(msgs), where)
    if "chosen" in rec and not {"response", "completion"} & rec.keys():  # SFT on a pair's chosen
        p = _pref(rec, where)
        return _tag(Messages(p["prompt"] + [{"role": "assistant", "content": p["chosen"]}]), where)
    if "instruction" in rec:  # Alpaca
        prompt, inp = _text(rec, "instruction", where), rec.get("input") or ""
        expect(isinstance(inp, str), where, "'input' to be a string", type(inp).__name__)
        prompt = prompt + "\n\n" + inp if inp.strip() else prompt
        answer = {"role": "assistant", "content": _text(rec, "output", where)}
        return _tag(Messages([{"role": "user", "content": prompt}, answer]), where)
    expect("prompt" in rec, where, "'prompt' and 'response' or 'completion', 'messages', "
           "ShareGPT 'conversations', Alpaca 'instruction' and 'output', or a preference "
           "record's 'chosen'", f"fields {sorted(rec)}")
    prompt = _prompt(rec["prompt"], where)
    if "completion" in rec:  # TRL's prompt-completion format
        return _tag(Messages(prompt + _completion(rec["completion"], where)), where)
    expect("response" in rec, where, "a field 'response' (or 'completion')",
           f"fields {sorted(rec)}")
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
    expect(cut >= 0 and chosen.startswith("\n\nHuman:"), where,
           "HH transcripts '\\n\\nHuman: ...\\n\\nAssistant: ...' sharing a prompt",
           repr(chosen[:40]))
    cut += len("\n\nAssistant:")
    answers = []
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        ans = text[cut:]
        expect(not HH_TURN.search(ans), where, "chosen and rejected to differ only in the final "
               "Assistant answer", f"more turns in {key!r}")
        # "Assistant: text": one space belongs to the format
        answers.append(ans.removeprefix(" "))
    parts = HH_TURN.split(chosen[:cut])  # ["", "Human", " q1", "Assistant", " a1", ..., ""]
    turns = [{"role": "user" if role == "Human" else "assistant", "content": c.removeprefix(" ")}
             for role, c in zip(parts[1::2], parts[2::2])]
    return turns[:-1], answers[0], answers[1]  # the last "Assistant:" opens the answer


def _side(v, key, where):
    """'chosen' or 'rejected' as messages: a string is one assistant message."""
    if isinstance(v, str):
        return [{"role": "assistant", "content": _text({key: v}, key, where)}]
    return _messages(v, where, key)


def _split_pair(rec, where):
    """TRL's conversational pairs, with or without an explicit 'prompt'. The longest shared
    prefix of whole messages extends the prompt (TRL's extract_prompt); after it each side must
    hold exactly one assistant message, the answer. (TRL also accepts several messages there; a
    pair here compares two answers to one prompt.) Returns (prompt, chosen, rejected)."""
    c, r = _side(rec["chosen"], "chosen", where), _side(rec["rejected"], "rejected", where)
    expect(c != r, where, "chosen and rejected to differ", "the same answer twice")
    shared = 0
    while shared < min(len(c), len(r)) and c[shared] == r[shared]:
        shared += 1
    # the prompt may end with an assistant turn if chosen and rejected add a user turn
    prompt = _prompt(rec["prompt"], where, ends_with_user=False) if "prompt" in rec else []
    prompt = prompt + c[:shared]
    expect(prompt, where, "'chosen' and 'rejected' to share a prompt (no 'prompt' field: their "
           "first messages)", "no message in common")
    for key, msgs in (("chosen", c), ("rejected", r)):
        expect(len(msgs) == shared + 1 and msgs[-1]["role"] == "assistant", where,
               f"{key!r} to add one assistant message to the prompt they share",
               f"{len(msgs) - shared} message(s) ending with a {msgs[-1]['role']!r} one")
    expect(prompt[-1]["role"] == "user", where, "a prompt ending with a user turn",
           repr(prompt[-1]["role"]))
    return prompt, c[-1]["content"], r[-1]["content"]


def _pref(rec, where):
    expect("chosen" in rec and "rejected" in rec, where, "fields 'chosen' and 'rejected'",
           f"fields {sorted(rec)}")
    if "prompt" not in rec and isinstance(rec["chosen"], str):
        prompt, chosen, rejected = _hh(rec, where)
    else:
        prompt, chosen, rejected = _split_pair(rec, where)
    expect(chosen.strip() and rejected.strip(), where, "non-empty chosen and rejected answers",
           "an empty one")
    expect(chosen != rejected, where, "chosen and rejected to differ", "the same answer twice")
    gold = {k: float(rec[k]) for k in ("gold_chosen", "gold_rejected")
            if isinstance(rec.get(k), (int, float))}
    prompt = _tag(Messages(prompt), where)
    return _tag(Record(prompt=prompt, chosen=chosen, rejected=rejected, **gold), where)


def load_prefs(path, skip_bad=False) -> list[dict]:
    return read_jsonl(path, _pref, skip_bad)


def _prompt_record(rec, where):
    if "prompt" in rec:
        return _tag(Messages(_prompt(rec["prompt"], where)), where)
    if "messages" in rec or "conversations" in rec:  # a conversation: before its final answer
        msgs = _conversation(rec, where)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        return _tag(Messages(_prompt(msgs, where)), where)
    if "chosen" in rec:  # a preference record (e.g. Anthropic HH): its shared prompt
        return _pref(rec, where)["prompt"]
    raise DataError(f"{where}: expected a field 'prompt', 'messages', 'conversations' or a "
                    f"preference record's 'chosen', found fields {sorted(rec)}")


def load_prompts(path, skip_bad=False) -> list[list[dict]]:
    return read_jsonl(path, _prompt_record, skip_bad)


def _verifiable(rec, where):
    prompt = _prompt_record(rec, where)
    return _tag(Record(prompt=prompt, answer=_text(rec, "answer", where).strip()), where)


def load_verifiable(path, skip_bad=False) -> list[dict]:
    return read_jsonl(path, _verifiable, skip_bad)


