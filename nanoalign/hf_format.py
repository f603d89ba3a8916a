"""
Hugging Face's files for a GPT-2-style model, read and written with the standard library and torch
(no transformers, no safetensors package): the safetensors container, and a byte-level BPE
tokenizer's vocab.json + merges.txt (+ tokenizer.json). model.load_gpt2 and
tokenizer.load_tokenizer read with it; export.py writes with it.
"""

import json
import math
import os

import torch

# the safetensors format's dtype names, with the torch dtypes they stand for
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# GPT-2's split pattern (openai/gpt-2 encoder.py): what its ByteLevel pre-tokenizer applies
GPT2_SPLIT_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                      r"""|\s+(?!\S)|\s+""")


def read_safetensors(path: str) -> dict:
    """Minimal reader of the safetensors format: an 8-byte little-endian header length, a JSON
    header, raw tensors."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, numel = DTYPES[meta["dtype"]], math.prod(meta["shape"])
        offset = meta["data_offsets"][0]
        t = torch.frombuffer(data, dtype=dtype, count=numel, offset=offset) if numel else \
            torch.empty(0, dtype=dtype)
        out[name] = t.reshape(meta["shape"]).clone()
    return out


def write_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """The reader's inverse. The safetensors format: the header's length (8 bytes, little-endian),
    the JSON header {name: dtype, shape, [begin, end) offsets into the data}, then the tensors'
    bytes back to back with no gaps. The header is padded with spaces to a multiple of 8 bytes, as
    the reference writer does, so every tensor starts aligned. transformers refuses a file whose
    __metadata__ lacks "format": "pt"."""
    header, blobs, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, [], 0
    for name, t in tensors.items():
        # the raw bytes in this machine's order: little-endian on every platform torch ships for
        blob = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.writelines(blobs)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte in vocab.json/merges.txt (openai/gpt-2
    encoder.py): printable bytes stand for themselves, the other 68 are shifted to chr(256 + k).
    GPT-2's byte tokens take ids 0..255 in this order; ours take id = byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, shifted = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + shifted)
            shifted += 1
    return dict(zip(bs, map(chr, cs)))


def split_pattern(tokenizer_json: str) -> str:
    """The split regex of tokenizer.json's pre-tokenizer: a Split's regex (ours, Llama 3's), or
    GPT-2's, which a ByteLevel pre-tokenizer applies when use_regex is on. No tokenizer.json (GPT-2
    as first published): GPT-2's."""
    if not os.path.exists(tokenizer_json):
        return GPT2_SPLIT_PATTERN
    with open(tokenizer_json, encoding="utf-8") as f:
        pre = json.load(f).get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]):
        if p.get("type") == "Split" and "Regex" in p.get("pattern", {}):
            return p["pattern"]["Regex"]
        if p.get("type") == "ByteLevel" and p.get("use_regex", True):
            return GPT2_SPLIT_PATTERN
    raise ValueError(f"{tokenizer_json}: pre-tokenizer {pre} has no split regex: not a byte-level "
                     "BPE tokenizer in GPT-2's or Llama 3's layout")


def read_bpe_files(directory: str, special_names) -> tuple[dict, dict, str]:
    """(ranks {token bytes: id}, specials {name: id}, split pattern) of a byte-level BPE tokenizer
    directory: GPT-2's, or one export.py wrote. The tokens of vocab.json named in special_names are
    the specials.

    vocab.json's ids are the ranks, so the model's embedding rows line up. tiktoken merges first
    the adjacent pair whose merged token has the lowest rank; HF's BPE the pair listed first in
    merges.txt. The two agree when the merges, in file order, make increasing ids and every token
    longer than a byte is made by a merge: both are checked."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    decode = lambda s: bytes(byte_of[c] for c in s)
    vocab_path, merges_path = (os.path.join(directory, n) for n in ("vocab.json", "merges.txt"))
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    special = {t: i for t, i in vocab.items() if t in special_names}
    ranks = {decode(t): i for t, i in vocab.items() if t not in special}
    made, last = set(), -1
    with open(merges_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.startswith("#version") or not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{merges_path}:{line_no}: expected two tokens separated by a "
                                 f"space, got {line!r}")
            token = decode(parts[0]) + decode(parts[1])
            if ranks.get(token, -1) <= last:
                raise ValueError(f"{merges_path}:{line_no}: {line.strip()!r} makes id "
                                 f"{ranks.get(token)}, not above the previous merge's {last}: "
                                 f"{vocab_path} and merges.txt do not belong together")
            made.add(token)
            last = ranks[token]
    unmade = [t for t in ranks if len(t) > 1 and t not in made]
    if unmade or len(ranks.keys() - made) != 256:
        raise ValueError(f"{vocab_path}: {unmade[:3]} ({len(unmade)} tokens) made by no merge, or "
                         "a byte missing: vocab.json and merges.txt do not belong together")
    return ranks, special, split_pattern(os.path.join(directory, "tokenizer.json"))
