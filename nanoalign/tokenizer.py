"""
The tokenizer: byte-level BPE trained by us, saved as a .tiktoken file, encoded by tiktoken; plus
the chat template.

Training (Sennrich et al. 2016, as in GPT-2): split the text into chunks with a regex (GPT-4's
pattern: words with their leading space, digit runs of at most 3, punctuation runs, whitespace),
so merges never cross a chunk boundary. Every chunk starts as its UTF-8 bytes (ranks 0..255), then
the most frequent adjacent pair is merged into a new token, again and again, until the vocabulary
has `vocab_size` ordinary tokens. The corpus has few distinct chunks, so we count each distinct
chunk once with its frequency and keep the pair counts up to date incrementally.

The file is tiktoken's format, one "base64(token bytes) rank" line per ordinary token. The special
tokens are NOT in it: they are always SPECIAL_TOKENS, appended in that order after the ordinary
ranks (ids n_ordinary, n_ordinary+1, ...).

Chat template (`render_chat`), no newlines or spaces added between turns:
    <|user|>{user content}<|end|><|assistant|>{assistant content}<|end|>...
A system message (first message only) is prepended to the first user turn's content as
"{system}\n\n{user content}". The loss covers every assistant turn's content and its <|end|> (so
the model learns to stop), nothing else. Example:
    render_chat(tok, [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi!"},
                      {"role": "assistant", "content": "Hello."}])
    ids:    <|user|>  enc("Be brief.\n\nHi!")  <|end|>  <|assistant|>  enc("Hello.")  <|end|>
    labels: -100      -100 ...                 -100     -100           enc("Hello.")  <|end|>
With add_generation_prompt=True a final <|assistant|> is appended: the prompt a policy answers.

    python -m nanoalign.tokenizer --input data/world/pretrain.txt --out data/world/tok512.tiktoken
"""

import argparse
import base64
import hashlib
import os
import time
import warnings
from collections import Counter, defaultdict

import tiktoken
from tqdm import tqdm

from nanoalign.hf_format import GPT2_SPLIT_PATTERN, read_bpe_files
from nanoalign.hf_format import bytes_to_unicode  # noqa: F401 (callers import it from here)

# <|endoftext|> separates pretraining documents; <|pad|> pads (never trained on, distinct from
# every other token); <|user|>/<|assistant|> open a turn; <|end|> ends every turn and is THE stop
# token for generation, SFT, RM, PPO
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]

# GPT-4's split pattern (tiktoken's cl100k_base). tiktoken always encodes with it; training
# splits with it too.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}"""
                 r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
try:
    import regex as re  # a dependency of tiktoken, so normally present
    SPLIT = re.compile(SPLIT_PATTERN)
except ImportError:
    # `re` has no \p{..}: letter ~ [^\W\d_], number ~ \d, other ~ [^\s\w]|_ (training only)
    import re
    SPLIT = re.compile(r"""'(?i:[sdmt]|ll|ve|re)|(?:[^\r\n\w]|_)?[^\W\d_]+|\d{1,3}"""
                       r"""| ?(?:[^\s\w]|_)+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids`, left to right, no overlaps, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def bpe_merges(text: str, vocab_size: int, verbose=False) -> dict[tuple[int, int], int]:
    """Learn the merges {(left id, right id): merged id}, in order, that grow the 256 bytes to
    `vocab_size` tokens."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the single bytes), got {vocab_size}")
    chunks = Counter(SPLIT.findall(text))
    words = [list(chunk.encode("utf-8")) for chunk in chunks]  # each distinct chunk once ...
    freqs = list(chunks.values())  # ... weighted by how often it occurs
    stats = Counter()  # pair -> occurrences in the whole text
    # pair -> words that may contain it (a superset: a stale entry only costs a no-op merge)
    where = defaultdict(set)
    for i, (ids, f) in enumerate(zip(words, freqs)):
        for pair in zip(ids, ids[1:]):
            stats[pair] += f
            where[pair].add(i)
    vocab = {i: bytes([i]) for i in range(256)}
    id_of = {token: i for i, token in vocab.items()}
    merges = {}
    bar = tqdm(total=vocab_size - 256, desc="bpe merges", disable=not verbose)
    while len(vocab) < vocab_size:
        if not stats:  # every chunk is one token already: more merges cannot exist
            warnings.warn(f"the text yields only {len(vocab)} tokens, {vocab_size} were asked: "
                          "stopping there")
            break
        # the most frequent pair; ties go to the smallest ids: the same text gives the same ranks
        best = max(stats.values())
        pair = min(p for p, count in stats.items() if count == best)
        token = vocab[pair[0]] + vocab[pair[1]]
        # two pairs can spell the same bytes ("ab"+"c", "a"+"bc"): a token is its bytes, so such a
        # merge reuses its id
        new_id = id_of.setdefault(token, len(vocab))
        if new_id == len(vocab):
            vocab[new_id] = token
            bar.update()
        merges[pair] = new_id
        for i in where.pop(pair):  # update the counts of the words that change, only
            old, f = words[i], freqs[i]
            words[i] = new = merge(old, pair, new_id)
            for p in zip(old, old[1:]):
                stats[p] -= f
                if stats[p] == 0:
                    del stats[p]
            for p in zip(new, new[1:]):
                stats[p] += f
                where[p].add(i)
    bar.close()
    return merges


