"""Stage-level invariants on real (micro) checkpoints: reward reading, PPO's first step, frozen
models, masking, bit-exact resume, clear errors. The micro pipeline runs once per session
(conftest.micro_run)."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from nanoalign import common, record
from nanoalign.batching import tokenize_pref, tokenize_sft
from nanoalign.data import load_prefs, load_sft
from nanoalign.generate import pad_left
from nanoalign.rl import (concatenated_logps, kl_estimates, load_reward_model, rollout,
                          score_last_token)
from nanoalign.tokenizer import render_chat
from nanoalign.train_ppo import PPOConfig, advantages_and_returns, ppo_update
from nanoalign.train_rm import pair_rewards, reward_offset
from nanoalign.train_sft import collate, sft_loss
from nanoalign.model import GPT


def ckpt(run, stage):
    return str(run / stage / "ckpt.pt")


def world(run, name):
    return str(run / "world" / name)


def load(run, stage):
    c = record.load_checkpoint(ckpt(run, stage))
    return GPT.from_checkpoint(c).eval(), record.checkpoint_tokenizer(c), c


# ----------------------------------------------------------------------------- reward model

def test_reward_is_read_at_the_last_real_token_whatever_the_padding(micro_run):
    rm, tok, _ = load(micro_run, "rm")
    ex = load_prefs(world(micro_run, "prefs_val.jsonl"))[0]
    p, c, _ = tokenize_pref(tok, ex, 128)
    seq = torch.tensor([p + c])
    base = score_last_token(rm, seq, torch.ones_like(seq, dtype=torch.bool))
    right = torch.cat([seq, torch.full((1, 7), tok.pad_id)], 1)
    right_mask = torch.cat([torch.ones(1, seq.size(1), dtype=torch.bool),
                            torch.zeros(1, 7, dtype=torch.bool)], 1)
    left, left_mask = pad_left([p + c, [1] * (len(p + c) + 9)], tok.pad_id)
    assert torch.allclose(score_last_token(rm, right, right_mask), base, atol=1e-5)
    assert torch.allclose(score_last_token(rm, left[:1], left_mask[:1]), base, atol=1e-5)
    garbage = right.clone()
    garbage[0, -7:] = 5  # what sits in the padding is never read
    assert torch.allclose(score_last_token(rm, garbage, right_mask), base, atol=1e-5)
    changed = seq.clone()
    changed[0, -1] = (changed[0, -1] + 1) % tok.pad_id  # the last real token is read
    changed_mask = torch.ones_like(changed, dtype=torch.bool)
    assert not torch.allclose(score_last_token(rm, changed, changed_mask), base)


def test_pair_rewards_do_not_depend_on_batch_composition(micro_run):
    rm, tok, _ = load(micro_run, "rm")
    path = world(micro_run, "prefs_val.jsonl")
    pairs = [tokenize_pref(tok, ex, 128) for ex in load_prefs(path)[:6]]
    c_all, r_all = pair_rewards(rm, pairs, tok.pad_id, "cpu")
    c_one, r_one = pair_rewards(rm, pairs[2:3], tok.pad_id, "cpu")
    assert (torch.allclose(c_all[2], c_one[0], atol=1e-5)
            and torch.allclose(r_all[2], r_one[0], atol=1e-5))


def test_rm_stage_reads_every_rows_reward_at_its_last_real_token(micro_run):
    """train_rm.pair_rewards on a right-padded batch of ragged pairs: each row's reward is the
    scalar the model gives that row, alone and unpadded, at its last token (the <|end|>), never a
    pad's."""
    rm, tok, _ = load(micro_run, "rm")
    path = world(micro_run, "prefs_val.jsonl")
    pairs = [tokenize_pref(tok, ex, 128) for ex in load_prefs(path)[:8]]
    chosen, rejected = pair_rewards(rm, pairs, tok.pad_id, "cpu")
    lengths = [len(p + c) for p, c, _ in pairs] + [len(p + r) for p, _, r in pairs]
    assert len(set(lengths)) > 2  # ragged: most rows are padded
    for row, (p, c, r) in enumerate(pairs):
        for got, answer in ((chosen[row], c), (rejected[row], r)):
            alone = rm(torch.tensor([p + answer]), output="scalar")[0, -1]
            assert answer[-1] == tok.end_id and torch.allclose(got, alone, atol=1e-5)


