"""The built-in world: determinism, the gold judge's rankings, the annotator's noise, the
verifiable task, and the exactness of the generator's log-probabilities (the entropy floor)."""

import collections
import json
import math
import random

import pytest

from nanoalign import world as w
from nanoalign.tokenizer import load_tokenizer, save_tokenizer, train_bpe

SCALE = 0.02  # ~240 pretraining documents, 160 SFT examples: a world in well under a second


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    w.write(str(out), w.build(seed=0, scale=SCALE))
    return out


def read_dir(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(small_world, tmp_path):
    w.main(["--out", str(tmp_path / "a"), "--seed", "0", "--scale", str(SCALE)])
    w.main(["--out", str(tmp_path / "b"), "--seed", "1", "--scale", str(SCALE)])
    same, other = read_dir(tmp_path / "a"), read_dir(tmp_path / "b")
    assert same == read_dir(small_world)
    assert same.keys() == other.keys() and same["pretrain.txt"] != other["pretrain.txt"]


def test_files_follow_the_documented_formats(small_world):
    rows = lambda name: [json.loads(x) for x in (small_world / name).read_text().splitlines()]
    docs = (small_world / "pretrain.txt").read_text().split("\n\n")
    assert all(d and "<|" not in d for d in docs)
    pref_keys = {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"}
    for name, keys in [("sft_train.jsonl", {"prompt", "response"}),
                       ("prompts_eval.jsonl", {"prompt"}), ("prefs_train.jsonl", pref_keys),
                       ("verifiable_val.jsonl", {"prompt", "answer", "response"})]:
        for r in rows(name):
            assert set(r) == keys
            assert all("\n\n" not in str(v) and "<|" not in str(v) for v in r.values())
    prefs = rows("prefs_train.jsonl") + rows("prefs_val.jsonl")
    assert all(p["chosen"] != p["rejected"] for p in prefs)
    val_docs = (small_world / "pretrain_val.txt").read_text().split("\n\n")
    assert len(json.loads((small_world / "pretrain_val_logp.json").read_text())) == len(val_docs)


def test_eval_prompts_are_disjoint_from_every_training_prompt_and_verifiable_splits_are_disjoint(
        small_world):
    lines = lambda name: (small_world / name).read_text().splitlines()
    prompts = lambda name: {json.loads(x)["prompt"] for x in lines(name)}
    evals = prompts("prompts_eval.jsonl")
    for name in ["sft_train.jsonl", "sft_val.jsonl", "prefs_train.jsonl", "prefs_val.jsonl",
                 "prompts_rl.jsonl", "verifiable_train.jsonl"]:
        assert not evals & prompts(name), name
    assert not prompts("verifiable_train.jsonl") & prompts("verifiable_val.jsonl")


# ------------------------------------------------------------ the gold judge
STORY = "Tell me a story about a dog in the park."
GOOD = ("Once upon a time, a little dog named Tom lived in the park. Tom found a red ball. "
        "Tom was very happy. The end.")


def test_judge_prefers_on_topic_answers():
    off_topic = GOOD.replace("dog", "cat").replace("park", "forest")
    half = GOOD.replace("park", "forest")
    assert w.gold_score(STORY, GOOD) > w.gold_score(STORY, half) > w.gold_score(STORY, off_topic)


def test_judge_prefers_positive_sentiment():
    sad, neutral = GOOD.replace("happy", "sad"), GOOD.replace(" Tom was very happy.", "")
    assert w.gold_score(STORY, GOOD) > w.gold_score(STORY, sad)
    assert w.gold_score(STORY, GOOD) > w.gold_score(STORY, neutral) > w.gold_score(STORY, sad)


def test_judge_prefers_a_clean_ending_over_none_and_a_cut_off_one():
    no_end, cut = GOOD.replace(" The end.", ""), GOOD.replace(" The end.", "")[:-12]
    assert w.gold_score(STORY, GOOD) > w.gold_score(STORY, no_end) > w.gold_score(STORY, cut)


def test_judge_penalises_rambling_beyond_the_sentence_limit():
    extra = " ".join(["Tom ran.", "Tom ate a cake.", "Tom went to the lake.", "The sun was warm.",
                      "Tom sang again."])
    rambling = GOOD.replace(" The end.", " " + extra + " The end.")
    assert w.gold_score(STORY, rambling) < w.gold_score(STORY, GOOD) - 0.4


def test_judge_penalises_repeated_sentences_and_words():
    repeated = GOOD.replace("Tom found a red ball.", " ".join(["Tom found a red ball."] * 3))
    stutter = GOOD.replace("very happy", "very happy happy happy")
    assert w.gold_score(STORY, repeated) < w.gold_score(STORY, GOOD) - 0.5
    assert w.gold_score(STORY, stutter) < w.gold_score(STORY, GOOD)


def test_judge_scores_the_empty_response_lowest():
    worst = ["", "   ", "the the the the the the", "zzz qqq", GOOD[:5], "Tom. " * 40]
    assert w.gold_score(STORY, "") == w.JUDGE_MIN
    assert all(w.gold_score(STORY, r) > w.JUDGE_MIN for r in worst if r.strip())


def test_judge_prefers_the_correct_answer_to_a_question():
    q = "Tom went to the park. Anna went to the lake. Where did Tom go?"
    assert w.gold_score(q, "Tom went to the park.") > w.gold_score(q, "Tom went to the lake.")
    q = "Tom has two apples and finds three more. How many apples does Tom have?"
    assert w.gold_score(q, "Tom has five apples.") > w.gold_score(q, "Tom has six apples.")


def test_positive_words_saturate_and_spamming_them_lowers_the_score():
    scores = []
    words = ["happy", "glad", "joyful", "proud", "excited", "cheerful", "calm"]
    for k in range(1, 8):
        feelings = " ".join(f"Tom felt {f}." for f in words[:k])
        story = f"Once upon a time, a dog named Tom lived in the park. {feelings} The end."
        scores.append(w.gold_score(STORY, story))
    gains = [b - a for a, b in zip(scores, scores[1:])]
    assert gains[0] > gains[1] > 0  # diminishing returns
    # gushing costs more than it gains
    assert max(scores) < w.JUDGE_MAX and scores[-1] < max(scores) - 0.3


def test_every_score_lies_within_the_documented_range(small_world):
    for line in (small_world / "prefs_train.jsonl").read_text().splitlines():
        r = json.loads(line)
        for resp in (r["chosen"], r["rejected"]):
            assert w.JUDGE_MIN < w.gold_score(r["prompt"], resp) <= w.JUDGE_MAX


# ------------------------------------------------------------ the verifiable task
def test_every_generated_problem_is_solvable_and_its_worked_response_passes_the_checker():
    rng = random.Random(0)
    for _ in range(500):
        p = w.verifiable_problem(rng)
        assert w.solve(p["prompt"]) == p["answer"]
        assert w.verifiable_reward(p["prompt"], p["response"], p["answer"]) == 1.0


def test_check_answer_reads_the_first_sentence_and_rejects_listing_candidates():
    assert w.check_answer("five", "Tom has five apples. Two and three make five.")
    assert w.check_answer("five", "Five.")
    # only the first sentence counts
    assert not w.check_answer("five", "Tom has six apples. No, five.")
    # listing every number
    assert not w.check_answer("five", "One two three four five six seven eight nine.")
    assert w.check_answer("park", "Tom went to the park.")
    assert not w.check_answer("park", "Tom went to the lake.")


# ------------------------------------------------------------ the annotator
def test_annotator_flip_rate_matches_the_expected_rate_within_sampling_error():
    rng = random.Random(0)
    margins = [rng.uniform(-1.5, 1.5) for _ in range(20000)]
    pairs = []
    for m in margins:
        a_wins = w.annotate(m, 0.0, rng)
        pairs.append((m, 0.0) if a_wins else (0.0, m))  # (gold_chosen, gold_rejected)
    expected, empirical = w.flip_rates(pairs)
    flips = [w.sigmoid(-abs(m) / w.TAU) for m in margins]
    se = math.sqrt(sum(p * (1 - p) for p in flips)) / len(margins)
    assert abs(empirical - expected) < 4 * se


def test_world_json_reports_a_flip_rate_consistent_with_its_pairs(small_world):
    stats = json.loads((small_world / "world.json").read_text())
    n = stats["counts"]["prefs_train.jsonl"] + stats["counts"]["prefs_val.jsonl"]
    assert abs(stats["empirical_flip_rate"] - stats["expected_flip_rate"]) < 4 * math.sqrt(0.25 / n)
    assert 0 < stats["sft_mean_gold"] < stats["judge_max"]


# ------------------------------------------------------------ the entropy floor
def test_same_document_always_gets_the_same_logprob_and_frequencies_match_it():
    """If two derivations could give one text, that text would show two log-probs or appear more
    often than p says."""
    rng, n = random.Random(1), 10000
    logps = collections.defaultdict(set)
    for _ in range(n):
        doc, lp = w.web_document(rng)
        logps[doc].add(round(lp, 9))
    assert all(len(v) == 1 for v in logps.values())
    counts, logp = collections.Counter(), {}
    for _ in range(n):  # fact documents are frequent enough to compare counts with probabilities
        g = w.Gen(rng, w.WEB_STYLES)
        doc = " ".join(w.fact_doc(g))
        counts[doc] += 1
        logp[doc] = g.logprob()
    # chosen by p, not by count (no selection bias)
    frequent = [d for d in logp if math.exp(logp[d]) > 2e-3]
    assert len(frequent) > 20
    for d in frequent:
        p = math.exp(logp[d])
        assert abs(counts[d] / n - p) < 4.5 * math.sqrt(p * (1 - p) / n), d


def test_entropy_floor_is_positive_and_below_the_unigram_entropy(small_world):
    path = small_world / "tok.tiktoken"
    save_tokenizer(train_bpe((small_world / "pretrain.txt").read_text(), 300), str(path))
    tok = load_tokenizer(str(path))
    floor = w.entropy_floor_nats_per_token(str(small_world), tok)
    ids = []
    for d in (small_world / "pretrain_val.txt").read_text().split("\n\n"):
        ids += tok.encode(d) + [tok.eot_id]
    freq = collections.Counter(ids)
    unigram = -sum(c / len(ids) * math.log(c / len(ids)) for c in freq.values())
    assert 0 < floor < unigram
    # the pretraining stage, which never imports the world, logs the same floor from the file
    from nanoalign.train_pretrain import reference_losses, tokenize_file
    val = tokenize_file(str(small_world / "pretrain_val.txt"), tok)
    lines = reference_losses(val, tok, str(small_world / "pretrain_val_logp.json"))
    assert lines["entropy_floor"] == pytest.approx(floor, rel=1e-12)
    assert lines["unigram_entropy"] == pytest.approx(unigram, rel=1e-9)
    other = small_world / "other_logp.json"  # the log-probs of another text are refused
    other.write_text(json.dumps([1.0, 2.0]))
    with pytest.raises(ValueError, match="val_nll"):
        reference_losses(val, tok, str(other))
