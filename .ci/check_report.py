"""The learning guard: after the tests, CI runs the tiny pipeline and checks its
report.json against the acceptance thresholds. Figures only, never timings.
Usage: python .ci/check_report.py out/tiny/report.json"""

import json
import sys


def main(path):
    r = json.load(open(path))
    s = r["stages"]
    checks = [
        ("SFT ends its answers (end rate >= 0.95 at temperature 1)",
         s["sft"]["end_rate"] >= 0.95),
        ("SFT beats the base model on the gold judge",
         s["sft"]["gold_score"] > s["base"]["gold_score"]),
        ("SFT's win rate against itself is ~0.5 (two sample sets)",
         abs(s["sft"]["win_rate_vs_sft"] - 0.5) < 0.1),
        ("pretraining validation loss within 0.15 nats of the entropy floor",
         r["pretrain_val_loss"] - r["entropy_floor"] < 0.15),
    ]
    for name in ("ppo", "dpo", "grpo"):
        if name in s:
            w, ci = s[name]["win_rate_vs_sft"], s[name]["win_rate_ci"]
            checks.append((f"{name}: gold win rate vs SFT >= 0.6 with the 95% CI above 0.5 "
                           f"({w:.3f} ± {ci:.3f})", w >= 0.6 and w - ci > 0.5))
    failed = [name for name, ok in checks if not ok]
    for name, ok in checks:
        print(("ok    " if ok else "FAIL  ") + name)
    print(f"learning guard: {len(checks) - len(failed)} of {len(checks)} thresholds met")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
