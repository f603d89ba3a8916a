"""
Stage 1: pretraining. Next-token prediction on plain text: minimise

    L = -(1/N) sum_t log p(x_t | x_<t)

    python -m nanoalign.train_pretrain --data data/world/pretrain.txt --out_dir out/tiny/pretrain
    torchrun --standalone --nproc_per_node=2 nanoalign/train_pretrain.py

The text is read as documents (files.read_documents: plain text split at blank lines, or one
{"text": ...} record per document in .jsonl/.json), each document encoded and followed by
<|endoftext|>, and the whole stream cached as uint16/uint32 token ids beside the text file. A batch
is B random windows of block_size + 1 tokens (inputs and targets shifted by one), as in nanoGPT.
Which windows a step uses depends only on (seed, step), so a resumed run sees exactly the data an
uninterrupted run would, and 2 DDP ranks see the two halves of the batch one process would.
Checkpoints are written atomically to out_dir/ckpt.pt.
"""

import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

if __package__ in (None, ""):  # `torchrun nanoalign/train_pretrain.py` runs this file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import common, config, record
from nanoalign.files import read_documents
from nanoalign.generate import upcast
from nanoalign.model import GPT, GPTConfig, grow_vocab, load_gpt2
from nanoalign.tokenizer import load_tokenizer, save_tokenizer, train_bpe


@dataclass
class PretrainConfig:
    out_dir: str = "out/tiny/pretrain"  # checkpoint, metrics.jsonl and run.json go here
    # UTF-8 text, documents separated by blank lines; or .jsonl/.json with one {"text"} per document
    data: str = "data/world/pretrain.txt"
    val_data: str = "data/world/pretrain_val.txt"  # held-out, as --data ("" = the last 5% of it)
    # -log p of each --val_data document under the process that wrote it, where that is known (the
    # built-in world knows): the best achievable validation loss, logged beside it
    val_nll: str = "data/world/pretrain_val_logp.json"
    # a .tiktoken file (trained on --data if missing), a GPT-2 directory, or "gpt2"
    tokenizer: str = "data/world/tok512.tiktoken"
    vocab_size: int = 512  # ordinary tokens when a new tokenizer is trained
    # "scratch", or a GPT-2 checkpoint file or directory to continue pretraining from
    init_from: str = "scratch"
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # model width
    block_size: int = 128  # context length in tokens
    dropout: float = 0.0  # dropout in pretraining (0 is best for small models trained briefly)
    bias: bool = True  # biases in Linear and LayerNorm (GPT-2: true; nanoGPT's default: false)
    gelu: str = "none"  # "none": the exact GELU (nanoGPT's; faster on CPU) or "tanh" (GPT-2's)
    batch_size: int = 16  # sequences per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1200  # optimizer steps
    lr: float = 3e-3  # peak learning rate (small models tolerate a large one)
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup: int = 50  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay on 2-D weights only
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    eval_interval: int = 300  # steps between validation losses and checkpoints
    eval_batches: int = 10  # batches per validation estimate
    seed: int = 0  # data order and initialisation
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 (autocast) | float64 (exact comparisons)
    compile: bool = False  # torch.compile the model (needs a C++ compiler; pays off on GPU)
    resume: bool = False  # continue from out_dir/ckpt.pt exactly where it stopped
    stop_at: int = 0  # stop with a checkpoint after this step (0 = run to max_steps)

    def validate(self):
        config.check(self.max_steps > 0, "max_steps", "must be > 0")
        config.check(self.batch_size > 0 and self.grad_accum > 0, "batch_size",
                     "batch_size and grad_accum must be > 0")
        config.check(self.n_embd % self.n_head == 0, "n_embd",
                     f"{self.n_embd} not divisible by n_head {self.n_head}")
        config.check(self.gelu in ("tanh", "none"), "gelu", "'tanh' or 'none'")
        config.check(self.lr > 0, "lr", "must be > 0")
        config.check(self.init_from == "scratch" or self.tokenizer == "gpt2"
                     or os.path.isdir(self.tokenizer), "tokenizer",
                     "GPT-2 weights need GPT-2's tokenizer: the directory with vocab.json and "
                     "merges.txt")


