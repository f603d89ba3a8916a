"""Data readers: every accepted schema gives the same normal form; every bad record is a
DataError naming FILE:LINE; tokenisation masks exactly the assistant turns and truncates prompts
from the left."""

import json

import pytest
import torch

from nanoalign.batching import pad, tokenize_pref, tokenize_sft
from nanoalign.data import (DataError, load_prefs, load_prompts, load_sft, load_verifiable,
                            read_jsonl)
from nanoalign.tokenizer import load_tokenizer, save_tokenizer

Q = "Tell me a story about a dog."
A = "Once upon a time, a dog named Tom lived in the park. The end."
B = "A dog."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "bytes.tiktoken"
    save_tokenizer({bytes([i]): i for i in range(256)}, str(path))  # byte-level: no training needed
    return load_tokenizer(str(path))


def write(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_every_sft_schema_loads_to_the_same_messages(tmp_path):
    expected = [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]
    schemas = [{"prompt": Q, "response": A}, {"messages": expected},
               {"instruction": Q, "input": "", "output": A},
               {"prompt": [{"role": "user", "content": Q}], "response": A}]
    assert load_sft(write(tmp_path, schemas)) == [expected] * len(schemas)
    record = {"instruction": "Summarise.", "input": "Text.", "output": "Short."}
    alpaca = load_sft(write(tmp_path, [record]))
    assert alpaca[0][0]["content"] == "Summarise.\n\nText."


def test_every_preference_schema_loads_to_the_same_example(tmp_path):
    expected = {"prompt": [{"role": "user", "content": Q}], "chosen": A, "rejected": B}
    user = lambda c: {"role": "user", "content": c}
    asst = lambda c: {"role": "assistant", "content": c}
    schemas = [{"prompt": Q, "chosen": A, "rejected": B},
               {"prompt": [user(Q)], "chosen": A, "rejected": B},
               {"prompt": Q, "chosen": [asst(A)], "rejected": [asst(B)]},
               {"chosen": [user(Q), asst(A)], "rejected": [user(Q), asst(B)]},  # implicit prompt
               {"chosen": f"\n\nHuman: {Q}\n\nAssistant: {A}",
                "rejected": f"\n\nHuman: {Q}\n\nAssistant: {B}"}]
    assert load_prefs(write(tmp_path, schemas)) == [expected] * len(schemas)


def test_multi_turn_hh_becomes_a_messages_prompt_split_at_the_last_assistant(tmp_path):
    history = "\n\nHuman: Hi.\n\nAssistant: Hello!\n\nHuman: " + Q + "\n\nAssistant:"
    user = lambda c: {"role": "user", "content": c}
    asst = lambda c: {"role": "assistant", "content": c}
    ex = load_prefs(write(tmp_path, [{"chosen": history + " " + A,
                                      "rejected": history + " " + B}]))[0]
    assert ex == {"prompt": [user("Hi."), asst("Hello!"), user(Q)], "chosen": A, "rejected": B}
    as_messages = {"prompt": ex["prompt"][:2], "chosen": [user(Q), asst(A)],
                   "rejected": [user(Q), asst(B)]}
    assert load_prefs(write(tmp_path, [as_messages], "m.jsonl"))[0] == ex


def test_prompts_and_verifiable_problems_load_as_messages_ending_with_a_user_turn(tmp_path):
    conversation = [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]
    prompts = load_prompts(write(tmp_path, [{"prompt": Q}, {"messages": conversation}]))
    assert prompts == [[{"role": "user", "content": Q}]] * 2
    record = {"prompt": "Two and three?", "answer": " five ", "response": "Five."}
    problems = load_verifiable(write(tmp_path, [record]))
    question = [{"role": "user", "content": "Two and three?"}]
    assert problems == [{"prompt": question, "answer": "five"}]


BAD = {
    "malformed JSON": ('{"prompt": "x", "response": ', load_sft, "malformed JSON"),
    "missing field": ({"prompt": Q}, load_sft, "'response'"),
    "wrong type": ({"prompt": Q, "response": 3}, load_sft, "string"),
    "empty content": ({"prompt": Q, "response": "  "}, load_sft, "non-empty"),
    "unknown role": ({"messages": [{"role": "robot", "content": Q},
                                   {"role": "assistant", "content": A}]}, load_sft, "'robot'"),
    "no assistant turn": ({"messages": [{"role": "user", "content": Q}]}, load_sft, "assistant"),
    "chosen == rejected": ({"prompt": Q, "chosen": A, "rejected": A}, load_prefs, "differ"),
    "prefs missing rejected": ({"prompt": Q, "chosen": A}, load_prefs, "'rejected'"),
    "prompt ends with assistant": ({"prompt": [{"role": "assistant", "content": A}]}, load_prompts,
                                   "user turn"),
    "verifiable without answer": ({"prompt": Q}, load_verifiable, "'answer'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_record_raises_dataerror_naming_file_and_line(tmp_path, case):
    record, loader, what = BAD[case]
    good = {load_sft: {"prompt": Q, "response": A},
            load_prefs: {"prompt": Q, "chosen": A, "rejected": B},
            load_prompts: {"prompt": Q}, load_verifiable: {"prompt": Q, "answer": "five"}}[loader]
    # a blank line 2 is skipped; the bad record is on line 3
    path = write(tmp_path, [good, "", record])
    with pytest.raises(DataError) as e:
        loader(path)
    assert f"{path}:3:" in str(e.value) and what in str(e.value)


def test_empty_file_raises_dataerror_naming_the_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    for reader in (read_jsonl, load_sft, load_prefs):
        with pytest.raises(DataError, match=f"{path}:1: .*empty file"):
            reader(str(path))


def test_skip_bad_skips_counts_and_warns_with_locations(tmp_path):
    path = write(tmp_path, [{"prompt": Q, "response": A}, "{oops", {"prompt": Q},
                            {"prompt": Q, "response": B}])
    with pytest.warns(UserWarning, match=r"skipped 2 bad record\(s\) of 4.*:2:.*:3:"):
        examples = load_sft(path, skip_bad=True)
    assert [m[-1]["content"] for m in examples] == [A, B]


def test_tokenize_sft_labels_cover_exactly_the_assistant_content_and_end(tok):
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": Q},
            {"role": "assistant", "content": A}]
    ids, labels = tokenize_sft(tok, msgs, 1000)
    assert len(ids) == len(labels)
    trained = [t for t in labels if t != -100]
    # every assistant turn
    assert trained == tok.encode("Hello!") + [tok.end_id] + tok.encode(A) + [tok.end_id]
    for i, (t, lab) in enumerate(zip(ids, labels)):
        assert lab in (-100, t)  # labels are the ids themselves (the shift happens in the loss)


def test_tokenize_sft_drops_the_oldest_prompt_tokens_but_keeps_the_first(tok):
    msgs = [{"role": "user", "content": "x" * 50 + Q}, {"role": "assistant", "content": B}]
    ids, labels = tokenize_sft(tok, msgs, 40)
    full_ids, full_labels = tokenize_sft(tok, msgs, 1000)
    assert len(ids) == 40 and ids[0] == tok.user_id
    # the request at the prompt's end survives
    assert ids[1:] == full_ids[-39:] and labels[1:] == full_labels[-39:]


def test_prompt_without_room_for_a_response_raises_dataerror_naming_file_and_line(tmp_path, tok):
    path = write(tmp_path, [{"prompt": Q, "response": A}])
    example = load_sft(path)[0]
    with pytest.raises(DataError, match=f"{path}:1: prompt leaves no room for a response"):
        tokenize_sft(tok, example, 30)
    ids, labels = tokenize_sft(tok, example, 30, truncate_response=True)
    # the cut response has no <|end|>
    assert len(ids) == 30 and ids[-1] != tok.end_id and labels[-1] != -100


def test_tokenize_pref_truncates_the_prompt_first_then_responses_keeping_a_token(tmp_path, tok):
    ex = load_prefs(write(tmp_path, [{"prompt": "y" * 40 + Q, "chosen": A, "rejected": B}]))[0]
    prompt, chosen, rejected = tokenize_pref(tok, ex, 1000)
    assert prompt[-1] == tok.assistant_id and chosen == tok.encode(A) + [tok.end_id]
    # the prompt shrinks to fit the longer response
    p2, c2, r2 = tokenize_pref(tok, ex, len(chosen) + 10)
    assert (len(p2), c2, r2) == (10, chosen, rejected)
    assert p2[0] == prompt[0] and p2[1:] == prompt[-9:]
    # no room: responses are cut too, each keeps at least one token
    p3, c3, r3 = tokenize_pref(tok, ex, 12)
    assert len(p3) + max(len(c3), len(r3)) <= 12 and len(c3) >= 1 and len(r3) >= 1
    with pytest.raises(DataError, match="no room"):
        tokenize_pref(tok, ex, 12, truncate_response=False)


def test_pad_right_and_left():
    assert pad([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pad([[1, 2, 3], [4]], 9, side="left").tolist() == [[1, 2, 3], [9, 9, 4]]
    assert pad([[1]], 0).dtype == torch.long
    assert pad([[], [5]], 0, side="left").tolist() == [[0], [5]]  # an empty row is all padding
