"""
Export a checkpoint as a Hugging Face GPT-2 directory, which `transformers` loads with no custom
code:

    python -m nanoalign.export --ckpt out/tiny/sft/ckpt.pt --out hf/tiny-sft

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("hf/tiny-sft")
    tok = AutoTokenizer.from_pretrained("hf/tiny-sft")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")

The directory holds
    model.safetensors        the weights under HF GPT-2's names (which are ours)
    config.json              GPT2LMHeadModel (a reward model: GPT2ForSequenceClassification)
    generation_config.json   <|end|> ends generation (the end of a turn), <|pad|> pads
    tokenizer.json           the fast tokenizer: our split regex, then byte-level BPE
    vocab.json, merges.txt   the same BPE in GPT-2's layout (what nanoalign's importers read)
    tokenizer_config.json    the special tokens and the chat template (render_chat's, in Jinja)
    special_tokens_map.json

Scalar heads. A reward model becomes GPT2ForSequenceClassification: its reward w.h + b - offset
(the head's bias b, the offset train_rm stores) must go through HF's bias-free `score` Linear,
so b - offset is folded into the final LayerNorm's bias (fold_reward; exact in real arithmetic).
--lm_only exports its language model instead. PPO's value head is dropped, with a note: users
want the policy. Reading it back: model.load_gpt2(DIR), tokenizer.load_tokenizer(DIR).
"""

import argparse
import json
import os
import sys

import torch
import torch.nn as nn

from nanoalign.hf_format import bytes_to_unicode, write_safetensors
from nanoalign.model import GPT
from nanoalign.record import checkpoint_tokenizer, load_checkpoint
from nanoalign.tokenizer import Tokenizer, load_tokenizer

# HF's GPT-2 uses Conv1D layers, which store a weight as (in, out); nn.Linear stores (out, in)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# render_chat (tokenizer.py) in Jinja: the system message is folded into the first user turn,
# every turn ends with <|end|>, nothing between turns. raise_exception is transformers' own.
CHAT_TEMPLATE = """\
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- if messages|length < 2 or messages[1]['role'] != 'user' -%}
        {{- raise_exception('a system message must be followed by a user message') -}}
    {%- endif -%}
    {%- set system = messages[0]['content'] + '\\n\\n' -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system = '' -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
    {%- if message['role'] == 'user' -%}
        {{- '<|user|>' + (system if loop.first else '') + message['content'] + '<|end|>' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '<|assistant|>' + message['content'] + '<|end|>' -}}
    {%- else -%}
        {{- raise_exception('bad chat role ' + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>' -}}
{%- endif -%}"""


class ExportError(ValueError):
    pass


# ----------------------------------------------------------------------------------- weights

def hf_weights(model: GPT) -> dict:
    """The trunk's tensors under HF GPT-2's names (ours are the same), in its layout. lm_head is
    tied to wte in both, so only wte is written."""
    out = {}
    for name, module in model.transformer.named_modules(prefix="transformer"):
        if not isinstance(module, (nn.Linear, nn.LayerNorm, nn.Embedding)):
            continue
        w, key = module.weight.detach(), f"{name}.weight"
        out[key] = w.t().contiguous() if key.endswith(CONV1D) else w
        if not isinstance(module, nn.Embedding):
            # HF's GPT-2 always has biases: a bias-free model gets zeros, which change nothing
            zeros = torch.zeros(w.shape[0], dtype=w.dtype)
            out[f"{name}.bias"] = zeros if module.bias is None else module.bias.detach()
    return out


def fold_reward(weights: dict, head: nn.Linear, offset: float) -> dict:
    """GPT2ForSequenceClassification scores w.h' with a bias-free Linear on the final LayerNorm's
    output h'. Ours is w.h + c with c = b - offset. Shifting the LayerNorm's bias by
    delta = c w / |w|^2 gives h' = h + delta, so w.h' = w.h + c for every input (nothing else
    reads h' in that model: it has no LM head). Exact in real arithmetic; in float32 the two agree
    to rounding."""
    w = head.weight.detach()[0].double()  # (C,)
    c = head.bias.item() - offset
    if c != 0 and not w.any():
        raise ExportError(f"the reward head's weight is zero but its bias - offset is {c:+.4g}: "
                          "no bias-free score equals it. Export the LM with --lm_only")
    delta = c * w / (w @ w) if c != 0 else torch.zeros_like(w)
    ln_bias = weights["transformer.ln_f.bias"]
    weights["transformer.ln_f.bias"] = (ln_bias.double() + delta).to(ln_bias.dtype)
    weights["score.weight"] = head.weight.detach().clone()  # (1, C), as HF's Linear stores it
    return weights


def hf_config(model: GPT, tok: Tokenizer, reward: bool) -> dict:
    """config.json: GPT2Config's fields for our model, dropout off (inference)."""
    cfg = model.config
    return {
        "architectures": ["GPT2ForSequenceClassification" if reward else "GPT2LMHeadModel"],
        "model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        # HF's "gelu_new" is GPT-2's tanh approximation, "gelu" the exact GELU
        "activation_function": {"tanh": "gelu_new", "none": "gelu"}[cfg.gelu],
        "layer_norm_epsilon": model.transformer.ln_f.eps,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
        # <|endoftext|> starts nothing we train, but HF wants a bos; <|end|> ends every turn
        "bos_token_id": tok.eot_id, "eos_token_id": tok.end_id, "pad_token_id": tok.pad_id,
        "torch_dtype": str(model.lm_head.weight.dtype).removeprefix("torch."), "use_cache": True,
        **({"id2label": {"0": "reward"}, "label2id": {"reward": 0}} if reward else {}),
    }


# ----------------------------------------------------------------------------------- tokenizer

