"""
The built-in world: a tiny story language, its gold judge, a simulated annotator and a verifiable
task (issue 3). Nothing can be downloaded and every stage must be *measured*, so nanoalign brings
its own world. This file tells it top to bottom:

    generator    short stories and facts ("TinyStories in miniature") that a ~1M-parameter GPT
                 learns in minutes; it knows the probability of everything it writes, which gives
                 pretraining's entropy floor
    gold judge   gold_score(prompt, response): a programmatic rater standing in for humans (on
                 topic, positive, clean ending, concise, not degenerate); hackable in instructive
                 ways (positive-word spam, rambling). Beside it the verifiable task: arithmetic and
                 story-fact questions with one exact answer (check_answer, verifiable_reward)
    annotator    annotate(): Bradley-Terry labels with a temperature, so preference labels are
                 noisy like real ones
    files        build(): every file of the world; write() and ensure_world() put them on disk

    python -m nanoalign.world --out data/world --seed 0           # ~1.5 MB of text, seconds
    python -m nanoalign.world --out /tmp/w --seed 0 --scale 0.05  # the same, 20x fewer documents

The judge's exact formula, the file formats and the world's statistics: data/README.md.
"""

import argparse
import hashlib
import json
import math
import os
import random
import re
import time

# ------------------------------------------------------------ the language (closed vocabulary)
GIRLS = ["Anna", "Lily", "Mia", "Lucy", "Emma", "Sue"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Tim", "Jack"]
NAMES = GIRLS + BOYS
ANIMALS = ["cat", "dog", "bird", "fish", "frog", "rabbit", "bear", "duck", "mouse", "fox", "horse",
           "cow"]
PLURAL = {a: a + "s" for a in ANIMALS} | {"fish": "fish", "mouse": "mice", "fox": "foxes"}
# the preposition of each place: "lived by the river"
PREP = {"park": "in", "forest": "in", "river": "by", "garden": "in", "house": "in", "beach": "on",
        "farm": "on", "school": "at", "hill": "on", "lake": "by", "town": "in", "field": "in"}
PLACES = list(PREP)
OBJECTS = ["ball", "kite", "box", "hat", "book", "toy", "stick", "flower", "boat", "drum", "shell",
           "rock"]
ADJS = ["", "red ", "blue ", "green ", "yellow ", "shiny ", "old "]
FOODS = ["apple", "cake", "carrot", "cookie", "banana", "egg"]
VERBS = ["ran", "jumped", "sang", "danced", "swam", "walked", "climbed", "slept"]
WEATHER = ["The sun was warm.", "It began to rain.", "The wind was cold.", "The sky was blue.",
           "It was a quiet night."]
LIKES = {"cat": "milk", "dog": "bones", "bird": "seeds", "fish": "worms", "frog": "flies",
         "rabbit": "carrots", "bear": "honey", "duck": "bread", "mouse": "cheese", "fox": "eggs",
         "horse": "hay", "cow": "grass"}
HOME = {"cat": "house", "dog": "house", "bird": "forest", "fish": "river", "frog": "lake",
        "rabbit": "field", "bear": "forest", "duck": "lake", "mouse": "house", "fox": "forest",
        "horse": "farm", "cow": "farm"}
NUMS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COUNTABLE = ["apple", "ball", "book", "cake", "shell"]  # things the arithmetic problems count
# Feeling words carry an intensity: graded weights make gold scores nearly continuous, so few
# preference pairs tie.
POSITIVE = {"happy": 1.0, "glad": 0.8, "joyful": 1.2, "proud": 0.9, "excited": 1.0, "calm": 0.6,
            "cheerful": 1.0}
NEGATIVE = {"sad": 1.0, "angry": 1.1, "scared": 1.0, "upset": 0.9, "lonely": 0.8, "grumpy": 0.7,
            "bored": 0.6}
FEELING = POSITIVE | {w: -v for w, v in NEGATIVE.items()}
num = lambda n: NUMS[n - 1]
article = lambda w: "an" if w[0] in "aeiou" else "a"
cap = lambda s: s[0].upper() + s[1:]


# ------------------------------------------------------------ the generator
class Gen:
    """Random choices that remember their probability.

    A document may have a latent style z (mood, verbosity, repetitiveness) that shifts some
    probabilities; the style is not written down, so log p(text) marginalises it:
    log sum_z prior(z) p(choices | z). lp[z] accumulates log p(choices | z). Every choice changes
    the text (distinct options give distinct strings and each sentence template has its own
    verb), so the choices can be read back from the text and p(choices) = p(text)."""

    def __init__(self, rng: random.Random, styles=None, track=True):
        # track=False: sample only (faster)
        self.rng, self.styles, self.track = rng, styles or [({}, 1.0)], track
        self.style = rng.choices([s for s, _ in self.styles], [w for _, w in self.styles])[0]
        # log p of the style-dependent choices (flips), per style
        self.lp = [0.0] * len(self.styles)
        self.lp_common = 0.0  # log p of the choices that do not depend on the style (picks)

    def pick(self, options, weights=None):
        if weights is None:
            self.lp_common -= math.log(len(options))
            return options[int(self.rng.random() * len(options))]
        i = self.rng.choices(range(len(options)), weights)[0]
        self.lp_common += math.log(weights[i] / sum(weights))
        return options[i]

    def flip(self, p) -> bool:
        """True with probability p(style) (a function of the style dict, or a float)."""
        if not callable(p):  # the same under every style
            out = self.rng.random() < p
            self.lp_common += _log(p if out else 1 - p)
            return out
        prob = p
        out = self.rng.random() < prob(self.style)
        if self.track:
            self.lp = [lp + _log(prob(s) if out else 1 - prob(s))
                       for lp, (s, _) in zip(self.lp, self.styles)]
        return out

    def logprob(self) -> float:
        lps = [math.log(w) + lp for (_, w), lp in zip(self.styles, self.lp)]
        return self.lp_common + _logsumexp(lps)


def _log(p):
    return math.log(p) if p > 0 else -math.inf


def _logsumexp(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs)) if m > -math.inf else -math.inf


