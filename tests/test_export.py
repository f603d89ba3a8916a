"""python -m nanoalign.export: a checkpoint as a Hugging Face GPT-2 directory. It reads back through
our own importers (model.load_gpt2, tokenizer.load_tokenizer) to identical logits and tokens; where
transformers is installed, it loads there to the same logits, ids and chat template."""

import importlib.util
import json
import random

import pytest
import torch

from nanoalign import common, record
from nanoalign.export import CHAT_TEMPLATE, ExportError, export, main, merge_parts
from nanoalign.hf_format import bytes_to_unicode, read_safetensors
from nanoalign.model import GPT, GPTConfig, gpt2_from_state_dict, load_gpt2
from nanoalign.rl import score_last_token
from nanoalign.tokenizer import (GPT2_SPLIT_PATTERN, SPECIAL_TOKENS, load_tokenizer, render_chat,
                                 save_tokenizer, train_bpe)

TEXT = ("The dragon guards the gold. The knight asks the dragon for the gold; it says no.\n"
        "Once upon a time, 3 cats and 12 dogs lived by the river in 2024; they're friends.\n\n"
        "Naïve café owners sell crème brûlée for 4.50 euros — très bon! 東京の猫は魚が好き。\n") * 25
TEXTS = ["", "a", "Hello, world!", " leading space", "digits 1234567 and 3.14159 and 12 345",
         "  \t\n\n   spaces   \r\n  end ", "emoji 🐉🔥👩‍👩‍👧 done", "東京 и Москва, café",
         "combining e\u0301 a\u0308", "they'll we've I'M it's", "<|end|> <|user|> typed specials",
         "nbsp\u00a0ideographic\u3000space, tab\tvertical\x0bform\x0c", TEXT[:600]]
SYSTEM = {"role": "system", "content": "Be brief.\nVery."}
USER = {"role": "user", "content": "Tell me a story about 12 dragons."}
BOT = {"role": "assistant", "content": " Once upon a time…  there were 12.\n"}
CHATS = [([USER], False), ([USER], True), ([SYSTEM, USER, BOT], False), ([SYSTEM, USER], True),
         ([USER, BOT, {"role": "user", "content": "Again?"}, BOT], False),
         ([SYSTEM, USER, BOT, USER], True)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.tiktoken"
    save_tokenizer(train_bpe(TEXT, 320), str(path))
    return load_tokenizer(str(path))


def save_ckpt(path, tok, stage="sft", gelu="none", bias=True, head=False, seed=0, **extra):
    """A tiny model with every parameter random (biases and LayerNorms too: a zero one would hide
    a misplaced tensor; std 0.5 makes the two GELUs' logits differ by ~1e-3), saved as a stage
    saves it."""
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=64, vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32,
                    bias=bias, gelu=gelu)
    model = GPT(cfg).add_scalar_head() if head else GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    record.save_stage(str(path), common.Dist(), stage, model, optimizer, 0, cfg, tok, None,
                      **extra)
    return model.eval()