def get_tokenizer(cfg: PretrainConfig):
    """Load the tokenizer, or train one on the pretraining documents (seconds here) and save it.
    It reads the documents as tokenize_file does, joined by the blank lines of a plain text file."""
    if cfg.tokenizer != "gpt2" and not os.path.exists(cfg.tokenizer):
        print(f"training a {cfg.vocab_size}-token BPE tokenizer on {cfg.data} -> {cfg.tokenizer}")
        text = "\n\n".join(read_documents(cfg.data))
        save_tokenizer(train_bpe(text, cfg.vocab_size), cfg.tokenizer)
    return load_tokenizer(cfg.tokenizer)


def tokenize_file(path: str, tok) -> np.ndarray:
    """Encode a file's documents once into a memmapped token file beside it (keyed by the
    tokenizer)."""
    cache = f"{path}.{tok.name}.bin"
    dtype = np.uint16 if tok.n_vocab < 2**16 else np.uint32
    if not os.path.exists(cache) or os.path.getmtime(cache) < os.path.getmtime(path):
        docs = read_documents(path)
        ids = []
        for doc_ids in tok.enc.encode_ordinary_batch(docs):
            ids.extend(doc_ids + [tok.eot_id])  # <|endoftext|> ends every document
        tmp = f"{cache}.tmp{os.getpid()}"
        np.array(ids, dtype=dtype).tofile(tmp)
        os.replace(tmp, cache)
    return np.memmap(cache, dtype=dtype, mode="r")


