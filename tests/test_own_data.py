"""Your own GPT-2 and your own data, end to end: a GPT-2 directory in Hugging Face's layout
(weights, config.json, vocab.json, merges.txt; a tiny random stand-in, since nothing is downloaded)
and a small file in the Anthropic HH schema go through SFT -> reward model -> DPO and PPO at micro
sizes, then the evaluation without a gold judge."""

import json

import torch

from nanoalign import evaluate, record, train_dpo, train_ppo, train_rm, train_sft
from nanoalign.model import GPT, GPTConfig
from test_model import fake_hf_gpt2_state_dict, write_safetensors
from test_tokenizer import write_gpt2_files

QUESTIONS = ["Tell me about cats.", "What is a hen?", "Say hello.", "Name a colour.",
             "Why is the sky blue?", "Give me a word.", "Count to three.", "Who are you?"]


def hh_record(i):
    q = QUESTIONS[i % len(QUESTIONS)]
    # some multi-turn dialogues
    history = "\n\nHuman: Hi.\n\nAssistant: Hello." if i % 3 == 0 else ""
    prompt = f"{history}\n\nHuman: {q}\n\nAssistant:"
    return {"chosen": f"{prompt} A helpful answer about {q.lower()}", "rejected": f"{prompt} no"}


def test_own_gpt2_and_hh_data_run_sft_rm_dpo_ppo_and_a_judgeless_evaluation(tmp_path):
    gpt2 = tmp_path / "gpt2"
    vocab = write_gpt2_files(gpt2)
    torch.manual_seed(0)
    src = GPT(GPTConfig(vocab_size=len(vocab), block_size=96, n_layer=2, n_head=2, n_embd=32))
    write_safetensors(fake_hf_gpt2_state_dict(src, with_buffers=False), gpt2 / "model.safetensors")
    (gpt2 / "config.json").write_text(json.dumps({"n_head": 2}))
    hh = tmp_path / "hh.jsonl"
    hh.write_text("".join(json.dumps(hh_record(i)) + "\n" for i in range(24)))
    run = {s: tmp_path / s for s in ("sft", "rm", "dpo", "ppo")}
    small = ["--batch_size", "4", "--eval_interval", "100"]

    # SFT on the chosen answers
    train_sft.main(["--init", str(gpt2), "--data", str(hh), "--val_data", "", "--max_steps", "3",
                    "--n_samples", "1", "--out_dir", str(run["sft"])] + small)
    sft_ckpt, rm_ckpt = str(run["sft"] / "ckpt.pt"), str(run["rm"] / "ckpt.pt")
    sft = record.load_checkpoint(sft_ckpt, stages=["sft"])
    assert sft["tokenizer"].startswith("gpt2-")
    assert sft["tokenizer_state"]["name"] == sft["tokenizer"]  # it carries GPT-2's tokenizer
    # GPT-2's vocabulary + <|pad|>, turns and <|end|>
    assert sft["model_config"]["vocab_size"] == len(vocab) + 4
    train_rm.main(["--init", sft_ckpt, "--data", str(hh), "--val_data", str(hh), "--norm_data", "",
                   "--epochs", "0.5", "--out_dir", str(run["rm"])] + small)
    train_dpo.main(["--init", sft_ckpt, "--data", str(hh), "--val_data", str(hh), "--epochs", "0.5",
                    "--out_dir", str(run["dpo"])] + small)
    train_ppo.main(["--init", sft_ckpt, "--reward_model", rm_ckpt, "--prompts", str(hh),
                    "--iterations", "2", "--batch_size", "4", "--minibatches", "2",
                    "--ppo_epochs", "1", "--max_new_tokens", "8", "--log_gold", "false",
                    "--out_dir", str(run["ppo"])])
    for stage, path in run.items():
        assert (path / "ckpt.pt").exists(), stage
    rows = record.read_metrics(str(run["ppo"] / "metrics.jsonl"))
    assert ([r["iter"] for r in rows if "iter" in r] == [1, 2]
            and all(r.get("gold") is None for r in rows))

    out = tmp_path / "eval.json"
    models = f"dpo={run['dpo'] / 'ckpt.pt'},ppo={run['ppo'] / 'ckpt.pt'}"
    evaluate.main(["--models", models, "--sft", sft_ckpt, "--reward_model", rm_ckpt,
                   "--judge", "none", "--prompts", str(hh), "--n_prompts", "8",
                   "--max_new_tokens", "8", "--out", str(out)])
    results = json.loads(out.read_text())
    for name in ("dpo", "ppo"):
        r = results[name]
        # no judge: null, never 0
        assert r["gold_score"] is None and r["win_rate_vs_sft"] is None
        assert isinstance(r["rm_score"], float) and isinstance(r["kl_to_sft"], float)

    # without a judge: the RM judges the win rate, and held-out pairs give each model's preference
    # accuracy
    models = f"sft={run['sft'] / 'ckpt.pt'},dpo={run['dpo'] / 'ckpt.pt'}"
    results = evaluate.main(["--models", models, "--sft", sft_ckpt, "--reward_model", rm_ckpt,
                             "--judge", "rm", "--prompts", str(hh), "--pairs", str(hh),
                             "--n_prompts", "8", "--max_new_tokens", "8"])
    assert results["dpo"]["gold_score"] is None and results["dpo"]["win_rate_judge"] == "rm"
    assert 0 <= results["dpo"]["win_rate_vs_sft"] <= 1 and results["dpo"]["win_rate_ci"] > 0
    # SFT's implicit reward against itself is 0: every pair ties
    assert results["sft"]["pref_accuracy"] == 0.5
    last_val = lambda stage: [r for r in record.read_metrics(str(run[stage] / "metrics.jsonl"))
                              if "val_accuracy" in r][-1]
    dpo_val = last_val("dpo")["val_accuracy"]
    # the implicit reward DPO itself validates with
    assert abs(results["dpo"]["pref_accuracy"] - dpo_val) < 1e-6
    rm_val = last_val("rm")["val_accuracy"]
    assert (abs(results["reward_model"]["pref_accuracy"] - rm_val) < 1e-6
            and results["reward_model"]["pairs"] == 24)
