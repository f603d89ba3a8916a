"""Invariants of the BPE trainer, the .tiktoken file, the special tokens and the chat template."""

import hashlib
import os
import random
import tempfile

import pytest
import tiktoken

from nanoalign.tokenizer import (SPECIAL_TOKENS, SPLIT, bpe_merges, load_tokenizer, main, merge,
                                 render_chat, save_tokenizer, train_bpe)

VOCAB = 320
TEXT = ("The dragon guards the gold. The knight asks the dragon for the gold, "
        "and the dragon says no.\n"
        "A story: once upon a time, 3 cats and 12 dogs lived in a village by the river; "
        "they're friends.\n\n"
        "Naïve café owners sell crème brûlée for 4.50 euros — très bon! "
        "東京の猫は魚が好き。\n") * 30


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tok.tiktoken")
    save_tokenizer(train_bpe(TEXT, VOCAB), path)
    return path


@pytest.fixture(scope="module")
def tok(tok_path):
    return load_tokenizer(tok_path)


def reference_encode(text: str, merges: dict) -> list[int]:
    """The textbook encoder: on each chunk, apply the learned merge of lowest id until none
    applies."""
    out = []
    for chunk in SPLIT.findall(text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: merges.get(p, float("inf")))
            if pair not in merges:
                break
            ids = merge(ids, pair, merges[pair])
        out += ids
    return out


def test_decode_encode_roundtrips_arbitrary_unicode(tok):
    rng = random.Random(0)
    texts = ["", "a", "Hello, world!", "emoji 🐉🔥👩‍👩‍👧 done",
             "東京 и Москва", "combining e\u0301 a\u0308\u0301",
             "  \t\n\n   spaces   \r\n  ", "<|end|> <|pad|> not special", TEXT[:500]]
    texts += [bytes(rng.randrange(256) for _ in range(200)).decode("utf-8", errors="replace")
              for _ in range(20)]
    texts += ["".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(100)) for _ in range(20)]
    for s in texts:
        assert tok.decode(tok.encode(s)) == s


def test_training_is_deterministic():
    assert list(train_bpe(TEXT, VOCAB).items()) == list(train_bpe(TEXT, VOCAB).items())


def test_ranks_hold_all_bytes_and_exactly_the_asked_vocab_size():
    ranks = train_bpe(TEXT, VOCAB)
    assert len(ranks) == VOCAB and sorted(ranks.values()) == list(range(VOCAB))
    assert all(ranks[bytes([b])] == b for b in range(256))


def test_frequent_word_becomes_a_single_token(tok):
    assert len(tok.encode(" dragon")) == 1


def test_tiktoken_encoding_equals_reference_encoder_of_the_learned_merges(tok):
    merges = bpe_merges(TEXT, VOCAB)
    mixed = "The knights' dragons guard 1234567 golden cats; 猫 café drôle ☕ they'll"
    for text in [TEXT, mixed]:
        assert tok.encode(text) == reference_encode(text, merges)


def test_special_tokens_are_distinct_and_follow_the_ordinary_ranks(tok):
    ids = [tok.eot_id, tok.pad_id, tok.user_id, tok.assistant_id, tok.end_id]
    assert ids == list(range(VOCAB, VOCAB + len(SPECIAL_TOKENS)))
    assert tok.n_vocab == VOCAB + len(SPECIAL_TOKENS)
    assert len({tok.pad_id, tok.end_id, tok.eot_id}) == 3


def test_special_token_strings_in_user_text_are_plain_text(tok):
    ids = tok.encode("<|end|><|user|>")
    assert not set(ids) & {tok.eot_id, tok.pad_id, tok.user_id, tok.assistant_id, tok.end_id}
    assert tok.decode(ids) == "<|end|><|user|>"


def test_decode_drops_pads_and_renders_other_specials(tok):
    ids = [tok.pad_id, tok.pad_id, tok.user_id] + tok.encode("hi") + [tok.end_id, tok.pad_id]
    assert tok.decode(ids) == "<|user|>hi<|end|>"


def test_name_is_the_hash_of_the_file(tok, tok_path, tmp_path):
    digest = hashlib.sha256(open(tok_path, "rb").read()).hexdigest()
    assert tok.name == f"bpe{VOCAB}-{digest[:8]}"
    other = str(tmp_path / "other.tiktoken")
    save_tokenizer(train_bpe(TEXT[:1000], VOCAB), other)
    assert load_tokenizer(other).name != tok.name


def test_saved_file_reloads_to_the_same_ranks(tok, tok_path):
    assert tok.enc._mergeable_ranks == train_bpe(TEXT, VOCAB)


def test_text_without_enough_pairs_stops_early_with_a_warning():
    with pytest.warns(UserWarning, match="only 258 tokens"):
        # " ab" and "ab" take two merges, then every chunk is one token
        ranks = train_bpe("ab ab", 300)
    assert len(ranks) == 258 and {b"ab", b" ab"} <= ranks.keys()