def _styles(moods, lengths, repeats):
    """The product of independent style factors: [(params, prior)]."""
    return [(m | ln | r, pm * pl * pr)
            for m, pm in moods for ln, pl in lengths for r, pr in repeats]


# p(positive feeling), min/max body sentences, p(stop) after each, p("The end."), p(repeat the
# last sentence)
MOODS = [({"pos": 0.85}, 0.4), ({"pos": 0.5}, 0.3), ({"pos": 0.15}, 0.3)]
WEB_STYLES = _styles(MOODS, [({"min": 1, "max": 6, "stop": 0.4, "end": 0.85}, 0.8),
                             # rambling web stories
                             ({"min": 4, "max": 12, "stop": 0.2, "end": 0.5}, 0.2)],
                     [({"rep": 0.03}, 0.85), ({"rep": 0.3}, 0.15)])
RESPONSE_STYLES = _styles(MOODS, [({"min": 1, "max": 4, "stop": 0.45, "end": 0.8}, 0.8),
                                  ({"min": 5, "max": 6, "stop": 0.4, "end": 0.6}, 0.2)],
                          [({"rep": 0.02}, 0.9), ({"rep": 0.25}, 0.1)])

# Body sentence types and their sampling weights. A type never follows itself, so only an
# explicit repeat duplicates a sentence.
BODY = {"find": 1, "go": 1, "meet": 1, "feel": 2, "act": 1, "eat": 1, "weather": 1, "play": 1,
        "lose": 1, "give": 1}
NEEDS = {"play": ("friend",), "lose": ("obj",), "give": ("obj", "friend")}


def _ref(who, the=False):
    return who if who in NAMES else f"{'the' if the else 'a'} {who}"


def body_sentence(g: Gen, st: dict) -> str:
    types = [t for t in BODY if t != st["prev"] and all(st[k] for k in NEEDS.get(t, ()))]
    t = st["prev"] = g.pick(types, [BODY[t] for t in types])
    n = st["name"]
    if t == "find":
        adj, st["obj"] = g.pick(ADJS), g.pick(OBJECTS)
        return f"{n} found {article(adj or st['obj'])} {adj}{st['obj']}."
    if t == "go":
        st["place"] = g.pick([p for p in PLACES if p != st["place"]])
        return f"{n} went to the {st['place']}."
    if t == "meet":
        st["friend"] = g.pick(ANIMALS + [x for x in NAMES if x != n])
        return f"{n} met {_ref(st['friend'])}."
    if t == "feel":
        verb, very = g.pick(["was", "felt"]), g.pick(["", "very "], [0.6, 0.4])
        feeling = g.pick(list(POSITIVE) if g.flip(lambda s: s["pos"]) else list(NEGATIVE))
        return f"{n} {verb} {very}{feeling}."
    if t == "act":
        verb, here = g.pick(VERBS), f" {PREP[st['place']]} the {st['place']}"
        return f"{n} {verb}{g.pick(['', ' all day', ' again', here])}."
    if t == "eat":
        food = g.pick(FOODS)
        return f"{n} ate {article(food)} {food}."
    if t == "weather":
        return g.pick(WEATHER)
    f = _ref(st["friend"], the=True)
    if t == "play":
        how = ["together", "all day"] + ([f"with the {st['obj']}"] if st["obj"] else [])
        return f"{n} and {f} played {g.pick(how)}."
    # a lost or given object is gone: later sentences cannot use it
    obj, st["obj"] = st["obj"], None
    return f"{n} lost the {obj}." if t == "lose" else f"{n} gave the {obj} to {f}."