def train_bpe(text: str, vocab_size: int, verbose=False) -> dict[bytes, int]:
    """Byte-level BPE on `text`: {token bytes: rank}, ranks 0..vocab_size-1 (0..255 the bytes,
    then the merges)."""
    vocab = {i: bytes([i]) for i in range(256)}
    # dicts keep the merge order
    for (a, b), new_id in bpe_merges(text, vocab_size, verbose).items():
        vocab[new_id] = vocab[a] + vocab[b]
    return {token: rank for rank, token in vocab.items()}


def save_tokenizer(ranks: dict[bytes, int], path: str) -> None:
    """The ordinary ranks in tiktoken's .tiktoken format: a "base64(token) rank" line each."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


class Tokenizer:
    """A thin wrapper over a tiktoken.Encoding naming the special-token ids every stage needs."""

    def __init__(self, enc: tiktoken.Encoding, name: str):
        self.enc, self.name, self.n_vocab = enc, name, enc.n_vocab
        ids = [enc.encode_single_token(s) for s in SPECIAL_TOKENS]
        self.eot_id, self.pad_id, self.user_id, self.assistant_id, self.end_id = ids
        # PAD != end: a pad equal to the end token is trained as the stop signal or masked away
        assert len(set(ids)) == len(ids), "special tokens need distinct ids (PAD != end)"

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: a typed "<|end|>" is plain text: no one can inject a stop or turn token
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids if int(i) != self.pad_id])

    def state(self) -> dict:
        """The whole tokenizer as plain data: what a checkpoint carries (see from_state)."""
        e = self.enc
        return {"name": self.name, "pat_str": e._pat_str, "ranks": dict(e._mergeable_ranks),
                "special": dict(e._special_tokens)}

    @classmethod
    def from_state(cls, state: dict) -> "Tokenizer":
        enc = tiktoken.Encoding(name=state["name"], pat_str=state["pat_str"],
                                mergeable_ranks=state["ranks"], special_tokens=state["special"])
        return cls(enc, state["name"])


def with_chat_tokens(name, pat_str, ranks: dict[bytes, int], special: dict[str, int]) -> Tokenizer:
    """A GPT-2-style vocabulary plus our chat tokens: special tokens it already has
    (<|endoftext|>) keep their ids, the others follow its vocabulary (the model's embedding must
    grow: model.grow_vocab)."""
    n = max([*ranks.values(), *special.values()]) + 1
    extra = [s for s in SPECIAL_TOKENS if s not in special]
    specials = {**special, **{s: n + i for i, s in enumerate(extra)}}
    enc = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks,
                            special_tokens=specials)
    return Tokenizer(enc, name)


def load_gpt2_files(directory: str) -> Tokenizer:
    """A tokenizer from a local vocab.json + merges.txt (+ tokenizer.json for the split pattern),
    as Hugging Face ships GPT-2 and as export.py writes ours, no download. vocab.json's ids are the
    ranks (hf_format.read_bpe_files checks the merges against them)."""
    ranks, special, pat_str = read_bpe_files(directory, SPECIAL_TOKENS)
    files = [os.path.join(directory, name) for name in ("vocab.json", "merges.txt")]
    data = b"".join(open(path, "rb").read() for path in files)
    # GPT-2's pattern keeps the name GPT-2 directories always had; any other is part of the identity
    kind = "gpt2" if pat_str == GPT2_SPLIT_PATTERN else "hf"
    data += pat_str.encode() if kind == "hf" else b""
    name = f"{kind}-{len(ranks) + len(special)}-{hashlib.sha256(data).hexdigest()[:8]}"
    return with_chat_tokens(name, pat_str, ranks, special)


def load_tokenizer(path: str) -> Tokenizer:
    """Load a .tiktoken file written by save_tokenizer; a Hugging Face directory with vocab.json
    and merges.txt (GPT-2's, or one export.py wrote; offline); or "gpt2" (tiktoken's GPT-2 BPE,
    from tiktoken's cache: it downloads when the cache is empty)."""
    if path == "gpt2":
        base = tiktoken.get_encoding("gpt2")
        return with_chat_tokens("gpt2-chat", base._pat_str, base._mergeable_ranks,
                                base._special_tokens)
    if os.path.isdir(path):
        return load_gpt2_files(path)
    with open(path, "rb") as f:
        data = f.read()
    lines = (line.split() for line in data.splitlines() if line)
    ranks = {base64.b64decode(token): int(rank) for token, rank in lines}
    n = len(ranks)
    assert sorted(ranks.values()) == list(range(n)), f"{path}: the ranks must be exactly 0..{n - 1}"
    name = f"bpe{n}-{hashlib.sha256(data).hexdigest()[:8]}"  # the identity checkpoints record
    enc = tiktoken.Encoding(name=name, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: n + i for i, s in enumerate(SPECIAL_TOKENS)})
    return Tokenizer(enc, name)


