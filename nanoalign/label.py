"""
The "human" in RLHF, for real people: label pairs of answers in the terminal.

    python -m nanoalign.label --ckpt out/tiny/sft/ckpt.pt --out data/my_prefs.jsonl  # one model
    python -m nanoalign.label --ckpt out/tiny/ppo/ckpt.pt --compare out/tiny/sft/ckpt.pt  # two

For each prompt two answers are sampled (two samples of one model, or one of each) and shown side
by side as A and B, in a random order (raters favour the first answer they read: the position
must not tell which model wrote it). Press a (A is better), b, t (tie), s (skip) or q (quit).
Every A/B decision is appended to --out at once, in the preference format that train_rm and
train_dpo read (prompt, chosen, rejected, plus rater and time); every decision, ties and skips
included, also goes to <out>.log.jsonl. Ctrl-C, q or a crash lose nothing, and running the same
command again resumes with the next prompt. Many raters at once, in the browser: serve.py.

    python -m nanoalign.label --export data/labels.log.jsonl --out data/voted_prefs.jsonl

turns a decisions log (this tool's or serve.py's) into a preference file by majority vote, and

    python -m nanoalign.label --simulate 6 --pairs data/world/prefs_train.jsonl --n 50

rehearses a class: 6 simulated raters (the world's annotator) label 50 pairs into a log (--out)
as serve.py would write it, so the steps after labelling can be tried (and measured) without people.
"""

import getpass
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import common, config, record
from nanoalign.data import load_prefs, load_prompts
from nanoalign.files import DataError, read_jsonl
from nanoalign.generate import generate
from nanoalign.rl import response_texts
from nanoalign.tokenizer import render_chat
from nanoalign.model import GPT
from nanoalign.world import annotate  # tools may know the world; stages never do


@dataclass
class LabelConfig:
    ckpt: str = "out/tiny/sft/ckpt.pt"  # the model whose answers are compared (2 per prompt)
    compare: str = ""  # a second model: one answer from each (same tokenizer)
    prompts: str = "data/world/prompts_rl.jsonl"  # JSONL prompts (any schema load_prompts reads)
    out: str = "data/human_prefs.jsonl"  # preference pairs are appended here
    rater: str = ""  # who is labelling ("" = the login name)
    n: int = 20  # prompts to label in this session
    temperature: float = 1.0  # sampling temperature of the answers
    max_new_tokens: int = 96  # length limit of each answer
    # sampling and A/B order (prompt k always gets the same answers and order)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    export: str = ""  # a decisions log: write its majority-vote pairs to --out instead of labelling
    # rehearse a class: this many simulated raters label the first n pairs of --pairs into --out
    simulate: int = 0
    pairs: str = ""  # with --simulate: a preference file that carries gold_chosen/gold_rejected

    def validate(self):
        config.check(self.n > 0, "n", "must be > 0")
        config.check(self.simulate >= 0, "simulate", "must be >= 0")
        config.check(not self.simulate or self.pairs, "pairs", "--simulate needs a pairs file")
        config.check(self.temperature > 0, "temperature",
                     "must be > 0 (two greedy answers would be identical)")


KEYS = {"a": "A", "b": "B", "t": "tie", "s": "skip", "q": "quit"}


def load_model(path, device):
    ckpt = record.load_checkpoint(path, stages=["sft", "ppo", "dpo", "grpo"])
    return record.checkpoint_tokenizer(ckpt), GPT.from_checkpoint(ckpt, device).eval()


def load_models(cfg, device):
    """(tokenizer, [model] or [model, compared model], the source of each of the two answers)."""
    tok, model = load_model(cfg.ckpt, device)
    if not cfg.compare:
        return tok, [model], [cfg.ckpt, cfg.ckpt]
    other_tok, other = load_model(cfg.compare, device)
    config.check(other_tok.name == tok.name, "compare", f"tokenizer {other_tok.name} != {tok.name}")
    return tok, [model, other], [cfg.ckpt, cfg.compare]