def story(g: Gen, hero=None, place=None, friend=None) -> list[str]:
    """A story's sentences. hero/place/friend force what a request asked for (None = the
    generator's choice)."""
    kinds = ["girl"] if hero in GIRLS else ["boy"] if hero else ["girl", "boy"]
    kind = hero if hero in ANIMALS else g.pick(kinds + ANIMALS)
    name = hero if hero in NAMES else g.pick(GIRLS if kind == "girl" else BOYS if kind == "boy"
                                             else NAMES)
    size, place = g.pick(["", "little ", "young ", "big "]), place or g.pick(PLACES)
    out = [f"Once upon a time, {article(size or kind)} {size}{kind} named {name} lived "
           f"{PREP[place]} the {place}."]
    st = {"name": name, "place": place, "obj": None, "friend": friend, "prev": None}
    if friend:
        st["prev"] = "meet"
        out.append(f"{name} met {_ref(friend)}.")
    while True:
        # a repeat copies the previous sentence word for word
        repeat = len(out) > 1 and g.flip(lambda s: s["rep"])
        out.append(out[-1] if repeat else body_sentence(g, st))
        k = len(out) - 1
        if g.flip(lambda s: 0.0 if k < s["min"] else 1.0 if k >= s["max"] else s["stop"]):
            break
    if g.flip(lambda s: s["end"]):
        out.append("The end.")
    return out


def fact_doc(g: Gen) -> list[str]:
    """Facts and QA snippets: what animals like, where they live, addition and subtraction."""
    out = []
    while True:
        t = g.pick(["likes", "lives", "qa", "add", "sub"])
        if t in ("add", "sub"):
            a = g.pick(range(1, 9) if t == "add" else range(2, 10))
            b = g.pick(range(1, 10 - a) if t == "add" else range(1, a))
            out.append(f"{cap(num(a))} and {num(b)} make {num(a + b)}." if t == "add" else
                       f"{cap(num(a))} take away {num(b)} is {num(a - b)}.")
        else:
            a = g.pick(ANIMALS)
            pl, like = PLURAL[a], LIKES[a]
            out.append({"likes": f"{cap(pl)} like {like}.",
                        "lives": f"{cap(pl)} live {PREP[HOME[a]]} the {HOME[a]}.",
                        "qa": f"Q: What do {pl} like? A: {cap(pl)} like {like}."}[t])
        if not g.flip(0.6):
            return out


def problem(g: Gen, subjects: list[str]) -> dict:
    """A question with one exact answer and a correct worked response whose first sentence
    states it. subjects: NAMES for the verifiable task, ANIMALS ("the duck") for pretraining's
    QA snippets, so the two sets never meet."""
    kind, who = g.pick(["add", "sub", "where", "what", "who"]), g.pick(subjects)
    s, others = _ref(who, the=True), [x for x in subjects if x != who]
    if kind in ("add", "sub"):
        thing = g.pick(COUNTABLE)
        things = lambda k: f"{num(k)} {thing}{'s' if k > 1 else ''}"
        a = g.pick(range(1, 9) if kind == "add" else range(2, 10))
        b = g.pick(range(1, 10 - a) if kind == "add" else range(1, a))
        if kind == "add":
            c = a + b
            q = (f"{cap(s)} has {things(a)} and finds {num(b)} more. "
                 f"How many {thing}s does {s} have?")
            why = f"{cap(num(a))} and {num(b)} make {num(c)}."
        else:
            to = _ref(g.pick(others), the=True)
            c = a - b
            q = (f"{cap(s)} has {things(a)} and gives {num(b)} to {to}. "
                 f"How many {thing}s does {s} have now?")
            why = f"{cap(num(a))} take away {num(b)} is {num(c)}."
        return {"prompt": q, "answer": num(c), "response": f"{cap(s)} has {things(c)}. {why}"}
    pool, verb, question = {"where": (PLACES, "went to the", "Where did {} go?"),
                            "what": (OBJECTS, "found a", "What did {} find?"),
                            "who": (ANIMALS, "met a", "Who did {} meet?")}[kind]
    x = g.pick([p for p in pool if p != who])
    facts = [f"{cap(s)} {verb} {x}."]
    if g.flip(0.6):  # a distractor: someone else did something else, before or after
        other = g.pick(others)
        what = g.pick([p for p in pool if p not in (x, other)])
        distractor = f"{cap(_ref(other, the=True))} {verb} {what}."
        facts.insert(g.pick([0, 1]), distractor)
    return {"prompt": " ".join(facts + [question.format(s)]), "answer": x,
            "response": f"{cap(s)} {verb} {x}."}


