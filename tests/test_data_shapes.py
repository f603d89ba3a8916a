"""Every common data shape loads to the exact messages it holds, or is named when it cannot: TRL's
prompt-completion and implicit-prompt pairs, ShareGPT, JSON-array files, pretraining text and
{"text"} JSONL, byte-order marks and invalid UTF-8 (FILE:LINE, --skip_bad), truncation counted
aloud, and stages that would train zero steps."""

import json
import re

import pytest
import torch

from nanoalign import common, record, train_dpo, train_grpo, train_pretrain, train_sft
from nanoalign.batching import tokenize_all, tokenize_pref, tokenize_sft
from nanoalign.data import DataError, load_prefs, load_prompts, load_sft, load_verifiable
from nanoalign.files import read_documents, read_jsonl
from nanoalign.model import GPT, GPTConfig
from nanoalign.tokenizer import save_tokenizer
from test_data import tok  # noqa: F401  (a byte-level tokenizer fixture)
from test_data import write as jsonl

Q, A, B = "Tell me a story about a dog.", "Once upon a time, a dog ran. The end.", "A dog."


def at(path, line, rest=""):
    """A pattern for a message that starts with FILE:LINE (the path taken literally)."""
    return "^" + re.escape(f"{path}:{line}:") + (" " + rest if rest else "")


def skipped_one_of_three(path, line):
    """A pattern for skip_bad's warning whose first skipped record is FILE:LINE."""
    return r"skipped 1 bad record\(s\) of 3; first: " + re.escape(f"{path}:{line}:")


def user(c):
    return {"role": "user", "content": c}


def asst(c):
    return {"role": "assistant", "content": c}


def system(c):
    return {"role": "system", "content": c}




def array(tmp_path, items, name="data.json"):
    """A JSON array pretty-printed as released files are (alpaca_data.json: indent 4)."""
    path = tmp_path / name
    path.write_text(json.dumps(items, indent=4))
    return str(path)


# ----------------------------------------------------------------------------------- SFT shapes

def test_trl_prompt_completion_plain_and_conversational_load_as_their_messages(tmp_path):
    records = [{"prompt": Q, "completion": A},
               {"prompt": [system("Be kind."), user(Q)], "completion": [asst(A)]},
               {"prompt": [user("Hi."), asst("Hello!"), user(Q)], "completion": [asst(B)]}]
    assert load_sft(jsonl(tmp_path, records)) == [
        [user(Q), asst(A)],
        [system("Be kind."), user(Q), asst(A)],
        [user("Hi."), asst("Hello!"), user(Q), asst(B)]]
    # the prompt-completion record gives its prompt to the RL readers too
    assert load_prompts(jsonl(tmp_path, records[1:2], "p.jsonl")) == [[system("Be kind."), user(Q)]]


def test_sharegpt_conversations_load_with_roles_mapped(tmp_path):
    turns = [{"from": "system", "value": "Be kind."}, {"from": "human", "value": Q},
             {"from": "gpt", "value": A}, {"from": "human", "value": "More?"},
             {"from": "gpt", "value": B}]
    path = jsonl(tmp_path, [{"conversations": turns}])
    expected = [system("Be kind."), user(Q), asst(A), user("More?"), asst(B)]
    assert load_sft(path) == [expected]
    assert load_prompts(path) == [expected[:-1]]  # everything before the final answer


SFT_BAD = {
    "completion holds a user turn": ({"prompt": Q, "completion": [user(A)]}, "assistant messages"),
    "neither response nor completion": ({"prompt": Q}, "'completion'"),
    "sharegpt tool turn": ({"conversations": [{"from": "human", "value": Q},
                                              {"from": "function_call", "value": "{}"}]},
                           "conversations[1]: expected ShareGPT"),
    "sharegpt without an answer": ({"conversations": [{"from": "human", "value": Q}]},
                                   "assistant turn"),
}