def pair_id(prompt, answers) -> str:
    """A pair's name from its content: the same for every rater, file order and restart."""
    text = json.dumps([prompt, sorted(answers)], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def decision(pair: dict, order: list, choice: str, rater: str) -> dict:
    """One log line: pair {id, index, prompt, answers, models, gold?} as shown in `order`. A, B
    and models name the sources (evaluate --labels counts wins by them); the texts let it export."""
    d = {"pair": pair["id"], "prompt_index": pair["index"], "choice": choice,
         "A": pair["models"][order[0]], "B": pair["models"][order[1]], "models": pair["models"],
         "rater": rater, "time": time.time(), "prompt": pair["prompt"],
         "answers": [pair["answers"][j] for j in order]}
    if pair.get("gold"):
        d["gold"] = [pair["gold"][j] for j in order]  # the world's judge, in the shown order
    return d


def two_answers(models, tok, messages, k: int, cfg: LabelConfig, device) -> list[str]:
    """Two answers to prompt k: one from each model, or two samples of the one model. Seeded by
    (seed, k)."""
    ids = render_chat(tok, messages, add_generation_prompt=True)[0]
    g = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + k)
    if len(models) == 1:
        tokens, mask, P = generate(models[0], [ids, ids], cfg.max_new_tokens, tok.end_id,
                                   tok.pad_id, cfg.temperature, generator=g)
        return response_texts(tok, tokens, mask, P)
    return [response_texts(tok, *generate(m, [ids], cfg.max_new_tokens, tok.end_id, tok.pad_id,
                                          cfg.temperature, generator=g))[0] for m in models]


def ask(prompt: str) -> str:
    """One valid key from stdin; 'quit' at end of input. Invalid keys ask again."""
    while True:
        print(prompt, end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return "quit"
        key = line.strip().lower()[:1]
        if key in KEYS:
            return KEYS[key]
        print(f"  '{line.strip()}' is not one of a, b, t, s, q")


def append(path: str, record: dict):
    """Append one JSON line and push it to disk before the next question: a crash loses nothing."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def pairs_from_file(path: str, n: int) -> list[dict]:
    """Pairs of a preference file; its chosen and rejected become the two 'models', so that
    evaluate --labels reports how often people agree with the file (with gold where the world
    wrote it)."""
    pairs = []
    for i, rec in enumerate(load_prefs(path)[:n]):
        answers = [rec["chosen"], rec["rejected"]]
        gold = [rec["gold_chosen"], rec["gold_rejected"]] if "gold_chosen" in rec else None
        pairs.append({"id": pair_id(rec["prompt"], answers), "index": i,
                      "prompt": list(rec["prompt"]), "answers": answers,
                      "models": ["chosen", "rejected"], "gold": gold})
    return pairs


def pairs_from_models(cfg, loaded=None) -> list[dict]:
    """Two answers to each of the first n prompts, sampled as label.py samples them (same seed,
    same answers); a pair of identical answers has nothing to judge and is left out. loaded:
    load_models' (tok, models, sources), if the caller has them."""
    device = common.init_dist(cfg.device).device
    tok, models, sources = loaded or load_models(cfg, device)
    pairs = []
    for k, prompt in enumerate(tqdm(load_prompts(cfg.prompts)[:cfg.n], desc="sampling pairs")):
        answers = two_answers(models, tok, prompt, k, cfg, device)
        if answers[0] != answers[1]:
            pairs.append({"id": pair_id(prompt, answers), "index": k,
                          "prompt": list(prompt), "answers": answers, "models": sources})
    return pairs


def export(log_path: str, out_path: str) -> list[dict]:
    """Majority vote per pair over its raters (each rater's last decision counts): ties and skips
    cast no vote, and a pair without a strict majority (split, or no A/B vote) is left out."""
    pairs = {}
    for line, d in read_jsonl(log_path):
        if not {"pair", "choice", "rater", "prompt", "answers"} <= d.keys():
            raise DataError(f"{log_path}:{line}: expected a decision with pair, choice, rater, "
                            f"prompt and answers, found fields {sorted(d)}")
        pairs.setdefault(d["pair"], {})[d["rater"]] = d
    out = []
    for pid, by_rater in pairs.items():
        last = list(by_rater.values())[-1]
        votes = {text: 0 for text in last["answers"]}
        for d in by_rater.values():
            if d["choice"] in ("A", "B"):
                votes[d["answers"][0 if d["choice"] == "A" else 1]] += 1
        ranked = sorted(votes.items(), key=lambda kv: -kv[1])
        if len(ranked) < 2 or ranked[0][1] == ranked[1][1]:  # identical answers, or a split vote
            continue
        (win, n_win), (lose, n_lose) = ranked
        # the source and gold score of each text, from the order that rater saw
        source = dict(zip(last["answers"], [last["A"], last["B"]]))
        gold = dict(zip(last["answers"], last.get("gold") or []))
        choices = [d["choice"] for d in by_rater.values()]
        rec = {"prompt": last["prompt"], "chosen": win, "rejected": lose, "pair": pid,
               "votes": {"chosen": n_win, "rejected": n_lose, "tie": len(choices) - n_win - n_lose
                         - choices.count("skip"), "skip": choices.count("skip")},
               "raters": sorted(by_rater), "chosen_model": source[win],
               "rejected_model": source[lose]}
        if gold:
            rec.update(gold_chosen=gold[win], gold_rejected=gold[lose])
        out.append(rec)
    with open(out_path, "w") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in out)
    return out