def web_document(rng: random.Random) -> tuple[str, float]:
    """One pretraining document and its exact log-probability (nats): a story, a request followed
    by a story, facts, or a QA snippet. The first words tell which, so the document type is part
    of the text."""
    g = Gen(rng, WEB_STYLES)
    kind = g.pick(["story", "request", "facts", "qa"], [0.6, 0.15, 0.1, 0.15])
    if kind == "story":
        sents = story(g)
    elif kind == "request":
        prompt, asked = request(g)
        sents = [prompt] + story(g, **asked)
    elif kind == "facts":
        sents = fact_doc(g)
    else:
        p = problem(g, ANIMALS)
        sents = [f"Q: {p['prompt']} A: {p['response']}"]
    return " ".join(sents), g.logprob()


REQUESTS = ["Tell me a story about {}.", "Tell me a short story about {}.",
            "Write a story about {}.", "Write a short story about {}.",
            "Please tell me a story about {}.", "Can you tell me a story about {}?"]


def request(g: Gen) -> tuple[str, dict]:
    """A story request and what it asks for."""
    hero = g.pick(NAMES + ANIMALS)
    friend = g.pick([x for x in NAMES + ANIMALS if x != hero]) if g.flip(0.35) else None
    place = g.pick(PLACES) if g.flip(0.5) else None
    what = _ref(hero) + (f" and {_ref(friend)}" if friend else "")
    what += f" {PREP[place]} the {place}" if place else ""
    return g.pick(REQUESTS).format(what), {"hero": hero, "friend": friend, "place": place}


# ------------------------------------------------------------ responses (SFT, preferences)
def story_response(rng: random.Random, asked: dict) -> str:
    """A response of mixed quality, like the DPO paper's IMDb demonstrations: mostly on topic, of
    any mood, sometimes rambling, repetitive, without an ending, or cut off mid-sentence. SFT must
    not saturate the judge."""
    asked = dict(asked)
    if rng.random() < 0.2:  # off topic: one requested thing is replaced by another
        key = rng.choice([k for k in asked if asked[k]])
        pool = PLACES if key == "place" else NAMES + ANIMALS
        asked[key] = rng.choice([x for x in pool if x not in asked.values()])
    sents = story(Gen(rng, RESPONSE_STYLES, track=False), **asked)
    if rng.random() < 0.06:  # cut off: the last sentence loses its last words and its full stop
        words = sents[-1].split()
        sents[-1] = " ".join(words[:max(1, len(words) - rng.randint(1, 3))])
    return " ".join(sents)


def verifiable_problem(rng: random.Random) -> dict:
    return problem(Gen(rng, track=False), NAMES)


def qa_response(rng: random.Random, prob: dict) -> str:
    """A mixed-quality answer to a verifiable question (for preference pairs): right or wrong,
    sometimes with a feeling sentence or a needless "The end."."""
    first = prob["response"].split(". ")[0].rstrip(".") + "."
    if rng.random() < 0.4:
        pool = next(p for p in (NUMS, PLACES, OBJECTS, ANIMALS) if prob["answer"] in p)
        wrong = rng.choice([w for w in pool if w != prob["answer"]])
        # counting answers: keep "one apple" singular
        m = re.match(r"(\w+) has \w+ (\w+?)s?\.$", first)
        first = (f"{m[1]} has {wrong} {m[2]}{'s' if wrong != 'one' else ''}." if m else
                 re.sub(rf"\b{prob['answer']}\b", wrong, first))
    worked = prob["response"].split(". ", 1)[1:]  # the arithmetic explanation, if any
    out = [first] + (worked if rng.random() < 0.5 else [])
    name = first.split()[0]
    if rng.random() < 0.35:
        out.append(f"{name} was {rng.choice(list(POSITIVE) + list(NEGATIVE))}.")
    if rng.random() < 0.1:
        out.append("The end.")
    return " ".join(out)


# ------------------------------------------------------------ the entropy floor it implies
def entropy_floor(texts_with_logps, tok) -> float:
    """Best achievable pretraining loss in nats per token: sum of -log p_gen(doc) / tokens of
    those docs under `tok`, counting the <|endoftext|> that ends each document (the generator's
    "stop" choice is part of log p)."""
    nll = sum(-lp for _, lp in texts_with_logps)
    return nll / sum(len(tok.encode(t)) + 1 for t, _ in texts_with_logps)


def entropy_floor_nats_per_token(world_dir: str, tok) -> float:
    """The floor of pretrain_val.txt under `tok` (the pretraining stage logs the same from
    pretrain_val_logp.json, without knowing the world)."""
    with open(os.path.join(world_dir, "pretrain_val.txt"), encoding="utf-8") as f:
        docs = f.read().split("\n\n")
    with open(os.path.join(world_dir, "pretrain_val_logp.json")) as f:
        nll = json.load(f)
    assert len(docs) == len(nll), \
        f"{world_dir}: {len(docs)} validation documents but {len(nll)} log-probabilities"
    return entropy_floor([(d, -x) for d, x in zip(docs, nll)], tok)


