"""Labels out and agreement in: label --export keeps each pair's strict majority (ties, skips and
split votes out) as a preference file the trainers read; evaluate --labels reports Cohen's and
Fleiss' kappa as computed by hand below, and each rater's agreement with the gold judge."""

import json

import pytest

from nanoalign import agreement, evaluate, label
from nanoalign.data import load_prefs
from nanoalign.files import DataError

M1, M2 = "out/ppo.pt", "out/sft.pt"


def line(pair, rater, winner, flip=False, gold=(1.0, 0.0)):
    """A decision on pair `pair` between M1's answer and M2's: winner 1, 2, 'tie' or 'skip';
    flip shows M2's answer as A. gold: the judge's scores of M1's and M2's answers."""
    answers, models = [f"m1 says {pair}", f"m2 says {pair}"], [M1, M2]
    shown = [1, 0] if flip else [0, 1]
    choice = winner if winner in ("tie", "skip") else "AB"[shown.index(winner - 1)]
    return {"pair": f"p{pair}", "prompt_index": pair, "choice": choice,
            "A": models[shown[0]], "B": models[shown[1]], "models": models, "rater": rater,
            "time": 0.0, "prompt": [{"role": "user", "content": f"q{pair}"}],
            "answers": [answers[j] for j in shown], "gold": [gold[j] for j in shown]}


def write(path, lines):
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    return str(path)


def two_raters():
    """Two raters, 10 pairs, each judging M1's answer (1) or M2's (2) the better:

                 bob: 1   bob: 2
        ada: 1      4        1        ada: 5 x 1, 5 x 2;  bob: 6 x 1, 4 x 2
        ada: 2      2        3

    Cohen: p_o = (4 + 3) / 10 = 0.7; p_e = (5 * 6 + 5 * 4) / 100 = 0.5;
           kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4.
    Fleiss (m = 2 raters on each of 10 pairs): P_i = 1 where they agree, else 0, so mean 0.7;
           p_1 = (5 + 6) / 20 = 0.55, p_2 = 0.45, P_e = 0.3025 + 0.2025 = 0.505;
           kappa = (0.7 - 0.505) / (1 - 0.505) = 0.195 / 0.495 = 0.393939...
    Gold prefers M1's answer on every pair: ada agrees on 5/10, bob on 6/10.
    bob sees every pair with A and B swapped: the statistics must not care."""
    table = [(1, 1)] * 4 + [(1, 2)] + [(2, 1)] * 2 + [(2, 2)] * 3
    return ([line(i, "ada", a) for i, (a, _) in enumerate(table)]
            + [line(i, "bob", b, flip=True) for i, (_, b) in enumerate(table)])


def test_cohen_and_fleiss_kappa_match_the_hand_computation_through_evaluate(tmp_path):
    log = write(tmp_path / "labels.log.jsonl", two_raters())
    out = evaluate.main(["--labels", log])["rater_agreement"]
    assert out["cohen_kappa"]["ada & bob"]["n"] == 10
    assert out["cohen_kappa"]["ada & bob"]["kappa"] == pytest.approx(0.4)
    assert out["fleiss_kappa"] == pytest.approx(0.195 / 0.495)
    assert out["raters"]["ada"] == {"judged": 10, "gold_agreement": 0.5, "gold_n": 10}
    assert out["raters"]["bob"]["gold_agreement"] == pytest.approx(0.6)


def test_skips_leave_a_pair_out_of_the_kappas_and_unequal_rater_counts_stop_fleiss(tmp_path):
    lines = two_raters()
    lines[0] = line(0, "ada", "skip")  # ada's (1, 1) pair: now only bob judges it
    lines.append(line(3, "cy", "tie"))
    out = agreement.rater_agreement(write(tmp_path / "labels.log.jsonl", lines))
    # p_o = 6/9; ada 4 x 1, 5 x 2; bob 5 x 1, 4 x 2: p_e = 40/81; kappa = (54 - 40) / (81 - 40)
    assert out["cohen_kappa"]["ada & bob"] == {"kappa": pytest.approx(14 / 41), "n": 9}
    assert out["cohen_kappa"]["ada & cy"]["n"] == 1 and out["raters"]["cy"]["judged"] == 1
    assert out["fleiss_kappa"] is None and "different numbers of raters" in out["fleiss_note"]
    assert "gold_n" not in out["raters"]["cy"]  # a tie is no verdict on which answer is better