def simulate_class(pairs: list[dict], raters: int, log_path: str, seed: int) -> int:
    """Each of `raters` simulated raters judges every pair, A and B in an order of their own, by
    the Bradley-Terry annotator that labelled the built-in world's pairs (world.annotate: the
    better answer wins with probability sigmoid(gold margin / TAU)); decisions as serve.py logs
    them. The same seed gives the same log."""
    for r in range(1, raters + 1):
        rater, rng = f"sim{r}", random.Random(f"{seed}/sim{r}")
        for pair in pairs:
            order = [0, 1] if rng.random() < 0.5 else [1, 0]
            a_wins = annotate(pair["gold"][order[0]], pair["gold"][order[1]], rng)
            append(log_path, decision(pair, order, "A" if a_wins else "B", rater))
    return raters * len(pairs)


def main(argv=None):
    cfg = config.parse_config(LabelConfig, argv, __doc__)
    if cfg.simulate:
        pairs = pairs_from_file(cfg.pairs, cfg.n)
        if not pairs or any(p["gold"] is None for p in pairs):
            raise DataError(f"{cfg.pairs}: --simulate needs pairs with gold_chosen and "
                            "gold_rejected (the built-in world's prefs_*.jsonl carry them)")
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        n = simulate_class(pairs, cfg.simulate, cfg.out, cfg.seed)
        print(f"{n} decisions of {cfg.simulate} simulated raters on {len(pairs)} pairs "
              f"appended to {cfg.out}")
        return n
    if cfg.export:
        config.check(os.path.abspath(cfg.export) != os.path.abspath(cfg.out), "out",
                     "must differ from --export (the log would be overwritten)")
        n = len(export(cfg.export, cfg.out))
        print(f"{n} majority-vote pairs from {cfg.export} written to {cfg.out}")
        return n
    device = common.init_dist(cfg.device).device
    tok, models, sources = load_models(cfg, device)
    prompts, log_path = load_prompts(cfg.prompts), cfg.out + ".log.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    done = set()
    # resume: a prompt decided before (ties and skips too) is not asked again
    if os.path.exists(log_path):
        done = {json.loads(line)["prompt_index"] for line in open(log_path) if line.strip()}
    todo = [k for k in range(len(prompts)) if k not in done][:cfg.n]
    rater = cfg.rater or getpass.getuser()
    print(f"{len(done)} prompts decided before; {len(todo)} in this session. "
          "Keys: a, b, t (tie), s (skip), q (quit).")
    labelled = 0
    try:
        for i, k in enumerate(todo, 1):
            answers = two_answers(models, tok, prompts[k], k, cfg, device)
            # the answers shown as A and B
            order = [0, 1] if random.Random(cfg.seed * 1_000_003 + k).random() < 0.5 else [1, 0]
            shown = [answers[j] for j in order]
            print(f"\n[{i}/{len(todo)}] {prompts[k][-1]['content']}")
            print(f"  A: {shown[0]}\n  B: {shown[1]}")
            choice = "identical" if shown[0] == shown[1] else ask("A, B, tie, skip or quit? ")
            if choice == "quit":
                break
            pair = {"id": pair_id(prompts[k], answers), "index": k, "prompt": prompts[k],
                    "answers": answers, "models": sources}
            d = decision(pair, order, choice, rater)
            now = d["time"]
            append(log_path, d)
            if choice in ("A", "B"):
                win = 0 if choice == "A" else 1
                append(cfg.out, {"prompt": prompts[k], "chosen": shown[win],
                                 "rejected": shown[1 - win], "chosen_model": sources[order[win]],
                                 "rejected_model": sources[order[1 - win]], "rater": rater,
                                 "time": now})
                labelled += 1
    except KeyboardInterrupt:
        print()
    print(f"{labelled} pairs added to {cfg.out} in this session; run the same command to go on.")
    return labelled


if __name__ == "__main__":
    main()