@pytest.mark.parametrize("case", list(SFT_BAD))
def test_bad_sft_shapes_name_file_and_line(tmp_path, case):
    record_, what = SFT_BAD[case]
    path = jsonl(tmp_path, [{"prompt": Q, "completion": A}, record_])
    with pytest.raises(DataError) as e:
        load_sft(path)
    assert str(e.value).startswith(f"{path}:2:") and what in str(e.value)


# ------------------------------------------------------------------------------- preference pairs

def test_implicit_prompt_pairs_take_the_longest_shared_prefix_as_the_prompt(tmp_path):
    history = [system("Be kind."), user("Hi."), asst("Hello!"), user(Q)]
    pairs = [{"chosen": history + [asst(A)], "rejected": history + [asst(B)]},
             {"chosen": [user(Q), asst(A)], "rejected": [user(Q), asst(B)]}]
    assert load_prefs(jsonl(tmp_path, pairs)) == [
        {"prompt": history, "chosen": A, "rejected": B},
        {"prompt": [user(Q)], "chosen": A, "rejected": B}]


PAIR_BAD = {
    "no shared prefix": ({"chosen": [user(Q), asst(A)], "rejected": [user("Hi."), asst(B)]},
                         "to share a prompt"),
    "answers alone, no prompt": ({"chosen": [asst(A)], "rejected": [asst(B)]},
                                 "to share a prompt"),
    "conversations fork before the answer": (
        {"chosen": [user(Q), asst(A), user("And?"), asst(A)],
         "rejected": [user(Q), asst(B), user("And?"), asst(B)]}, "one assistant message"),
    "one side is longer": ({"chosen": [user(Q), asst(A)],
                            "rejected": [user(Q), asst(A), user("And?"), asst(B)]},
                           "one assistant message"),
    "the same conversation twice": ({"chosen": [user(Q), asst(A)], "rejected": [user(Q), asst(A)]},
                                    "to differ"),
}


@pytest.mark.parametrize("case", list(PAIR_BAD))
def test_bad_implicit_prompt_pairs_name_file_and_line(tmp_path, case):
    record_, what = PAIR_BAD[case]
    path = jsonl(tmp_path, [{"prompt": Q, "chosen": A, "rejected": B}, "", record_])
    with pytest.raises(DataError) as e:
        load_prefs(path)
    assert str(e.value).startswith(f"{path}:3:") and what in str(e.value)


# ----------------------------------------------------------------------------------- JSON arrays