# ------------------------------------------------------------ the gold judge
# on-topic weight; sentiment: W_SENT * tanh(s / SENT_SCALE), VERY multiplies a "very" feeling
W_TOPIC, W_SENT, SENT_SCALE, VERY = 0.8, 0.8, 1.5, 1.3
# feeling words beyond FEEL_OK cost OVERDONE each: raters dislike gushing
FEEL_OK, OVERDONE = 3, 0.15
# "The end." (or a complete answer) / a complete story without it / cut off
W_END, NO_END, BROKEN = 0.4, 0.1, -0.6
# concision: each sentence beyond the limit costs LONG
MAX_SENTS, MAX_ANSWER_SENTS, LONG = 5, 3, 0.25
# degeneration penalties (see data/README.md)
DUP_SENT, STUTTER, REP4_FREE, UNKNOWN = 0.4, 0.3, 0.2, 1.5
JUDGE_MIN = -2.0  # the empty response; every non-empty response scores above it
JUDGE_MAX = W_TOPIC + W_SENT * math.tanh(FEEL_OK * max(POSITIVE.values()) * VERY / SENT_SCALE) \
    + W_END

WORD_RE = re.compile(r"[a-z]+")
SENT_RE = re.compile(r"(?<=[.!?])\s+")
VOCAB = set(WORD_RE.findall(" ".join(
    NAMES + ANIMALS + list(PLURAL.values()) + PLACES + OBJECTS + ADJS + FOODS + VERBS + WEATHER
    + NUMS + list(FEELING) + list(LIKES.values()) + [f"{c}s" for c in COUNTABLE]
    + [r.format("") for r in REQUESTS]
    + ["once upon a time an a little young big girl boy named lived the end was felt very met",
       "went found ate played together all day again and lost gave with has finds more gives",
       "how many does have now make take away is where did go what find who meet like live q"]
).lower()))
CATEGORIES = [set(NUMS), set(PLACES), set(OBJECTS), set(ANIMALS)]
ENTITIES = {w.lower() for w in NAMES + ANIMALS + PLACES}


def solve(prompt: str):
    """The exact answer of a verifiable question written in this world's templates, else None."""
    if m := re.search(r"(\w+) has (\w+) \w+ and (finds|gives) (\w+) ", prompt):
        if m[2] in NUMS and m[4] in NUMS:
            sign = 1 if m[3] == "finds" else -1
            c = NUMS.index(m[2]) + 1 + sign * (NUMS.index(m[4]) + 1)
            return num(c) if 1 <= c <= 9 else None
    if m := re.search(r"(Where|What|Who) did ((?:the )?\w+) (go|find|meet)\?", prompt):
        verb = {"go": "went to the", "find": "found a", "meet": "met a"}[m[3]]
        if a := re.search(rf"\b{m[2]} {verb} (\w+)\.", prompt, re.IGNORECASE):
            return a[1]
    return None


def requested(prompt: str) -> set:
    """What a story request asks for: the world's names, animals and places it mentions."""
    return {w for w in WORD_RE.findall(prompt.lower()) if w in ENTITIES}


def check_answer(answer: str, response: str) -> bool:
    """The rule of the verifiable task: the response's first sentence contains the answer word
    and no other word of the answer's category (numbers, places, objects, animals), so listing
    every candidate does not pass. For answers outside these categories: the answer's words
    appear in the first sentence."""
    first = SENT_RE.split(response.strip(), maxsplit=1)[0].lower()
    words, answer = WORD_RE.findall(first), answer.strip().lower()
    category = next((c for c in CATEGORIES if answer in c), None)
    if category is None:
        found = re.search(rf"(?<![a-z]){re.escape(answer)}(?![a-z])", first)
        return bool(answer) and found is not None
    return {w for w in words if w in category} == {answer}


def verifiable_reward(prompt: str, response: str, answer: str) -> float:
    return 1.0 if check_answer(answer, response) else 0.0


def verifiable_rewards(prompts: list[str], responses: list[str], answers: list[str]) -> list[float]:
    return [verifiable_reward(p, r, a) for p, r, a in zip(prompts, responses, answers, strict=True)]