def test_reward_offset_gives_the_sft_references_mean_zero(micro_run):
    rm, offset = load_reward_model(ckpt(micro_run, "rm"))
    _, tok, _ = load(micro_run, "rm")
    raw = reward_offset(rm, tok, world(micro_run, "sft_train.jsonl"), 32, 128, "cpu")
    # the stored offset is the references' mean
    assert abs(raw - offset) < 1e-5 and abs(offset) > 1e-3
    # and every RL scorer subtracts it: the references then score 0 on average
    path = world(micro_run, "sft_train.jsonl")
    examples = [tokenize_sft(tok, m, 128)[0] for m in load_sft(path)[:32]]
    tokens, mask = pad_left(examples, tok.pad_id)
    assert abs(score_last_token(rm, tokens, mask, offset).mean().item()) < 1e-5


# ----------------------------------------------------------------------------- PPO

def test_ppo_first_minibatch_has_ratio_one_and_kl_is_zero_at_init(micro_run):
    sft, tok, _ = load(micro_run, "sft")
    policy = copy.deepcopy(sft).add_scalar_head("zero")
    ref = copy.deepcopy(sft).requires_grad_(False)
    chats = [[{"role": "user", "content": f"Tell me a story about a {a}."}]
             for a in ("cat", "dog", "bird", "fish")]
    prompts = [render_chat(tok, chat, True)[0] for chat in chats]
    ro = rollout(policy, ref, prompts, tok.end_id, tok.pad_id, 24, 1.0,
                 torch.Generator().manual_seed(0), True)
    for k in kl_estimates(ro.logprobs, ro.ref_logprobs):
        assert (k[ro.response_mask] == 0).all()
    assert (ro.values == 0).all()  # zero-initialised value head
    cfg = PPOConfig(batch_size=4, minibatches=2, ppo_epochs=1, iterations=1)
    adv, ret, kl = advantages_and_returns(ro, torch.tensor([1.0, -1.0, 0.5, 0.0]), 0.05, cfg)
    assert torch.equal(ret.sum(1) * 0, torch.zeros(4)) and (kl == 0).all()
    before_ref = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = common.make_optimizer(policy, 1e-3, 0.0)
    updates, _ = ppo_update(policy, opt, ro, adv, ret, cfg, 0, common.Dist())
    ratio, clipfrac = updates[0]["ratio"].item(), updates[0]["clipfrac"].item()
    assert abs(ratio - 1) < 1e-6 and clipfrac == 0
    # the reference never moves
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in before_ref.items())


def test_ppo_no_end_penalty_and_pluggable_reward_reach_the_rollout_scores(micro_run, tmp_path):
    """A custom reward of +5 for every answer; with 2 new tokens no answer can end, so every score
    must be -1."""
    (tmp_path / "fivereward.py").write_text("def five(prompts, responses):\n"
                                            "    return [5.0 for _ in responses]\n")
    sys.path.insert(0, str(tmp_path))
    from nanoalign import record, train_ppo
    out = tmp_path / "ppo"
    train_ppo.main(["--init", ckpt(micro_run, "sft"), "--reward", "fivereward:five",
                    "--prompts", world(micro_run, "prompts_rl.jsonl"), "--iterations", "1",
                    "--batch_size", "4", "--minibatches", "1", "--ppo_epochs", "1",
                    "--max_new_tokens", "2", "--out_dir", str(out), "--log_gold", "false"])
    rows = record.read_metrics(out / "metrics.jsonl")
    assert rows[0]["end_rate"] == 0 and rows[0]["score"] == -1.0


# ----------------------------------------------------------------------------- SFT / DPO plumbing