def get_batch(data: np.ndarray, step: int, cfg, micro: int, d: common.Dist, global_batch: int):
    """Micro-batch `micro` of this rank's share of step `step`'s global batch: random windows
    chosen by a generator seeded with (seed, step) only, so resume and DDP see the same data as an
    uninterrupted single process."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(len(data) - cfg.block_size - 1, (global_batch,), generator=g)
    first = (micro * d.world + d.rank) * cfg.batch_size
    rows = [torch.from_numpy(data[s:s + cfg.block_size + 1].astype(np.int64))
            for s in starts[first:first + cfg.batch_size]]
    xy = torch.stack(rows).to(d.device)  # (B, T+1)
    return xy[:, :-1], xy[:, 1:]  # inputs (B, T), targets (B, T)


@torch.no_grad()
def estimate_loss(model, data, cfg, d):
    model.eval()
    losses = []
    for i in range(cfg.eval_batches):  # fixed windows (step -1 - i): comparable across evaluations
        x, y = get_batch(data, -1 - i, cfg, 0, common.Dist(device=d.device), cfg.batch_size)
        with common.autocast(d.device, cfg.dtype):
            logits = model(x)
        # (B*T, V) logits against (B*T,) targets
        losses.append(F.cross_entropy(upcast(logits).flatten(0, 1), y.flatten()).item())
    model.train()
    return float(np.mean(losses))


def reference_losses(val_data: np.ndarray, tok, nll_path: str) -> dict:
    """Two lines for the loss curve. The unigram entropy: the loss of a model that ignores context,
    which learning must go far below. The entropy floor: the true generator's -log p of the
    validation text per token (its documents' <|endoftext|> included), the best any model can do;
    nll_path holds one -log p per document of the validation text."""
    counts = np.bincount(np.asarray(val_data), minlength=tok.n_vocab).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    lines = {"unigram_entropy": float(-(p * np.log(p)).sum()), "entropy_floor": None}
    if nll_path and os.path.exists(nll_path):
        with open(nll_path) as f:
            nll = json.load(f)
        n_docs = int((np.asarray(val_data) == tok.eot_id).sum())  # one <|endoftext|> per document
        config.check(len(nll) == n_docs, "val_nll", f"{nll_path} holds {len(nll)} log-probs for "
                     f"{n_docs} validation documents: pass the file of this --val_data, or ''")
        lines["entropy_floor"] = sum(nll) / len(val_data)
    return lines


def new_model(cfg: PretrainConfig, tok) -> GPT:
    if cfg.init_from == "scratch":
        return GPT(GPTConfig(cfg.block_size, tok.n_vocab, cfg.n_layer, cfg.n_head, cfg.n_embd,
                             cfg.dropout, cfg.bias, cfg.gelu))
    return grow_vocab(load_gpt2(cfg.init_from, cfg.block_size), tok.n_vocab)  # + the chat tokens


def train(cfg: PretrainConfig):
    # 0. set-up: ranks, the tokenizer (rank 0 may train it and write the token cache), the data,
    #    the model, the optimizer, resume
    d = common.init_dist(cfg.device)
    common.set_seed(cfg.seed)
    tok = get_tokenizer(cfg) if d.master else None
    common.barrier()
    tok = tok or get_tokenizer(cfg)
    data = tokenize_file(cfg.data, tok)
    val_data = tokenize_file(cfg.val_data, tok) if cfg.val_data else data[int(0.95 * len(data)):]
    if not cfg.val_data:
        data = data[:int(0.95 * len(data))]
    for name, tokens in (("data", data), ("val_data", val_data)):  # a batch draws whole windows
        config.check(len(tokens) > cfg.block_size + 1, name, f"{len(tokens):,} tokens: a window "
                     f"needs block_size + 1 = {cfg.block_size + 1}, and more to choose from")
    lines = reference_losses(val_data, tok, cfg.val_data and cfg.val_nll)
    model = common.with_precision(new_model(cfg, tok).to(d.device), cfg.dtype)
    optimizer = common.make_optimizer(model, cfg.lr, cfg.weight_decay)
    step, ckpt_path = 0, os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume:
        ckpt = record.load_checkpoint(ckpt_path, stages=["pretrain"], tokenizer=tok.name)
        step = record.restore(ckpt, model, optimizer, d)
    raw_model = model
    model = common.wrap_ddp(torch.compile(model) if cfg.compile else model, d)
    log = record.MetricsLog(cfg.out_dir, cfg, d.master, resume_step=step if cfg.resume else None)
    stop = common.StopSignal(d.device)
    global_batch = cfg.batch_size * cfg.grad_accum * d.world
    tokens_per_step = global_batch * cfg.block_size
    if d.master:
        print(f"{raw_model.num_params(False) / 1e6:.2f}M parameters | {len(data):,} train tokens | "
              f"{tokens_per_step:,} tokens/step | {d.world} rank(s) on {d.device}")

    def save():
        parent = cfg.init_from if cfg.init_from != "scratch" else None
        record.save_stage(ckpt_path, d, "pretrain", raw_model, optimizer, step, cfg, tok, parent)

    bar = common.progress(cfg.max_steps, step, "pretrain", not d.master)
    t0, last = time.time(), cfg.stop_at if cfg.stop_at > 0 else cfg.max_steps
    while step < min(cfg.max_steps, last):
        # 1. forward and backward over this rank's micro-batches; the gradient all-reduce waits
        #    for the last one (no_sync before it)
        lr = common.lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup, cfg.min_lr_frac)
        common.set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=d.device)  # a tensor: no host sync per micro-batch
        for micro in range(cfg.grad_accum):
            x, y = get_batch(data, step, cfg, micro, d, global_batch)
            sync = micro == cfg.grad_accum - 1
            with common.no_sync_unless(model, d, sync), common.autocast(d.device, cfg.dtype):
                logits = model(x)  # (B, T, V)
                # (B*T, V) logits against (B*T,) targets, averaged over the micro-batches
                loss = F.cross_entropy(upcast(logits).flatten(0, 1), y.flatten()) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        # 2. the optimizer step
        common.optimizer_step(model, optimizer, cfg.grad_clip)
        step += 1
        # 3. log; the validation loss and a checkpoint every eval_interval steps
        dt, t0 = time.time() - t0, time.time()
        loss_avg = common.all_reduce_sum(loss_sum).item() / d.world
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}")
        row = dict(step=step, loss=loss_avg, lr=lr, tokens_per_s=tokens_per_step / dt)
        evaluate = step % cfg.eval_interval == 0 or step == cfg.max_steps
        if evaluate:
            row.update(val_loss=estimate_loss(raw_model, val_data, cfg, d), **lines)
            floor = lines["entropy_floor"]
            if d.master:
                tqdm.write(f"step {step}: train loss {loss_avg:.4f}, val loss "
                           f"{row['val_loss']:.4f} (unigram entropy {lines['unigram_entropy']:.4f}"
                           + (f", entropy floor {floor:.4f})" if floor else ")"))
        log.log(**row)  # a NaN loss stops here, before any checkpoint
        if evaluate:
            save()
        if stop.should_stop():
            break
    if step % cfg.eval_interval != 0 and step != cfg.max_steps:
        save()  # stopped early (a signal or stop_at): keep the exact state for --resume
    bar.close()
    common.cleanup_dist()
    return raw_model


def main(argv=None):
    return train(config.parse_config(PretrainConfig, argv, __doc__))


if __name__ == "__main__":
    main()
