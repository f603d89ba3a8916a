"""The evaluation's reward-model diagnosis on the built-in world: agreement with the gold judge
split by what separates the two answers of a pair. The split must classify hand-made pairs as
intended, cover every untied pair once, and agree with the RM stage's own gold agreement, computed
by other code. And the split of the files: evaluate.py measures, report.py writes."""

import json
import re
from pathlib import Path

import pytest
import torch

from nanoalign import evaluate, record, train_rm
from nanoalign.batching import tokenize_pref
from nanoalign.data import load_prefs
from nanoalign.rl import concatenated_logps, load_reward_model
from nanoalign.model import GPT


def pair(prompt, chosen, rejected, gc, gr):
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected,
            "gold_chosen": gc, "gold_rejected": gr}


def test_pair_kinds_on_hand_made_pairs():
    q = "Ben has two balls and gives one to Jack. How many balls does Ben have now?"
    story = "Write a short story about Tim on the farm."
    records = [
        # right vs wrong: answer
        pair(q, "Ben has one ball.", "Ben has seven balls.", 1.2, 0.3),
        # both right
        pair(q, "Ben has one ball.", "Ben has one ball. Ben was sad.", 1.2, 0.6),
        # one leaves out the requested hero: topic
        pair(story, "A bird named Tim lived on the farm. The end.",
             "A cat named Emma lived on the farm.", 1.0, 0.2),
        pair(story, "Tim lived on the farm. Tim was happy.", "Tim lived on the farm. Tim was sad.",
             0.9, 0.1),
        # a gold tie: left out
        pair(story, "Tim was on the farm.", "Tim lived on the farm.", 0.5, 0.5),
        # the annotator chose the worse answer (negative gold margin); the RM prefers the rejected
        # one: agrees
        pair(q, "Ben has seven balls.", "Ben has one ball.", 0.3, 1.2),
        # wrong first sentence, but the answer word later: the judge's partial credit, so
        # correctness differs
        pair(q, "Ben has seven balls. Two take away one is one.", "Ben has seven balls.", 0.5, 0.3)]
    rm_chosen = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    rm_rejected = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    out = evaluate.agreement_by_kind(records, rm_chosen, rm_rejected)
    assert {k: (v["n"], v["gold_agreement"]) for k, v in out.items()} == {
        "answer": (3, 1.0), "question_other": (1, 0.0), "topic": (1, 0.0), "story_other": (1, 1.0)}
    assert out["answer"]["mean_abs_margin"] == pytest.approx((0.9 + 0.9 + 0.2) / 3)


def test_pair_logps_are_the_dpo_stages_sequence_logps(micro_run):
    """Both sides share the prompt, so a prompt token leaking into the sums would cancel in every
    accuracy: compare the sums themselves with DPO's own (labels -100 on the prompt)."""
    ckpt = record.load_checkpoint(str(micro_run / "sft" / "ckpt.pt"))
    tok, model = record.checkpoint_tokenizer(ckpt), GPT.from_checkpoint(ckpt, "cpu").eval()
    pairs = [tokenize_pref(tok, r, model.config.block_size)
             for r in load_prefs(str(micro_run / "world" / "prefs_val.jsonl"))[:7]]
    ours = evaluate.pair_logps(model, pairs, tok.pad_id, "cpu")
    with torch.no_grad():
        chosen, rejected = concatenated_logps(model, pairs, tok.pad_id, "cpu")
    assert torch.allclose(ours, torch.stack([chosen, rejected], 1), atol=1e-4)