def test_sft_labels_cover_only_the_answer_and_padding_does_not_change_the_loss(micro_run):
    sft, tok, _ = load(micro_run, "sft")
    path = world(micro_run, "sft_val.jsonl")
    examples = [tokenize_sft(tok, m, 128) for m in load_sft(path)[:3]]
    tokens, labels = collate(examples, tok.pad_id, "cpu")
    n = int((labels[:, 1:] != -100).sum())
    loss = sft_loss(sft(tokens), labels, n)
    alone = sum(sft_loss(sft(torch.tensor([ids])), torch.tensor([lab]), n) for ids, lab in examples)
    # right padding (no attention mask) changes nothing
    assert torch.allclose(loss, alone, atol=1e-5)
    no_answer = ([tok.user_id, 5, tok.end_id], [-100, -100, -100])
    more = [(ids, lab) for ids, lab in examples] + [no_answer]
    t2, l2 = collate(more, tok.pad_id, "cpu")
    t2 = torch.cat([t2, torch.full((4, 5), tok.pad_id)], 1)
    l2 = torch.cat([l2, torch.full((4, 5), -100)], 1)
    assert torch.allclose(sft_loss(sft(t2), l2, n), loss, atol=1e-5)
    ids, lab = examples[0]
    answer_start = ids.index(tok.assistant_id) + 1
    assert all(x == -100 for x in lab[:answer_start]) and lab[answer_start:] == ids[answer_start:]
    assert lab[-1] == tok.end_id  # the stop token is trained


def test_dpo_logps_do_not_depend_on_padding_or_batch_composition(micro_run):
    sft, tok, _ = load(micro_run, "sft")
    path = world(micro_run, "prefs_val.jsonl")
    pairs = [tokenize_pref(tok, ex, 128) for ex in load_prefs(path)[:5]]
    c_all, r_all = concatenated_logps(sft, pairs, tok.pad_id, "cpu")
    c_one, r_one = concatenated_logps(sft, pairs[3:4], tok.pad_id, "cpu")
    assert (torch.allclose(c_all[3], c_one[0], atol=1e-4)
            and torch.allclose(r_all[3], r_one[0], atol=1e-4))


# ----------------------------------------------------------------------------- resume, errors

STAGE_ARGS = {
    "train_pretrain": lambda r: [
        "--data", world(r, "pretrain.txt"), "--val_data", world(r, "pretrain_val.txt"),
        "--tokenizer", world(r, "tok512.tiktoken"), "--n_layer", "1", "--n_embd", "32",
        "--n_head", "2", "--max_steps", "6", "--batch_size", "4", "--eval_interval", "100",
        "--eval_batches", "1"],
    "train_sft": lambda r: [
        "--init", ckpt(r, "pretrain"), "--data", world(r, "sft_train.jsonl"), "--val_data", "",
        "--max_steps", "6", "--batch_size", "4", "--eval_interval", "100", "--dropout", "0.1"],
    "train_rm": lambda r: [
        "--init", ckpt(r, "sft"), "--data", world(r, "prefs_train.jsonl"), "--val_data", "",
        "--norm_data", "", "--epochs", "0.06", "--batch_size", "4", "--eval_interval", "100"],
    "train_dpo": lambda r: [
        "--init", ckpt(r, "sft"), "--data", world(r, "prefs_train.jsonl"), "--val_data", "",
        "--epochs", "0.06", "--batch_size", "4", "--eval_interval", "100"],
    "train_ppo": lambda r: [
        "--init", ckpt(r, "sft"), "--reward_model", ckpt(r, "rm"),
        "--prompts", world(r, "prompts_rl.jsonl"), "--iterations", "4", "--batch_size", "4",
        "--minibatches", "2", "--ppo_epochs", "1", "--max_new_tokens", "12",
        "--adaptive_kl", "true", "--save_interval", "100"],
    "train_grpo": lambda r: [
        "--init", ckpt(r, "sft"), "--reward_model", ckpt(r, "rm"),
        "--prompts", world(r, "prompts_rl.jsonl"), "--iterations", "4", "--prompts_per_iter", "2",
        "--group_size", "2", "--minibatches", "1", "--ppo_epochs", "1", "--max_new_tokens", "12",
        "--save_interval", "100"],
    "train_distill": lambda r: [
        "--teacher", ckpt(r, "ppo"), "--init", ckpt(r, "pretrain_small"),
        "--prompts", world(r, "prompts_rl.jsonl"), "--max_steps", "4", "--batch_size", "4",
        "--max_new_tokens", "12", "--save_interval", "100"],
}
STOP_AT = {"train_pretrain": 3, "train_sft": 3, "train_rm": 2, "train_dpo": 2, "train_ppo": 2,
           "train_grpo": 2, "train_distill": 2}