def test_json_array_files_load_in_every_reader(tmp_path):
    alpaca = [{"instruction": "Summarise.", "input": "Some text.", "output": "Short."},
              {"instruction": Q, "input": "", "output": A}]
    assert load_sft(array(tmp_path, alpaca)) == [[user("Summarise.\n\nSome text."), asst("Short.")],
                                                 [user(Q), asst(A)]]
    sharegpt = [{"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}]}]
    assert load_sft(array(tmp_path, sharegpt, "sg.json")) == [[user(Q), asst(A)]]
    pairs = [{"chosen": [user(Q), asst(A)], "rejected": [user(Q), asst(B)]}]
    assert load_prefs(array(tmp_path, pairs, "p.json")) == [
        {"prompt": [user(Q)], "chosen": A, "rejected": B}]
    assert load_prompts(array(tmp_path, [{"prompt": Q}], "q.json")) == [[user(Q)]]
    problems = load_verifiable(array(tmp_path, [{"prompt": Q, "answer": "five"}], "v.json"))
    assert problems == [{"prompt": [user(Q)], "answer": "five"}]
    # leading blank lines do not hide the "[", and each record still knows where it starts
    path = tmp_path / "blank.json"
    path.write_text("\n\n  " + json.dumps(alpaca, indent=2))
    assert [ex.where for ex in load_sft(str(path))] == [f"{path}:4", f"{path}:9"]


def test_a_bad_item_in_a_json_array_names_the_line_it_starts_on(tmp_path):
    items = [{"prompt": Q, "response": A}, {"prompt": Q, "response": B}, {"prompt": Q}]
    path = array(tmp_path, items)  # indent 4: each item takes 4 lines after the "["
    with pytest.raises(DataError, match=at(path, 10, r"expected a field 'response'")):
        load_sft(path)
    with pytest.warns(UserWarning, match=skipped_one_of_three(path, 10)):
        assert load_sft(path, skip_bad=True) == [[user(Q), asst(A)], [user(Q), asst(B)]]
    not_objects = tmp_path / "numbers.json"
    not_objects.write_text('[\n  {"prompt": "x", "response": "y"},\n  7\n]')
    with pytest.raises(DataError, match=at(not_objects, 3, r"expected a JSON object, found int")):
        load_sft(str(not_objects))


def test_malformed_json_array_names_the_line_and_stops_even_with_skip_bad(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"prompt": "x", "response": "y"},\n  {"prompt": "x" "response": "y"}\n]')
    for skip_bad in (False, True):
        with pytest.raises(DataError, match=at(path, 3, r"expected a JSON array .*malformed JSON")):
            load_sft(str(path), skip_bad=skip_bad)


# ----------------------------------------------------------------------------------- encodings

def test_a_byte_order_mark_is_accepted_in_jsonl_arrays_and_text(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + json.dumps({"prompt": Q, "response": A}).encode())
    (tmp_path / "b.json").write_bytes(bom + json.dumps([{"prompt": Q, "response": A}]).encode())
    (tmp_path / "c.txt").write_bytes(bom + b"First doc.\n\nSecond doc.")
    for name in ("a.jsonl", "b.json"):
        assert load_sft(str(tmp_path / name)) == [[user(Q), asst(A)]]
    assert read_documents(str(tmp_path / "c.txt")) == ["First doc.", "Second doc."]


def test_windows_line_ends_are_read_as_open_reads_them(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"prompt": "x", "response": "y"}\r\n\r\n{"prompt": "x"}\r\n')
    with pytest.raises(DataError, match=at(path, 3)):
        load_sft(str(path))
    text = tmp_path / "crlf.txt"
    text.write_bytes(b"One.\r\nStill one.\r\n\r\nTwo.")
    assert read_documents(str(text)) == ["One.\nStill one.", "Two."]


def test_invalid_utf8_names_file_and_line_and_obeys_skip_bad(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": Q, "response": A}).encode()
    path.write_bytes(good + b"\n" + '{"prompt": "caf\xe9", "response": "x"}'.encode("latin-1")
                     + b"\n" + good + b"\n")
    where = at(path, 2, "expected UTF-8 text, found the byte 0xe9 at column 16")
    with pytest.raises(DataError, match=where):
        load_sft(str(path))
    with pytest.warns(UserWarning, match=skipped_one_of_three(path, 2)):
        assert load_sft(str(path), skip_bad=True) == [[user(Q), asst(A)]] * 2
    in_array = tmp_path / "latin1.json"
    in_array.write_bytes(b'[\n  {"prompt": "x",\n   "response": "caf\xe9"}\n]')
    with pytest.raises(DataError, match=at(in_array, 3, r"expected UTF-8")):
        load_sft(str(in_array), skip_bad=True)  # inside an array nothing can be skipped


def test_invalid_utf8_in_pretraining_text_names_file_and_line(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(b"First doc.\n\nSecond \xff doc.\nmore")
    with pytest.raises(DataError, match=at(path, 3, r"expected UTF-8 text, found the byte 0xff")):
        read_documents(str(path))


# ----------------------------------------------------------------------------------- pretraining

def test_pretraining_reads_text_jsonl_and_json_arrays_as_the_same_documents(tmp_path, tok):
    docs = ["Once upon a time.\nThe end.", "Cats like milk.", "Two and three make five."]
    # a blank "document" at the end is dropped
    (tmp_path / "p.txt").write_text("\n\n".join(docs) + "\n\n \n\n")
    paths = [str(tmp_path / "p.txt"), jsonl(tmp_path, [{"text": d} for d in docs], "p.jsonl"),
             array(tmp_path, [{"text": d} for d in docs] + [{"text": ""}], "p.json")]
    for path in paths:
        assert read_documents(path) == docs
    tokens = [train_pretrain.tokenize_file(p, tok).tolist() for p in paths]
    expected = sum((tok.encode(d) + [tok.eot_id] for d in docs), [])
    assert tokens == [expected] * 3
    with pytest.raises(DataError, match=r"p2.jsonl:2: expected a field 'text'"):
        read_documents(jsonl(tmp_path, [{"text": "x"}, {"content": "y"}], "p2.jsonl"))


def test_the_tokenizer_trains_on_the_documents_not_on_the_json(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(train_pretrain, "train_bpe", lambda text, n: seen.append(text) or {})
    monkeypatch.setattr(train_pretrain, "save_tokenizer", lambda ranks, path: None)
    monkeypatch.setattr(train_pretrain, "load_tokenizer", lambda path: None)
    path = jsonl(tmp_path, [{"text": "Cats like milk."}, {"text": "Dogs run."}], "p.jsonl")
    cfg = train_pretrain.PretrainConfig(data=path, tokenizer=str(tmp_path / "new.tiktoken"))
    train_pretrain.get_tokenizer(cfg)
    assert seen == ["Cats like milk.\n\nDogs run."]


# ----------------------------------------------------------------------------------- truncation

def test_truncation_is_counted_and_reported_once_with_the_longest_example(tmp_path, tok):
    huge = "y" * 200_000
    path = jsonl(tmp_path, [{"prompt": Q, "chosen": A, "rejected": B},
                            {"prompt": huge, "chosen": A, "rejected": B},
                            {"prompt": Q, "chosen": huge + huge, "rejected": B}])
    with pytest.warns(UserWarning) as warned:
        pairs = tokenize_all(tokenize_pref, tok, load_prefs(path), 96)
    assert len(warned) == 1
    message = str(warned[0].message)
    assert message.startswith("2 of 3 examples were longer than max_len 96 tokens and were "
                              "truncated: 1 lost their oldest prompt tokens, 1 their responses' "
                              "ends; the longest")
    assert message.endswith(f"is at {path}:3")
    assert all(len(p) + max(len(c), len(r)) <= 96 for p, c, r in pairs)
    # the arithmetic is tokenize_pref's own
    assert pairs == [tokenize_pref(tok, ex, 96) for ex in load_prefs(path)]


def test_sft_truncation_is_reported_and_a_response_without_room_still_raises(tmp_path, tok):
    path = jsonl(tmp_path, [{"prompt": "x" * 500 + Q, "response": B},
                            {"prompt": Q, "response": A}])
    with pytest.warns(UserWarning, match=r"^1 of 2 examples .* max_len 96 .*: 1 lost their oldest "
                                         r"prompt tokens, 0 their responses' ends"):
        examples = tokenize_all(tokenize_sft, tok, load_sft(path), 96)
    assert examples == [tokenize_sft(tok, ex, 96) for ex in load_sft(path)]
    assert len(examples[0][0]) == 96
    long_answer = jsonl(tmp_path, [{"prompt": Q, "response": "z" * 200_000}], "long.jsonl")
    with pytest.raises(DataError, match=at(long_answer, 1, r"prompt leaves no room")):
        tokenize_all(tokenize_sft, tok, load_sft(long_answer), 96)


def test_files_that_fit_say_nothing(tmp_path, tok, recwarn):
    tokenize_all(tokenize_sft, tok, load_sft(jsonl(tmp_path, [{"prompt": Q, "response": A}])), 500)
    assert not recwarn.list


# ----------------------------------------------------------------------------------- zero steps

@pytest.fixture()
def sft_checkpoint(tmp_path, tok):
    """A tiny random policy saved as an SFT checkpoint with the byte tokenizer."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16))
    path = str(tmp_path / "sft" / "ckpt.pt")
    record.save_stage(path, common.Dist(), "sft", model, common.make_optimizer(model, 1e-3, 0.0),
                      0, train_sft.SFTConfig(), tok, None)
    return path


def test_dpo_on_fewer_pairs_than_a_batch_trains_one_step_and_says_so(tmp_path, sft_checkpoint,
                                                                      capsys):
    pairs = [{"prompt": f"{Q} {i}", "chosen": A, "rejected": B} for i in range(4)]
    pairs.append({"prompt": "w" * 300, "chosen": A, "rejected": B})  # truncated: reported
    out = tmp_path / "dpo"
    with pytest.warns(UserWarning, match="1 of 5 examples were longer than max_len 128"):
        train_dpo.main(["--init", sft_checkpoint, "--data", jsonl(tmp_path, pairs),
                        "--val_data", "", "--batch_size", "8", "--out_dir", str(out),
                        "--device", "cpu"])
    assert "DPO on 5 pairs | 1 offline steps of 8" in capsys.readouterr().out
    assert [row["step"] for row in record.read_metrics(out / "metrics.jsonl")] == [1]
    ckpt = record.load_checkpoint(str(out / "ckpt.pt"), stages=["dpo"])
    parent = record.load_checkpoint(sft_checkpoint, stages=["sft"])
    assert ckpt["step"] == 1
    assert any(not torch.equal(ckpt["model"][k], parent["model"][k]) for k in parent["model"])


@pytest.mark.parametrize("stage, argv, what", [
    (train_dpo, ["--epochs", "0", "--online_rounds", "0"], "--epochs: 0 epochs and 0 online"),
    (train_grpo, ["--iterations", "0"], "--iterations:"),
    (train_grpo, ["--minibatches", "0"], "--prompts_per_iter: must be > 0, a multiple"),
    (train_grpo, ["--prompts_per_iter", "0"], "--prompts_per_iter: must be > 0, a multiple"),
])
def test_configs_that_would_train_zero_steps_stop_before_any_work(stage, argv, what, capsys):
    with pytest.raises(SystemExit):
        stage.main(argv)
    assert what in capsys.readouterr().err


def test_ppo_batch_of_zero_rollouts_stops_before_any_work(capsys):
    from nanoalign import train_ppo
    for argv in (["--batch_size", "0"], ["--minibatches", "0"]):
        with pytest.raises(SystemExit):
            train_ppo.main(argv)
        assert "--batch_size: must be > 0, a multiple of minibatches" in capsys.readouterr().err


def test_pretraining_text_shorter_than_one_window_stops_with_the_count(tmp_path, tok):
    (tmp_path / "tiny.txt").write_text("Cats like milk.\n\nDogs run.")
    save_tokenizer({bytes([i]): i for i in range(256)}, str(tmp_path / "bytes.tiktoken"))
    text = str(tmp_path / "tiny.txt")
    # 15 + 9 bytes and one <|endoftext|> after each document
    with pytest.raises(ValueError, match=r"--data: 26 tokens: a window needs block_size \+ 1 = 65"):
        train_pretrain.main(["--data", text, "--val_data", text, "--val_nll", "",
                             "--tokenizer", str(tmp_path / "bytes.tiktoken"), "--block_size", "64",
                             "--out_dir", str(tmp_path / "pt"), "--device", "cpu"])


# ----------------------------------------------------------------------------------- the world

def test_the_worlds_own_files_read_exactly_as_their_records_say(tmp_path):
    """The built-in pipeline's figures rest on these: one user turn and one answer per record, the
    pretraining documents exactly the ones the generator joined."""
    from nanoalign import world
    files = world.build(seed=0, scale=0.02)
    world.write(str(tmp_path), files)
    sft = [json.loads(line) for line in (tmp_path / "sft_train.jsonl").read_text().splitlines()]
    assert load_sft(str(tmp_path / "sft_train.jsonl")) == [
        [user(r["prompt"]), asst(r["response"])] for r in sft]
    prefs = [json.loads(line) for line in (tmp_path / "prefs_train.jsonl").read_text().splitlines()]
    assert load_prefs(str(tmp_path / "prefs_train.jsonl")) == [
        {"prompt": [user(r["prompt"])], "chosen": r["chosen"], "rejected": r["rejected"],
         "gold_chosen": r["gold_chosen"], "gold_rejected": r["gold_rejected"]} for r in prefs]
    assert read_documents(str(tmp_path / "pretrain.txt")) == files["pretrain.txt"]
