"""Knowledge distillation: the loss against its formula (Hinton et al. 2015), the teacher never
learns, and the pipeline's student is smaller than its teacher and gets evaluated."""

import json

import torch
import torch.nn.functional as F

from nanoalign.model import GPT, GPTConfig
from nanoalign.train_distill import distill_loss


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
        assert torch.allclose(loss, T * T * by_hand, atol=1e-5) and abs(kl - by_hand.item()) < 1e-5
        same, _, _ = distill_loss(t, t, targets, mask, T, alpha=1.0, n_tokens=int(mask.sum()))
        assert abs(same.item()) < 1e-6


def test_hard_term_is_the_cross_entropy_of_the_teachers_tokens():
    s, t = logits(2), logits(3)
    targets, mask = torch.randint(11, (3, 5)), torch.ones(3, 5, dtype=torch.bool)
    loss, _, ce = distill_loss(s, t, targets, mask, 2.0, alpha=0.0, n_tokens=15)
    assert torch.allclose(loss, F.cross_entropy(s.flatten(0, 1), targets.flatten()), atol=1e-5)
    mixed, _, _ = distill_loss(s, t, targets, mask, 2.0, alpha=0.3, n_tokens=15)
    soft, _, _ = distill_loss(s, t, targets, mask, 2.0, alpha=1.0, n_tokens=15)
    assert torch.allclose(mixed, 0.3 * soft + 0.7 * loss, atol=1e-5)


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