@pytest.mark.parametrize("stage", list(STAGE_ARGS))
def test_resume_after_a_stop_equals_an_uninterrupted_run(micro_run, tmp_path, stage):
    import importlib
    module = importlib.import_module(f"nanoalign.{stage}")
    args = STAGE_ARGS[stage](micro_run)
    module.main(args + ["--out_dir", str(tmp_path / "full")])
    module.main(args + ["--out_dir", str(tmp_path / "split"), "--stop_at", str(STOP_AT[stage])])
    # a crash after the checkpoint leaves rows of later steps in metrics.jsonl: the resumed run must
    # drop them
    later = [r for r in record.read_metrics(tmp_path / "full" / "metrics.jsonl")
             if r.get("step", r.get("iter", 0)) > STOP_AT[stage]][:2]
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in later)
    module.main(args + ["--out_dir", str(tmp_path / "split"), "--resume", "true"])
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{stage}: {k} differs after resume"
    key = "loss" if stage not in ("train_ppo", "train_grpo") else "score"
    full = [r[key] for r in record.read_metrics(tmp_path / "full" / "metrics.jsonl") if key in r]
    split = [r[key] for r in record.read_metrics(tmp_path / "split" / "metrics.jsonl") if key in r]
    assert full == split


def test_wrong_kind_of_checkpoint_and_bad_config_get_clear_errors(micro_run, capsys):
    from nanoalign import record, train_ppo, train_sft
    with pytest.raises(record.CheckpointError, match="is a 'rm' checkpoint"):
        train_sft.main(["--init", ckpt(micro_run, "rm"),
                        "--data", world(micro_run, "sft_train.jsonl")])
    for argv, field in [(["--beta_typo", "1"], "beta_typo"), (["--batch_size", "x"], "batch_size"),
                        (["--batch_size", "6", "--minibatches", "4"], "batch_size"),
                        (["--kl_coef", "-1"], "kl_coef"), (["--reward", "verifiable"], "reward")]:
        with pytest.raises(SystemExit):
            train_ppo.main(argv)
        assert field in capsys.readouterr().err