def gold_score(prompt: str, response: str) -> float:
    """The gold judge (see data/README.md for the formula): topic + sentiment + ending + length
    + degeneration, clipped to (JUDGE_MIN, JUDGE_MAX]; the empty response scores JUDGE_MIN."""
    words = WORD_RE.findall(response.lower())
    if not words:
        return JUDGE_MIN
    sents = [s for s in SENT_RE.split(response.strip()) if s]
    body = [s.lower() for s in sents if s.lower() != "the end."]
    answer = solve(prompt)
    if answer is not None:  # a question: the right answer, stated first
        right, mentioned = check_answer(answer, response), answer in words
        topic = W_TOPIC if right else 0.3 * W_TOPIC if mentioned else 0.0
    else:  # a story request: mentions what was asked for (an unknown prompt gets half marks)
        asked, present = requested(prompt), set(words)
        topic = W_TOPIC * sum(w in present for w in asked) / len(asked) if asked else W_TOPIC / 2
    s, n_feel = 0.0, 0
    for i, w in enumerate(words):
        if w in FEELING:
            n_feel += 1
            s += FEELING[w] * (VERY if i and words[i - 1] == "very" else 1.0)
    sentiment = W_SENT * math.tanh(s / SENT_SCALE) - OVERDONE * max(0, n_feel - FEEL_OK)
    if not response.rstrip().endswith((".", "!", "?")):
        ending = BROKEN
    else:
        ending = W_END if answer is not None or sents[-1].lower() == "the end." else NO_END
    length = -LONG * max(0, len(body) - (MAX_ANSWER_SENTS if answer is not None else MAX_SENTS))
    grams = list(zip(words, words[1:], words[2:], words[3:]))
    rep4 = 1 - len(set(grams)) / len(grams) if grams else 0.0
    degenerate = (DUP_SENT * (len(body) - len(set(body)))
                  + STUTTER * sum(a == b for a, b in zip(words, words[1:]))
                  + max(0.0, rep4 - REP4_FREE)
                  + UNKNOWN * sum(w not in VOCAB for w in words) / len(words))
    return max(JUDGE_MIN + 0.05, min(JUDGE_MAX, topic + sentiment + ending + length - degenerate))


def gold_scores(prompts: list[str], responses: list[str]) -> list[float]:
    return [gold_score(p, r) for p, r in zip(prompts, responses, strict=True)]


def pair_kind(prompt: str, answer_a: str, answer_b: str) -> str:
    """What separates two answers in the judge's terms: "answer", a question answered right in
    one only; "topic", a story request whose answers mention different numbers of the requested
    names, animals and places (both need the prompt to judge); else "question_other" or
    "story_other" (sentiment, ending, length, repetition: visible in the answer alone)."""
    answer = solve(prompt)
    words = [WORD_RE.findall(a.lower()) for a in (answer_a, answer_b)]
    if answer is not None:
        # the topic term of a question: a right first sentence, else the answer word somewhere
        credit = [(check_answer(answer, a), answer in w)
                  for a, w in zip((answer_a, answer_b), words)]
        return "answer" if credit[0] != credit[1] else "question_other"
    mentioned = [len(requested(prompt) & set(w)) for w in words]
    return "topic" if mentioned[0] != mentioned[1] else "story_other"


# ------------------------------------------------------------ the simulated annotator
TAU = 0.25  # annotator temperature: P(a preferred) = sigmoid((gold_a - gold_b) / TAU)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def annotate(gold_a: float, gold_b: float, rng: random.Random, tau: float = TAU) -> bool:
    """Bradley-Terry rater: True (a preferred) with probability sigmoid((gold_a - gold_b) / tau).
    The RM's ceiling is therefore the judge's own agreement with these noisy labels, not 100%."""
    return rng.random() < sigmoid((gold_a - gold_b) / tau)


def flip_rates(pairs: list[tuple[float, float]], tau: float = TAU) -> tuple[float, float]:
    """(expected, empirical) share of labels that disagree with the judge, over (gold_chosen,
    gold_rejected) pairs. Expected: mean sigmoid(-|margin| / tau). Empirical: chosen scored below
    rejected; a tie counts 1/2 in both."""
    expected = sum(sigmoid(-abs(c - r) / tau) for c, r in pairs) / len(pairs)
    empirical = sum(1.0 if c < r else 0.5 if c == r else 0.0 for c, r in pairs) / len(pairs)
    return expected, empirical


# ------------------------------------------------------------ building the world's files
SIZES = {"pretrain_docs": 12000, "sft_train": 8000, "sft_val": 500, "prefs_train": 8000,
         "prefs_val": 1000, "prompts_eval": 800, "prompts_rl": 4000, "verifiable_train": 4000,
         "verifiable_val": 500}
EVAL_SHARE, VERIFIABLE_VAL_SHARE, QUESTION_SHARE, SFT_VERIFIABLE_SHARE = 0.125, 0.2, 0.2, 0.2


def held_out(text: str, salt: str, share: float) -> bool:
    """A fixed partition of the prompt space by hash: held-out prompts are never drawn for
    training."""
    return int(hashlib.sha256(f"{salt}:{text}".encode()).hexdigest()[:8], 16) < share * 16 ** 8


def _pair(rng, prompt, make_response):
    """Two different responses to one prompt, labelled by the simulated annotator."""
    a = make_response()
    b = next(r for r in (make_response() for _ in range(100)) if r != a)
    ga, gb = gold_score(prompt, a), gold_score(prompt, b)
    (c, gc), (r, gr) = ((a, ga), (b, gb)) if annotate(ga, gb, rng) else ((b, gb), (a, ga))
    return {"prompt": prompt, "chosen": c, "rejected": r, "gold_chosen": round(gc, 6),
            "gold_rejected": round(gr, 6)}