def test_kinds_cover_the_pairs_and_match_the_rm_stages_gold_agreement(micro_run, tmp_path):
    val = str(micro_run / "world" / "prefs_val.jsonl")
    rm_path = str(micro_run / "rm" / "ckpt.pt")
    sft_path = str(micro_run / "sft" / "ckpt.pt")
    results = evaluate.main(["--models", f"sft={sft_path}", "--sft", sft_path,
                             "--reward_model", rm_path, "--pairs", val,
                             "--prompts", str(micro_run / "world" / "prompts_eval.jsonl"),
                             "--n_prompts", "4", "--max_new_tokens", "8"])
    kinds = results["reward_model"]["gold_agreement_by_kind"]
    untied = [r for r in load_prefs(val) if r["gold_chosen"] != r["gold_rejected"]]
    assert sum(k["n"] for k in kinds.values()) == len(untied)
    tok = record.checkpoint_tokenizer(record.load_checkpoint(rm_path))
    model, _ = load_reward_model(rm_path)
    pairs = [tokenize_pref(tok, r, model.config.block_size) for r in load_prefs(val)]
    gold = [(r["gold_chosen"], r["gold_rejected"]) for r in load_prefs(val)]
    stage = train_rm.evaluate_pairs(model, pairs, gold, tok.pad_id, "cpu")
    overall = sum(k["n"] * k["gold_agreement"] for k in kinds.values()) / len(untied)
    assert overall == pytest.approx(stage["gold_agreement"], abs=1e-9)
    json.dumps(results)  # the whole result stays JSON


def test_evaluate_measures_and_never_imports_the_report():
    """report.py reads evaluate.py's measures; the other way round would be a cycle."""
    source = Path(evaluate.__file__).read_text()
    imports = re.findall(r"^\s*(?:from|import) +(\S+)(?: +import +(.*))?$", source, re.M)
    assert not [m for m, names in imports if "report" in m or "report" in (names or "")]


JUDGES = '''
CALLS = []

def length(prompts, answers):
    CALLS.append(list(answers))
    return [len(a) for a in answers]

def longer(prompts, answers_a, answers_b):
    return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5
            for a, b in zip(answers_a, answers_b)]

def always_a(prompts, answers_a, answers_b):
    return [1] * len(prompts)

def too_few(prompts, answers):
    return [0.0]

def one_argument(prompts):
    return []
'''


def test_your_own_judge_pointwise_or_pairwise_gives_the_win_rate_and_is_named(micro_run, tmp_path,
                                                                              monkeypatch):
    """--judge module:function: a pointwise judge scores each answer (win rate by the scores, its
    mean is judge_score); a pairwise one compares two, judged in both orders, so a judge that
    always says "A" gives exactly 1/2, and "the longer answer wins" gives the pointwise length
    judge's win rate on the same answers."""
    (tmp_path / "myjudges.py").write_text(JUDGES)
    monkeypatch.syspath_prepend(str(tmp_path))
    import myjudges
    sft = str(micro_run / "sft" / "ckpt.pt")
    args = ["--models", f"dpo={micro_run / 'dpo' / 'ckpt.pt'}", "--sft", sft, "--reward_model", "",
            "--prompts", str(micro_run / "world" / "prompts_eval.jsonl"), "--n_prompts", "8",
            "--max_new_tokens", "16"]
    point = evaluate.main(args + ["--judge", "myjudges:length"])["dpo"]
    sft_answers, dpo_answers = myjudges.CALLS  # SFT's baseline set first, then the model's
    by_hand = evaluate.win_rate([len(a) for a in dpo_answers], [len(a) for a in sft_answers])
    assert point["win_rate_vs_sft"] == by_hand[0] and point["win_rate_judge"] == "myjudges:length"
    assert point["judge_score"] == sum(map(len, dpo_answers)) / 8 and point["gold_score"] is None
    pair = evaluate.main(args + ["--judge", "myjudges:longer"])["dpo"]
    assert pair["win_rate_vs_sft"] == point["win_rate_vs_sft"] and pair["judge_score"] is None
    biased = evaluate.main(args + ["--judge", "myjudges:always_a"])["dpo"]
    assert biased["win_rate_vs_sft"] == 0.5 and biased["win_rate_judge"] == "myjudges:always_a"
    with pytest.raises(ValueError, match="judge myjudges:too_few: expected 8 numbers"):
        evaluate.main(args + ["--judge", "myjudges:too_few"])
    with pytest.raises(SystemExit, match="found one of 1 required arguments"):
        evaluate.main(args + ["--judge", "myjudges:one_argument"])