def render_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False):
    """(ids, labels) of a conversation; labels are -100 except on assistant content and its
    <|end|> (see the top)."""
    if messages and messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        system, first, messages = messages[0]["content"], messages[1], messages[2:]
        messages = [{"role": "user", "content": system + "\n\n" + first["content"]}] + messages
    ids, labels = [], []
    for m in messages:
        if m["role"] not in ("user", "assistant"):
            raise ValueError(f"bad chat role {m['role']!r}: expected 'user' or 'assistant' "
                             "('system' only first)")
        body = tok.encode(m["content"]) + [tok.end_id]
        ids += [tok.user_id if m["role"] == "user" else tok.assistant_id] + body
        # the turn header is given, never predicted; the model learns the answers and when to stop
        labels += [-100] + (body if m["role"] == "assistant" else [-100] * len(body))
    if add_generation_prompt:
        ids.append(tok.assistant_id)
        labels.append(-100)
    return ids, labels


def main(argv=None):
    p = argparse.ArgumentParser(description="Train a byte-level BPE tokenizer and save it as a "
                                            ".tiktoken file.")
    p.add_argument("--input", required=True, help="UTF-8 text file to train on")
    p.add_argument("--vocab-size", type=int, default=512,
                   help="ordinary tokens; the special tokens come on top")
    p.add_argument("--out", required=True, help="output .tiktoken file")
    args = p.parse_args(argv)
    with open(args.input, encoding="utf-8") as f:
        text, t0 = f.read(), time.time()
    save_tokenizer(train_bpe(text, args.vocab_size, verbose=True), args.out)
    dt = time.time() - t0
    tok = load_tokenizer(args.out)
    n_bytes, n_tokens = len(text.encode("utf-8")), len(tok.encode(text))
    print(f"{tok.name}: trained in {dt:.2f}s on {n_bytes:,} bytes; {n_bytes / n_tokens:.2f} "
          f"bytes/token on the input; n_vocab {tok.n_vocab} with the specials; saved to {args.out}")


if __name__ == "__main__":
    main()