def token_batch(tok, seed=0):
    """Two rows of text tokens and every special token, at every position of a 40-token window."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, tok.n_vocab, (2, 40), generator=g)
    x[0, :5] = torch.tensor([tok.eot_id, tok.pad_id, tok.user_id, tok.assistant_id, tok.end_id])
    return x


@torch.no_grad()
@pytest.mark.parametrize("gelu,bias", [("none", True), ("tanh", True), ("none", False),
                                       ("tanh", False)])
def test_our_importers_read_the_export_back_to_identical_logits(tok, tmp_path, gelu, bias):
    src = save_ckpt(tmp_path / "ckpt.pt", tok, gelu=gelu, bias=bias)
    assert export(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf")) == "GPT2LMHeadModel"
    back = load_gpt2(str(tmp_path / "hf")).eval()
    assert back.config.gelu == gelu and back.config.block_size == 64
    x = token_batch(tok)
    assert torch.allclose(back(x), src(x), rtol=0, atol=1e-6)
    # negative control: with the other GELU the logits differ, so the test above can see it
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    other = {"gelu": "gelu_new", "gelu_new": "gelu"}[config["activation_function"]]
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config,
                                                             "activation_function": other}))
    assert not torch.allclose(load_gpt2(str(tmp_path / "hf")).eval()(x), src(x), atol=1e-4)


@torch.no_grad()
def test_conv1d_weights_are_stored_in_out_and_a_missed_transpose_shows(tok, tmp_path):
    src = save_ckpt(tmp_path / "ckpt.pt", tok, bias=False)
    export(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    sd = read_safetensors(str(tmp_path / "hf" / "model.safetensors"))
    assert sd["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)  # (in, out)
    assert torch.equal(sd["transformer.h.1.attn.c_proj.weight"],
                       src.transformer.h[1].attn.c_proj.weight.t())
    # bias-free: zero biases, and the tied lm_head is not written twice
    assert not sd["transformer.h.0.attn.c_attn.bias"].any() and "lm_head.weight" not in sd
    assert not sd["transformer.ln_f.bias"].any() and sd["transformer.ln_f.bias"].shape == (32,)
    # negative control: the square attention projection left untransposed changes the logits
    sd["transformer.h.0.attn.c_proj.weight"] = sd["transformer.h.0.attn.c_proj.weight"].t()
    wrong = gpt2_from_state_dict(sd, n_head=2, gelu="none").eval()
    assert not torch.allclose(wrong(token_batch(tok)), src(token_batch(tok)), atol=1e-4)


@torch.no_grad()
def test_tokenizer_reads_back_to_the_same_ranks_pattern_and_ids(tok, tmp_path):
    src = save_ckpt(tmp_path / "ckpt.pt", tok)
    export(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    back = load_tokenizer(str(tmp_path / "hf"))
    assert back.enc._mergeable_ranks == tok.enc._mergeable_ranks
    assert back.enc._pat_str == tok.enc._pat_str != GPT2_SPLIT_PATTERN
    assert [back.eot_id, back.pad_id, back.user_id, back.assistant_id, back.end_id] == \
        [tok.eot_id, tok.pad_id, tok.user_id, tok.assistant_id, tok.end_id]
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text) and back.decode(back.encode(text)) == text
    # a stage's --init takes the directory as a checkpoint (record.gpt2_checkpoint)
    ckpt = record.load_checkpoint(str(tmp_path / "hf"))
    assert record.checkpoint_tokenizer(ckpt).enc._mergeable_ranks == tok.enc._mergeable_ranks
    x = token_batch(tok)
    assert torch.allclose(GPT.from_checkpoint(ckpt).eval()(x), src(x), rtol=0, atol=1e-6)
    # our trained byte tokens take id = byte value; merges.txt lists merges in id order
    vocab = json.loads((tmp_path / "hf" / "vocab.json").read_text(encoding="utf-8"))
    assert all(vocab[c] == b for b, c in bytes_to_unicode().items())
    merges = (tmp_path / "hf" / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert [vocab["".join(m.split())] for m in merges] == list(range(256, 320))
    # negative control: without tokenizer.json the importer falls back to GPT-2's split pattern,
    # which chunks the text differently: the pattern really is read from tokenizer.json
    (tmp_path / "hf" / "tokenizer.json").unlink()
    gpt2_split = load_tokenizer(str(tmp_path / "hf"))
    assert gpt2_split.enc._pat_str == GPT2_SPLIT_PATTERN
    assert gpt2_split.encode(TEXT) != tok.encode(TEXT)


def test_merge_parts_are_two_lower_ranked_tokens_that_spell_the_token(tok):
    ranks = tok.enc._mergeable_ranks
    for token, rank in ranks.items():
        if len(token) > 1:
            a, b = merge_parts(ranks, token)
            assert a + b == token and ranks[a] < rank and ranks[b] < rank


def test_gpt2_layout_tokenizer_exports_with_its_own_byte_order_and_pattern(tmp_path):
    from test_tokenizer import write_gpt2_files
    write_gpt2_files(tmp_path / "gpt2")
    tok = load_tokenizer(str(tmp_path / "gpt2"))
    save_ckpt(tmp_path / "ckpt.pt", tok)
    export(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    back = load_tokenizer(str(tmp_path / "hf"))
    assert back.enc._pat_str == GPT2_SPLIT_PATTERN and back.name.startswith("gpt2-")
    assert back.enc._mergeable_ranks == tok.enc._mergeable_ranks
    assert back.encode("hello world 123") == tok.encode("hello world 123")


@torch.no_grad()
def test_reward_model_exports_as_sequence_classifier_with_the_offset_folded(tok, tmp_path):
    src = save_ckpt(tmp_path / "rm.pt", tok, stage="rm", head=True, bias=False,
                    reward_offset=0.7)
    torch.nn.init.constant_(src.scalar_head.bias, -0.3)  # head bias and offset both folded
    ckpt = torch.load(tmp_path / "rm.pt", weights_only=True)
    ckpt["model"]["scalar_head.bias"] = src.scalar_head.bias.detach().clone()
    torch.save(ckpt, tmp_path / "rm.pt")
    assert export(str(tmp_path / "rm.pt"), str(tmp_path / "hf")) == \
        "GPT2ForSequenceClassification"
    sd = read_safetensors(str(tmp_path / "hf" / "model.safetensors"))
    score = sd.pop("score.weight")
    assert score.shape == (1, 32)
    # HF's model: our trunk with the exported weights, a bias-free head on the last real token
    hf = gpt2_from_state_dict(sd, n_head=2, gelu="none").add_scalar_head().eval()
    hf.scalar_head.weight.copy_(score)
    hf.scalar_head.bias.zero_()
    x = token_batch(tok)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 30:] = False  # a right-padded row
    want = score_last_token(src, x, mask, offset=0.7)
    assert torch.allclose(score_last_token(hf, x, mask), want, rtol=0, atol=1e-5)
    # negative control: without the fold the scores are off by bias - offset = -1.0
    hf.transformer.ln_f.bias.zero_()
    assert torch.allclose(score_last_token(hf, x, mask), want + 1.0, atol=1e-5)
    # --lm_only: the RM's language model, its final LayerNorm untouched
    export(str(tmp_path / "rm.pt"), str(tmp_path / "lm"), lm_only=True)
    assert torch.allclose(load_gpt2(str(tmp_path / "lm")).eval()(x), src(x), atol=1e-6)


def test_a_reward_head_with_zero_weight_cannot_be_folded_and_says_what_to_do(tok, tmp_path):
    src = save_ckpt(tmp_path / "rm.pt", tok, stage="rm", head=True, reward_offset=0.5)
    ckpt = torch.load(tmp_path / "rm.pt", weights_only=True)
    ckpt["model"]["scalar_head.weight"].zero_()
    torch.save(ckpt, tmp_path / "rm.pt")
    with pytest.raises(ExportError, match="--lm_only"):
        export(str(tmp_path / "rm.pt"), str(tmp_path / "hf"))
    assert src.scalar_head is not None


@torch.no_grad()
def test_ppo_checkpoint_exports_its_policy_and_drops_the_value_head_with_a_note(tok, tmp_path,
                                                                                capsys):
    src = save_ckpt(tmp_path / "ppo.pt", tok, stage="ppo", head=True)
    main(["--ckpt", str(tmp_path / "ppo.pt"), "--out", str(tmp_path / "hf")])
    assert "value head" in capsys.readouterr().out
    assert "score.weight" not in read_safetensors(str(tmp_path / "hf" / "model.safetensors"))
    x = token_batch(tok)
    assert torch.allclose(load_gpt2(str(tmp_path / "hf")).eval()(x), src(x), atol=1e-6)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.end_id and generation["pad_token_id"] == tok.pad_id


def test_cli_help():
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def render_jinja(messages, add_generation_prompt):
    import jinja2

    def raise_exception(message):
        raise ValueError(message)
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           raise_exception=raise_exception)


@pytest.mark.skipif(importlib.util.find_spec("jinja2") is None, reason="jinja2 is not installed")
def test_chat_template_renders_exactly_what_render_chat_encodes(tok):
    for messages, prompt in CHATS:
        ids, _ = render_chat(tok, messages, add_generation_prompt=prompt)
        text = render_jinja(messages, prompt)
        assert text == tok.decode(ids)
        assert tok.enc.encode(text, allowed_special="all") == ids
    for bad in ([SYSTEM], [SYSTEM, BOT], [USER, {"role": "robot", "content": "beep"}]):
        with pytest.raises(ValueError):
            render_chat(tok, bad)
        with pytest.raises(ValueError):
            render_jinja(bad, False)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed (it is no dependency of nanoalign)")
@torch.no_grad()
@pytest.mark.parametrize("gelu,bias", [("tanh", True), ("none", False)])
def test_transformers_loads_the_export_with_the_same_logits_ids_and_chat(tok, tmp_path, gelu,
                                                                          bias):
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer)
    src = save_ckpt(tmp_path / "ckpt.pt", tok, gelu=gelu, bias=bias)
    export(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    x = token_batch(tok)
    assert torch.allclose(model(x).logits, src(x), rtol=0, atol=1e-4)
    # negative control: the other GELU name is visible at this tolerance
    other = {"tanh": "gelu", "none": "gelu_new"}[gelu]
    wrong = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), activation_function=other)
    assert not torch.allclose(wrong.eval()(x).logits, src(x), rtol=0, atol=1e-4)
    assert model.generation_config.eos_token_id == tok.end_id
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    rng = random.Random(0)
    texts = TEXTS + ["".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(80))
                     for _ in range(30)]
    for text in texts:
        if "<|" in text:  # HF reads typed special tokens as special (ours never does)
            continue
        assert hf_tok(text)["input_ids"] == tok.encode(text), text
        assert hf_tok.decode(tok.encode(text)) == text
    assert hf_tok.convert_tokens_to_ids(SPECIAL_TOKENS) == \
        [tok.eot_id, tok.pad_id, tok.user_id, tok.assistant_id, tok.end_id]
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.end_id, tok.pad_id)
    for messages, prompt in CHATS:
        ids, _ = render_chat(tok, messages, add_generation_prompt=prompt)
        text = hf_tok.apply_chat_template(messages, tokenize=False,
                                          add_generation_prompt=prompt)
        assert text == tok.decode(ids)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    # the reward model, through AutoModelForSequenceClassification
    rm = save_ckpt(tmp_path / "rm.pt", tok, stage="rm", gelu=gelu, bias=bias, head=True,
                   reward_offset=0.4)
    export(str(tmp_path / "rm.pt"), str(tmp_path / "rm"))
    hf_rm = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    x[x == tok.pad_id] = tok.eot_id
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 30:] = False
    x[~mask] = tok.pad_id  # right padding: HF reads the last token that is not <|pad|>
    want = score_last_token(rm, x, mask, offset=0.4)
    assert torch.allclose(hf_rm(x).logits[:, 0], want, rtol=0, atol=1e-4)