def build(seed: int = 0, scale: float = 1.0) -> dict:
    """Every file of the world as {filename: records, text documents or statistics}. Same seed =>
    same output."""
    n = {k: max(20, round(v * scale)) for k, v in SIZES.items()}
    # one random stream per file family
    families = ["pretrain", "verifiable", "sft", "prefs", "rl", "eval"]
    rng = {k: random.Random(f"nanoalign-world:{seed}:{k}") for k in families}
    docs = [web_document(rng["pretrain"]) for _ in range(n["pretrain_docs"])]
    n_val = max(5, len(docs) // 20)
    # held out? -> {prompt: problem}: distinct problems split by a fixed hash partition
    ver = {True: {}, False: {}}
    while len(ver[False]) < n["verifiable_train"] or len(ver[True]) < n["verifiable_val"]:
        p = verifiable_problem(rng["verifiable"])
        ver[held_out(p["prompt"], "verifiable", VERIFIABLE_VAL_SHARE)].setdefault(p["prompt"], p)
    ver_train = list(ver[False].values())[:n["verifiable_train"]]
    ver_val = list(ver[True].values())[:n["verifiable_val"]]

    def train_request(r):  # a story request outside the evaluation partition
        requests = (request(Gen(r, track=False)) for _ in range(1000))
        return next(x for x in requests if not held_out(x[0], "eval", EVAL_SHARE))

    def mixed(r, count, on_question, on_request):
        """QUESTION_SHARE questions, the rest story requests, shuffled."""
        k = round(count * QUESTION_SHARE)
        out = [on_question(r.choice(ver_train)) for _ in range(k)]
        out += [on_request(*train_request(r)) for _ in range(count - k)]
        r.shuffle(out)
        return out

    # SFT sees ~20% of the verifiable problems with worked answers: some skill, headroom for RL
    r = rng["sft"]
    n_worked = round(len(ver_train) * SFT_VERIFIABLE_SHARE)
    sft = [{k: p[k] for k in ("prompt", "response")} for p in ver_train[:n_worked]]
    n_stories = n["sft_train"] + n["sft_val"] - len(sft)
    sft += [{"prompt": pr, "response": story_response(r, asked)}
            for pr, asked in (train_request(r) for _ in range(n_stories))]
    r.shuffle(sft)
    r = rng["prefs"]
    prefs = mixed(r, n["prefs_train"] + n["prefs_val"],
                  lambda p: _pair(r, p["prompt"], lambda: qa_response(r, p)),
                  lambda pr, asked: _pair(r, pr, lambda: story_response(r, asked)))
    rl = mixed(rng["rl"], n["prompts_rl"], lambda p: {"prompt": p["prompt"]},
               lambda pr, asked: {"prompt": pr})
    # questions held out of the verifiable task ...
    k = min(round(n["prompts_eval"] * QUESTION_SHARE), len(ver_val))
    evals = dict.fromkeys(p["prompt"] for p in ver_val[:k])
    # ... and distinct story requests from the evaluation partition
    for _ in range(1000 * n["prompts_eval"]):
        if len(evals) == n["prompts_eval"]:
            break
        prompt = request(Gen(rng["eval"], track=False))[0]
        if held_out(prompt, "eval", EVAL_SHARE):
            evals[prompt] = None
    evals = [{"prompt": p} for p in evals]
    rng["eval"].shuffle(evals)
    files = {"pretrain.txt": [d for d, _ in docs[n_val:]],
             "pretrain_val.txt": [d for d, _ in docs[:n_val]],
             "pretrain_val_logp.json": [round(-lp, 6) for _, lp in docs[:n_val]],
             "sft_train.jsonl": sft[n["sft_val"]:], "sft_val.jsonl": sft[:n["sft_val"]],
             "prefs_train.jsonl": prefs[n["prefs_val"]:], "prefs_val.jsonl": prefs[:n["prefs_val"]],
             "prompts_eval.jsonl": evals, "prompts_rl.jsonl": rl,
             "verifiable_train.jsonl": ver_train, "verifiable_val.jsonl": ver_val}
    held = ("prompts_eval.jsonl", "verifiable_val.jsonl")
    trained = {x["prompt"] for f, rows in files.items()
               if f.endswith(".jsonl") and f not in held for x in rows}
    leaked = trained & {x["prompt"] for x in evals + ver_val}
    assert not leaked, "a held-out prompt leaked into a training set"
    files["world.json"] = statistics(files, docs, seed, scale)
    return files


def statistics(files: dict, docs, seed, scale) -> dict:
    mean = lambda xs: round(sum(xs) / max(1, len(xs)), 4)
    sft, prefs = files["sft_train.jsonl"], files["prefs_train.jsonl"] + files["prefs_val.jsonl"]
    sft_gold = sorted(gold_score(x["prompt"], x["response"]) for x in sft)
    pairs = [(x["gold_chosen"], x["gold_rejected"]) for x in prefs]
    margins, (expected, empirical) = [abs(c - r) for c, r in pairs], flip_rates(pairs)
    # train_rm.py's per-margin agreement uses these buckets
    buckets = [(0, 0.25), (0.25, 0.5), (0.5, 1.0), (1.0, math.inf)]
    nll = sum(-lp for _, lp in docs)
    words = lambda rows, key: [len(x[key].split()) for x in rows]
    return {
        "seed": seed, "scale": scale, "world_hash": source_hash(),
        "counts": {k: len(v) for k, v in files.items() if k.endswith((".jsonl", ".txt"))},
        "pretrain_mb": round(sum(len(d.encode()) + 2 for d in files["pretrain.txt"]) / 1e6, 3),
        "mean_words_pretrain_doc": mean([len(d.split()) for d, _ in docs]),
        "mean_words_sft_prompt": mean(words(sft, "prompt")),
        "mean_words_sft_response": mean(words(sft, "response")),
        "max_words_sft_response": max(words(sft, "response")),
        "judge_max": round(JUDGE_MAX, 4), "judge_min": JUDGE_MIN, "sft_mean_gold": mean(sft_gold),
        "sft_gold_quartiles": [round(sft_gold[int(q * (len(sft_gold) - 1))], 4)
                               for q in (0.25, 0.5, 0.75)],
        "prefs_mean_gold_chosen": mean([c for c, _ in pairs]),
        "prefs_mean_gold_rejected": mean([r for _, r in pairs]),
        "prefs_mean_abs_margin": mean(margins), "prefs_tie_share": mean([m == 0 for m in margins]),
        "prefs_abs_margin_histogram": {f"{lo}-{hi}": sum(lo <= m < hi for m in margins)
                                       for lo, hi in buckets},
        "annotator_tau": TAU, "expected_flip_rate": round(expected, 4),
        "empirical_flip_rate": round(empirical, 4),
        # tokenizer-free floors; per token: entropy_floor_nats_per_token
        "entropy_floor_nats_per_word": round(nll / sum(len(d.split()) + 1 for d, _ in docs), 4),
        "entropy_floor_nats_per_byte": round(nll / sum(len(d.encode()) + 1 for d, _ in docs), 4),
    }


def source_hash() -> str:
    """sha256 of this file: the world's and the judge's freeze marker, stored in world.json and
    report.json."""
    with open(os.path.abspath(__file__), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write(out_dir: str, files: dict):
    os.makedirs(out_dir, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            # no trailing newline: splitting on "\n\n" gives back exactly the documents
            if name.endswith(".txt"):
                f.write("\n\n".join(content))
            elif name.endswith(".jsonl"):
                f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in content)
            else:
                json.dump(content, f, indent=1)
    stats = files["world.json"]
    table = "".join(f"| {k} | {json.dumps(v)[:120]} |\n" for k, v in stats.items() if k != "counts")
    table += "".join(f"| count: {k} | {v} |\n" for k, v in stats["counts"].items())
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(f"# nanoalign world\n\nGenerated by `python -m nanoalign.world --seed "
                f"{stats['seed']} --scale {stats['scale']}`. Formats and the judge's formula: "
                f"data/README.md in the repository.\n\n| statistic | value |\n|---|---|\n{table}")


def ensure_world(out_dir: str, seed: int = 0, scale: float = 1.0) -> float:
    """Build the world into out_dir unless it is there with the same seed, scale and world.py.
    Returns seconds."""
    t0, path = time.time(), os.path.join(out_dir, "world.json")
    if os.path.exists(path):
        with open(path) as f:
            stats = json.load(f)
        if (stats.get("seed"), stats.get("scale"), stats.get("world_hash")) == \
                (seed, scale, source_hash()):
            return 0.0
    write(out_dir, build(seed, scale))
    return time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate the built-in world: pretraining text, SFT, "
                                            "preference, prompt and verifiable-task files, and "
                                            "their statistics (world.json, README.md).")
    p.add_argument("--out", default="data/world", help="output directory (default data/world)")
    p.add_argument("--seed", type=int, default=0, help="same seed => byte-identical files")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every file's size (e.g. 0.05 for tests)")
    args = p.parse_args(argv)
    t0 = time.time()
    files = build(args.seed, args.scale)
    write(args.out, files)
    s = files["world.json"]
    print(f"wrote {args.out} in {time.time() - t0:.1f}s: {s['pretrain_mb']} MB pretraining text, "
          f"SFT mean gold {s['sft_mean_gold']} (judge max {s['judge_max']}), flip rate expected "
          f"{s['expected_flip_rate']} / empirical {s['empirical_flip_rate']}")


if __name__ == "__main__":
    main()