def test_stage_files_run_as_torchrun_scripts_with_help():
    """`torchrun nanoalign/train_x.py` runs the file as a script: it must import and show --help."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for stage in STAGE_ARGS:
        out = subprocess.run([sys.executable, f"nanoalign/{stage}.py", "--help"],
                             capture_output=True, text=True, cwd=root)
        assert out.returncode == 0 and "--out_dir" in out.stdout, out.stderr


def test_sample_cli_answers_in_the_chat_template(micro_run):
    from nanoalign import sample
    outs = sample.main(["--ckpt", ckpt(micro_run, "sft"), "--n", "2", "--max_new_tokens", "8"])
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    base = sample.main(["--ckpt", ckpt(micro_run, "pretrain"), "--prompt", "Once upon a time",
                        "--max_new_tokens", "8"])
    assert len(base) == 1


def test_sample_side_by_side_and_multi_turn_chat_keeps_each_models_conversation(micro_run,
                                                                                monkeypatch):
    import io
    from nanoalign import sample
    both = sample.main(["--ckpt", ckpt(micro_run, "ppo"), "--compare", ckpt(micro_run, "sft"),
                        "--max_new_tokens", "8"])
    assert set(both) == {"ppo", "sft"} and all(len(v) == 1 for v in both.values())
    prompts, real = [], sample.answers
    monkeypatch.setattr(sample, "answers", lambda model, tok, ids, *a:
                        prompts.append(tok.decode(ids)) or real(model, tok, ids, *a))
    typed = "Tell me a story about a cat.\nWho is in it?\n/reset\nHi.\n\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(typed))
    said = sample.main(["--ckpt", ckpt(micro_run, "ppo"), "--compare", ckpt(micro_run, "sft"),
                        "--chat", "--max_new_tokens", "8"])
    assert [len(v) for v in said.values()] == [3, 3]
    # turn 2 of the first model sees turn 1 and its own first answer; after /reset the story is
    # forgotten
    turn1 = "<|user|>Tell me a story about a cat.<|end|><|assistant|>"
    assert prompts[2].startswith(turn1 + said["ppo"][0])
    assert "Who is in it?" in prompts[2] and "story" not in prompts[4] and "Hi." in prompts[4]


def test_online_dpo_pairs_are_ranked_by_the_judge_and_a_round_trains(micro_run, tmp_path):
    from nanoalign import record, train_dpo
    from nanoalign.data import load_prompts
    from nanoalign.rl import prompt_text, rollout_pairs
    from nanoalign.world import gold_scores
    sft, tok, _ = load(micro_run, "sft")
    prompts = load_prompts(world(micro_run, "prompts_rl.jsonl"))[:12]
    pairs = rollout_pairs(sft, tok, prompts, 24, 1.0, torch.Generator().manual_seed(0), 128,
                          judge=gold_scores)
    assert pairs, "two samples per prompt should differ for some prompts"
    by_prompt = {tuple(render_chat(tok, m, True)[0]): prompt_text(m) for m in prompts}
    for p, c, r in pairs:
        text = lambda ids: tok.decode([t for t in ids if t != tok.end_id])
        assert gold_scores([by_prompt[tuple(p)]] * 2, [text(c), text(r)]) == sorted(
            gold_scores([by_prompt[tuple(p)]] * 2, [text(c), text(r)]), reverse=True)
    train_dpo.main(["--init", ckpt(micro_run, "sft"), "--epochs", "0", "--online_rounds", "1",
                    "--online_pairs", "8", "--batch_size", "4", "--online_judge", "rm",
                    "--reward_model", ckpt(micro_run, "rm"),
                    "--online_prompts", world(micro_run, "prompts_rl.jsonl"), "--val_data", "",
                    "--max_new_tokens", "16", "--out_dir", str(tmp_path / "odpo")])
    rows = record.read_metrics(tmp_path / "odpo" / "metrics.jsonl")
    assert rows and all(r["phase"] == "online0" for r in rows)
    assert (tmp_path / "odpo" / "ckpt.pt").exists()


def test_online_dpo_pairs_can_be_ranked_by_your_own_judge(micro_run, tmp_path, monkeypatch):
    """--online_judge module:function: a judge that prefers longer answers must make every chosen
    answer the longer."""
    from nanoalign import config, train_dpo
    (tmp_path / "myjudge.py").write_text("def longer(prompts, responses):\n"
                                         "    return [float(len(r)) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config.parse_config(train_dpo.DPOConfig,
                              ["--online_judge", "myjudge:longer", "--online_pairs", "8",
                               "--online_prompts", world(micro_run, "prompts_rl.jsonl")])
    sft, tok, _ = load(micro_run, "sft")
    pairs = train_dpo.online_pairs(cfg, common.Dist(), tok, sft, 0, 128)
    assert pairs
    text = lambda ids: tok.decode([t for t in ids if t != tok.end_id])
    assert all(len(text(c)) > len(text(r)) for _, c, r in pairs)


def test_same_seed_gives_identical_metrics_and_a_foreign_tokenizer_is_refused(micro_run, tmp_path):
    from nanoalign import record, train_ppo, train_sft
    # tokens_per_s, iter_s, ...
    timing = lambda row: {k: v for k, v in row.items() if not k.endswith("_s")}
    for module, stage in ((train_sft, "train_sft"), (train_ppo, "train_ppo")):
        args = STAGE_ARGS[stage](micro_run)
        for run in ("a", "b"):
            module.main(args + ["--out_dir", str(tmp_path / stage / run)])
        a, b = (record.read_metrics(tmp_path / stage / run / "metrics.jsonl") for run in ("a", "b"))
        assert [timing(r) for r in a] == [timing(r) for r in b], stage
    with pytest.raises(record.CheckpointError, match="trained with tokenizer"):
        record.load_checkpoint(ckpt(micro_run, "sft"), tokenizer="bpe999-other")


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(micro_run, tmp_path):
    """SIGINT mid-run: the stage stops at the next step boundary, saves, exits 0; --resume continues
    to the end."""
    import signal
    import time
    out = tmp_path / "sft"
    argv = [sys.executable, "-m", "nanoalign.train_sft", "--init", ckpt(micro_run, "pretrain"),
            "--data", world(micro_run, "sft_train.jsonl"), "--val_data", "",
            "--max_steps", "100000", "--batch_size", "2", "--eval_interval", "1000000",
            "--out_dir", str(out)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(argv, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while ((not metrics.exists() or len(metrics.read_text().splitlines()) < 3)
           and time.time() < deadline):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0
    saved = record.load_checkpoint(str(out / "ckpt.pt"))
    logged = record.read_metrics(metrics)[-1]["step"]
    # the checkpoint is the last logged step: nothing lost
    assert 3 <= saved["step"] == logged < 100000
    from nanoalign import train_sft
    train_sft.main(argv[3:] + ["--max_steps", str(saved["step"] + 2), "--resume", "true"])
    assert record.load_checkpoint(str(out / "ckpt.pt"))["step"] == saved["step"] + 2


# ----------------------------------------------------------------------------- checkpoints

def test_a_checkpoint_moved_elsewhere_loads_weights_only_and_samples(micro_run, tmp_path,
                                                                   monkeypatch):
    """A checkpoint carries its tokenizer, not a path: copied to another directory, with the world
    out of reach, it loads with weights_only=True (no pickled objects) and answers a prompt."""
    import shutil

    from nanoalign import sample
    for stage in ("pretrain", "sft", "rm", "ppo", "dpo", "grpo", "distill"):
        torch.load(ckpt(micro_run, stage), weights_only=True)  # tensors, numbers, strings only
    moved = tmp_path / "elsewhere" / "ppo.pt"
    moved.parent.mkdir()
    shutil.copy(ckpt(micro_run, "ppo"), moved)
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths to the world no longer resolve
    c = record.load_checkpoint(str(moved), stages=["ppo"])
    tok = record.checkpoint_tokenizer(c)
    assert tok.name == c["tokenizer"] and tok.state() == c["tokenizer_state"]
    out = sample.main(["--ckpt", str(moved), "--prompt", "Tell me a story about a cat.",
                       "--max_new_tokens", "8"])
    assert out


def test_an_old_pickled_checkpoint_names_its_conversion_and_converts(micro_run, tmp_path):
    import numpy as np
    c = torch.load(ckpt(micro_run, "sft"), weights_only=True)
    tok_path = tmp_path / "tok.tiktoken"
    tok_path.write_bytes((micro_run / "world" / "tok512.tiktoken").read_bytes())
    old = copy.deepcopy({k: v for k, v in c.items() if k != "tokenizer_state"})
    old["tokenizer_path"] = str(tok_path)
    for s in old["rng"]:  # as older versions saved numpy's state: a pickled array
        name, keys, pos, has_gauss, cached = s["numpy"]
        s["numpy"] = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
    path = tmp_path / "old.pt"
    torch.save(old, path)
    with pytest.raises(record.CheckpointError, match="nanoalign.record --convert"):
        record.load_checkpoint(str(path))
    record.main(["--convert", str(path)])
    new = record.load_checkpoint(str(path), stages=["sft"])
    assert new["tokenizer_state"] == c["tokenizer_state"]
    assert all(torch.equal(new["model"][k], v) for k, v in c["model"].items())
    assert torch.equal(new["rng"][0]["numpy"][1], c["rng"][0]["numpy"][1])
