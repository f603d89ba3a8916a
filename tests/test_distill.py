"""Knowledge distillation: the loss against its formula (Hinton et al. 2015), the teacher never
learns, and the pipeline's student is smaller than its teacher and gets evaluated."""

import json

import torch
import torch.nn.functional as F

from nanoalign.model import GPT, GPTConfig
from nanoalign.train_distill import distill_loss

from grading import close


def logits(seed, B=3, N=5, V=11):
    return torch.randn(B, N, V, generator=torch.Generator().manual_seed(seed)) * 2


def test_soft_term_is_t_squared_times_forward_kl_and_zero_when_student_equals_teacher():
    s, t = logits(0), logits(1)
    targets, mask = torch.randint(11, (3, 5)), torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False  # padding does not count
    for T in (1.0, 2.0, 4.0):
        loss, kl, _ = distill_loss(s, t, targets, mask, T, alpha=1.0, n_tokens=int(mask.sum()))
        p, q = F.softmax(t / T, -1), F.softmax(s / T, -1)
        # KL(teacher_T || student_T) per token
        by_hand = (p * (p.log() - q.log())).sum(-1)[mask].mean()
        close(loss, T * T * by_hand, f"alpha = 1: loss = T^2 mean KL(teacher_T || student_T) over "
              f"the mask (T = {T}; forward KL, softmaxes at temperature T)", atol=1e-5)
        close(kl, by_hand, f"the returned KL is the mean per-token KL, without T^2 (T = {T})",
              atol=1e-5)
        same, _, _ = distill_loss(t, t, targets, mask, T, alpha=1.0, n_tokens=int(mask.sum()))
        close(same, torch.tensor(0.0), "student = teacher: the KD term is 0", atol=1e-6)


def test_hard_term_is_the_cross_entropy_of_the_teachers_tokens():
    s, t = logits(2), logits(3)
    targets, mask = torch.randint(11, (3, 5)), torch.ones(3, 5, dtype=torch.bool)
    loss, _, ce = distill_loss(s, t, targets, mask, 2.0, alpha=0.0, n_tokens=15)
    close(loss, F.cross_entropy(s.flatten(0, 1), targets.flatten()), "alpha = 0: the loss is the "
          "cross-entropy of the teacher's tokens at temperature 1 (T^2 scales the KD term only)",
          atol=1e-5)
    mixed, _, _ = distill_loss(s, t, targets, mask, 2.0, alpha=0.3, n_tokens=15)
    soft, _, _ = distill_loss(s, t, targets, mask, 2.0, alpha=1.0, n_tokens=15)
    close(mixed, 0.3 * soft + 0.7 * loss, "loss = alpha * KD + (1 - alpha) * CE", atol=1e-5)


def test_the_loss_is_divided_by_the_given_token_count_and_ignores_padding():
    """A share of a global token mean, as in SFT: summed over this batch's valid tokens and divided
    by n_tokens (the count over the whole optimizer batch), never by the batch's own count."""
    s, t = logits(4), logits(5)
    targets, mask = torch.randint(11, (3, 5), generator=torch.Generator().manual_seed(6)), \
        torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2:] = False
    loss, _, _ = distill_loss(s, t, targets, mask, 2.0, alpha=0.5, n_tokens=40)
    p, logq = F.softmax(t / 2.0, -1), F.log_softmax(s / 2.0, -1)
    kd = 4.0 * (p * (p.log() - logq)).sum(-1)
    ce = F.cross_entropy(s.transpose(1, 2), targets, reduction="none")
    close(loss, ((0.5 * kd + 0.5 * ce) * mask).sum() / 40, "loss = sum over the valid tokens of "
          "alpha T^2 KL + (1 - alpha) CE, divided by n_tokens", atol=1e-5)


def test_only_the_student_gets_gradients():
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32))
    teacher.requires_grad_(False)
    student = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(20, (2, 8))
    with torch.no_grad():
        t = teacher(x)[:, :-1]
    mask = torch.ones(2, 7, dtype=torch.bool)
    loss, _, _ = distill_loss(student(x)[:, :-1], t, x[:, 1:], mask, 2.0, 0.5, 14)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_pipeline_distills_a_smaller_student_and_reports_it(micro_run):
    report = json.loads((micro_run / "report.json").read_text())
    d = report["stages"]["distill"]
    assert d["student_params"] < d["teacher_params"] and d["student_new_tokens_per_s"] > 0
    assert (0.0 <= d["win_rate_vs_sft"] <= 1.0
            and "Distillation" in (micro_run / "report.md").read_text())