def test_a_rater_who_changes_her_mind_counts_once_with_her_last_decision(tmp_path):
    """The gold judge prefers M1's answer: ada first agrees, then picks M2's, then skips pair 2
    after judging it: one verdict counts (the last, wrong), and the skip takes pair 2 out."""
    lines = [line(1, "ada", 1), line(1, "ada", 2, flip=True), line(2, "ada", 1),
             line(2, "ada", "skip")]
    out = agreement.rater_agreement(write(tmp_path / "labels.log.jsonl", lines))
    assert out["raters"]["ada"] == {"judged": 1, "gold_agreement": 0.0, "gold_n": 1}


def test_kappa_is_undefined_not_a_division_by_zero_when_everyone_says_the_same():
    assert agreement.cohen_kappa(["tie"] * 3, ["tie"] * 3) is None
    assert agreement.cohen_kappa(["first", "second"], ["first", "second"]) == 1.0
    assert agreement.fleiss_kappa([{"first": 2}, {"first": 2}]) is None


def test_export_keeps_strict_majorities_with_votes_and_raters_and_the_trainers_read_it(tmp_path):
    lines = [line(0, "ada", 1), line(0, "bob", 1, flip=True), line(0, "cy", 2),  # 2 : 1
             line(1, "ada", 2), line(1, "bob", "tie"), line(1, "cy", "skip"),  # 1 : 0
             line(2, "ada", 1), line(2, "bob", 2),  # split: out
             line(3, "ada", "tie"), line(3, "bob", "skip"),  # no vote: out
             line(4, "ada", 1), line(4, "ada", 2, gold=(0.2, 0.9))]  # ada changed her mind
    log = write(tmp_path / "labels.log.jsonl", lines)
    out = tmp_path / "voted.jsonl"
    assert label.main(["--export", log, "--out", str(out)]) == 3
    rows = {r["pair"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == ["p0", "p1", "p4"]
    assert rows["p0"]["chosen"] == "m1 says 0" and rows["p0"]["chosen_model"] == M1
    assert rows["p0"]["votes"] == {"chosen": 2, "rejected": 1, "tie": 0, "skip": 0}
    assert rows["p1"]["chosen"] == "m2 says 1" and rows["p1"]["raters"] == ["ada", "bob", "cy"]
    assert rows["p1"]["votes"] == {"chosen": 1, "rejected": 0, "tie": 1, "skip": 1}
    assert rows["p4"]["chosen"] == "m2 says 4" and rows["p4"]["votes"]["chosen"] == 1
    # the reward model's and DPO's reader: the pairs, with gold for the RM's gold agreement
    prefs = load_prefs(str(out))
    assert [(p["chosen"], p["rejected"]) for p in prefs] == [("m1 says 0", "m2 says 0"),
                                                              ("m2 says 1", "m1 says 1"),
                                                              ("m2 says 4", "m1 says 4")]
    assert (prefs[0]["gold_chosen"], prefs[2]["gold_chosen"]) == (1.0, 0.9)
    with pytest.raises(ValueError, match="--out: must differ"):
        label.main(["--export", log, "--out", log])


def test_export_names_the_line_of_a_log_without_the_answers(tmp_path):
    log = write(tmp_path / "old.log.jsonl", [{"prompt_index": 0, "choice": "A", "A": M1}])
    with pytest.raises(DataError, match=r"old.log.jsonl:1: expected a decision with pair"):
        label.export(log, str(tmp_path / "out.jsonl"))