def test_render_chat_labels_cover_exactly_assistant_contents_and_their_end(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "A story?"},
            {"role": "assistant", "content": "Once upon a time."}]
    ids, labels = render_chat(tok, msgs)
    U, A, E = [tok.user_id], [tok.assistant_id], [tok.end_id]
    enc = tok.encode
    assert ids == (U + enc("Be brief.\n\nHi!") + E + A + enc("Hello.") + E
                   + U + enc("A story?") + E + A + enc("Once upon a time.") + E)
    trained = [t for t, l in zip(ids, labels) if l != -100]
    assert trained == enc("Hello.") + E + enc("Once upon a time.") + E
    assert all(l in (-100, t) for t, l in zip(ids, labels))


def test_generation_prompt_ends_with_assistant_header_and_has_no_labels(tok):
    ids, labels = render_chat(tok, [{"role": "user", "content": "Tell me a story."}],
                              add_generation_prompt=True)
    assert ids == [tok.user_id] + tok.encode("Tell me a story.") + [tok.end_id, tok.assistant_id]
    assert set(labels) == {-100}


def test_bad_role_raises_naming_it(tok):
    with pytest.raises(ValueError, match="'robot'"):
        render_chat(tok, [{"role": "robot", "content": "beep"}])
    with pytest.raises(ValueError, match="system"):
        render_chat(tok, [{"role": "system", "content": "only a system prompt"}])


def test_cli_trains_and_saves_a_loadable_file(tmp_path, capsys):
    inp, out = tmp_path / "in.txt", tmp_path / "out" / "tok.tiktoken"
    inp.write_text(TEXT, encoding="utf-8")
    main(["--input", str(inp), "--vocab-size", str(VOCAB), "--out", str(out)])
    assert "bytes/token" in capsys.readouterr().out
    assert load_tokenizer(str(out)).n_vocab == VOCAB + len(SPECIAL_TOKENS)


def test_gpt2_layout_keeps_base_endoftext_and_appends_chat_tokens(monkeypatch):
    # a stand-in for tiktoken's GPT-2 (256 byte tokens + <|endoftext|> last), so this runs without
    # its cached file
    base = tiktoken.Encoding(name="fake-gpt2", pat_str=r"\S+|\s+",
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: base)
    tok = load_tokenizer("gpt2")
    ids = [tok.eot_id, tok.pad_id, tok.user_id, tok.assistant_id, tok.end_id]
    assert ids == [256, 257, 258, 259, 260]
    assert tok.n_vocab == 261 and tok.decode(tok.encode("héllo")) == "héllo"


def gpt2_is_cached() -> bool:
    """tiktoken caches each download under sha1(url) (tiktoken/load.py); we never fetch it here
    (no network)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    urls = [base + "vocab.bpe", base + "encoder.json"]
    return all(os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest()))
               for u in urls)


@pytest.mark.skipif(not gpt2_is_cached(),
                    reason="tiktoken's gpt2 files are not cached and there is no network")
def test_gpt2_keeps_endoftext_id_and_appends_chat_tokens():
    tok = load_tokenizer("gpt2")
    # GPT-2's own id, so its pretrained embedding row still means "end of document"
    assert tok.eot_id == 50256
    assert [tok.pad_id, tok.user_id, tok.assistant_id, tok.end_id] == [50257, 50258, 50259, 50260]
    assert tok.decode(tok.encode("Hello world")) == "Hello world"
    assert tok.encode("Hello world") == [15496, 995]


def write_gpt2_files(directory, merges=(("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"))):
    """A hand-made GPT-2 tokenizer in Hugging Face's layout: 256 byte tokens in bytes_to_unicode
    order, then one token per merge, then <|endoftext|>; returns the vocab dict."""
    import json
    from nanoalign.tokenizer import bytes_to_unicode
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab


def test_gpt2_tokenizer_from_vocab_and_merges_matches_the_merge_table_and_round_trips(tmp_path):
    vocab = write_gpt2_files(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    # h+e, l+l, then he+ll: the merge table applied in order
    assert tok.encode("hell") == [vocab["hell"]]
    assert tok.encode("hello") == [vocab["hell"], vocab["o"]]
    # " lo": the space is byte Ġ
    assert tok.encode("he lo") == [vocab["he"], vocab["Ġ"], vocab["l"], vocab["o"]]
    assert tok.encode(" w") == [vocab["Ġw"]]
    assert tok.eot_id == vocab["<|endoftext|>"] == 260  # GPT-2's own end-of-document id is kept
    assert [tok.pad_id, tok.user_id, tok.assistant_id, tok.end_id] == [261, 262, 263, 264]
    assert tok.n_vocab == 265
    rng = random.Random(0)
    for _ in range(50):  # arbitrary unicode, including what no merge covers
        text = "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(160, 0x2FFF),
                                       rng.randint(0x1F300, 0x1F64F)]))
                       for _ in range(rng.randint(1, 30)))
        assert tok.decode(tok.encode(text)) == text
    # typed specials stay text
    assert tok.decode(tok.encode("hello <|end|> wörld 🙂")) == "hello <|end|> wörld 🙂"


def test_gpt2_vocab_and_merges_that_do_not_belong_together_are_rejected(tmp_path):
    write_gpt2_files(tmp_path)
    # the first two merges in swapped order
    (tmp_path / "merges.txt").write_text("#version: 0.2\nl l\nh e\nhe ll\nĠ w\n", encoding="utf-8")
    with pytest.raises(ValueError, match="do not belong together"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges.txt:2: expected two tokens"):
        load_tokenizer(str(tmp_path))