def merge_parts(ranks: dict[bytes, int], token: bytes) -> list[bytes]:
    """tiktoken's BPE on a token's own bytes with only the ranks below its own: for a token that
    BPE made, the two tokens it was merged from (how tiktoken's educational module and
    transformers' converter recover merges from ranks)."""
    rank, parts = ranks[token], [bytes([b]) for b in token]
    while True:
        pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs, default=(rank, 0))
        if best >= rank:
            return parts
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def bpe_tables(tok: Tokenizer) -> tuple[dict, list]:
    """vocab {GPT-2 printable text: id} with the specials, and the merges "left right" in rank
    order: HF merges the pair listed first, tiktoken the lowest rank, so the two agree."""
    ranks, special = tok.enc._mergeable_ranks, tok.enc._special_tokens
    show = bytes_to_unicode()
    text = lambda token: "".join(show[b] for b in token)
    vocab = {text(t): i for t, i in ranks.items()}
    if vocab.keys() & special.keys():
        raise ExportError(f"ordinary tokens spell special ones: {vocab.keys() & special.keys()}")
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = merge_parts(ranks, token) if len(token) > 1 else [token]
        if len(parts) > 2:
            raise ExportError(f"token {token!r} (id {rank}) is not a merge of two lower-ranked "
                              "tokens: merges.txt cannot express this vocabulary")
        if len(parts) == 2:
            merges.append(f"{text(parts[0])} {text(parts[1])}")
    return vocab | special, merges


def tokenizer_files(tok: Tokenizer, block_size: int) -> dict:
    """{file name: JSON-able content, or text for merges.txt} of the tokenizer."""
    vocab, merges = bpe_tables(tok)
    special = sorted(tok.enc._special_tokens.items(), key=lambda kv: kv[1])
    added = {i: {"content": s, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for s, i in special}
    names = {"bos_token": "<|endoftext|>", "eos_token": "<|end|>", "pad_token": "<|pad|>"}
    fast = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": i, **token} for i, token in added.items()],
        # tiktoken splits with the regex, then runs BPE on each chunk's bytes, which HF spells in
        # GPT-2's printable characters (ByteLevel; use_regex off: the Split did the splitting)
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.enc._pat_str}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": None,  # nothing added around the text: no BOS, as our encode
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                    "use_regex": False},
        # ignore_merges: a chunk that is a token in itself is that token, as in tiktoken
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "fuse_unk": False,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "byte_fallback": False, "ignore_merges": True, "vocab": vocab,
                  "merges": merges}}
    extra = [s for s, _ in special if s not in names.values()]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "unk_token": None,
              "additional_special_tokens": extra,
              "added_tokens_decoder": {str(i): token for i, token in added.items()},
              "model_max_length": block_size, "clean_up_tokenization_spaces": False,
              "chat_template": CHAT_TEMPLATE}
    return {"tokenizer.json": fast, "vocab.json": vocab,
            "merges.txt": "#version: 0.2\n" + "".join(m + "\n" for m in merges),
            "tokenizer_config.json": config,
            "special_tokens_map.json": {**names, "additional_special_tokens": extra}}


# ----------------------------------------------------------------------------------- export

def export(ckpt_path: str, out_dir: str, lm_only: bool = False) -> str:
    """Write the directory; returns the architecture written."""
    ckpt = load_checkpoint(ckpt_path)
    tok = checkpoint_tokenizer(ckpt)
    model = GPT.from_checkpoint(ckpt).eval()
    weights = hf_weights(model)
    reward = model.scalar_head is not None and ckpt.get("stage") == "rm" and not lm_only
    if model.scalar_head is not None and not reward:
        head = "reward head (--lm_only)" if ckpt.get("stage") == "rm" else "value head"
        print(f"note: the {head} of this '{ckpt.get('stage')}' checkpoint is not exported; "
              "the directory is its language model")
    if reward:
        weights = fold_reward(weights, model.scalar_head, float(ckpt.get("reward_offset") or 0))
    os.makedirs(out_dir, exist_ok=True)
    meta = {"nanoalign_stage": str(ckpt.get("stage")), "nanoalign_tokenizer": tok.name}
    write_safetensors(weights, os.path.join(out_dir, "model.safetensors"), meta)
    files = tokenizer_files(tok, model.config.block_size)
    files["config.json"] = config = hf_config(model, tok, reward)
    files["generation_config.json"] = {k: config[k] for k in
                                       ("bos_token_id", "eos_token_id", "pad_token_id")}
    for name, content in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(content if isinstance(content, str) else
                    json.dumps(content, indent=1, ensure_ascii=False) + "\n")
    # our own importer must read back the very tokenizer (ranks, specials, split pattern)
    back = load_tokenizer(out_dir).enc
    if (back._mergeable_ranks, back._special_tokens, back._pat_str) != \
            (tok.enc._mergeable_ranks, tok.enc._special_tokens, tok.enc._pat_str):
        raise ExportError(f"{out_dir}: the tokenizer does not read back as it was written")
    return config["architectures"][0]


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a checkpoint as a Hugging Face GPT-2 "
                                "directory (AutoModelForCausalLM / AutoTokenizer load it).")
    p.add_argument("--ckpt", required=True, help="a checkpoint (ckpt.pt) of any stage")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--lm_only", action="store_true",
                   help="a reward model: export its language model, without the reward head")
    args = p.parse_args(argv)
    try:
        arch = export(args.ckpt, args.out, args.lm_only)
    except ExportError as e:
        sys.exit(f"export: {e}")
    auto = "AutoModelForSequenceClassification" if "Sequence" in arch else "AutoModelForCausalLM"
    print(f"{args.out}: {arch}; load it with transformers' {auto}.from_pretrained and "
          "AutoTokenizer.from_pretrained (docs/export.md)")


if __name__ == "__main__":
    main()
