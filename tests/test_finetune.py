"""Distillation fine-tune: the loss against a hand-written reference, the schedule, and a tiny compressed
model whose distillation loss falls (train and held-out batches) with only its factors changed."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from tiny import VOCAB, tiny_model

from sigmascale_core.calibration import collect_stats
from sigmascale_core.finetune import (
    distill,
    distillation_terms,
    evaluate_distillation,
    factor_parameters,
    lr_factor,
)
from sigmascale_core.models import model_fingerprint
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.surgery import LowRankLinear, compress, target_shapes


def test_loss_terms_match_the_definition():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    T, w = 2.0, 0.3
    loss, kl, ce = distillation_terms(student, teacher, ids, temperature=T, ce_weight=w)
    # reference: explicit sums over positions 0..L-2 (the last one has no next token)
    kl_sum, ce_sum, count = 0.0, 0.0, 0
    for b in range(2):
        for t in range(4):
            p = torch.softmax(teacher[b, t] / T, -1)
            q = torch.softmax(student[b, t] / T, -1)
            kl_sum += float((p * (p.log() - q.log())).sum())
            ce_sum += -float(torch.log_softmax(student[b, t], -1)[ids[b, t + 1]])
            count += 1
    assert float(kl) == pytest.approx(T**2 * kl_sum / count, rel=1e-5)
    assert float(ce) == pytest.approx(ce_sum / count, rel=1e-5)
    assert float(loss) == pytest.approx((1 - w) * float(kl) + w * float(ce), rel=1e-6)
    zero, kl0, _ = distillation_terms(teacher, teacher, ids)
    assert float(kl0) == pytest.approx(0.0, abs=1e-6) and float(zero) == pytest.approx(0.0, abs=1e-6)


def test_schedule_warms_up_then_follows_a_cosine():
    steps, warmup, floor = 20, 4, 0.1
    f = [lr_factor(s, steps, warmup, floor) for s in range(steps)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0) and f[-1] == pytest.approx(floor)
    mid = warmup + (steps - 1 - warmup) / 2  # halfway through the decay: halfway between 1 and the floor
    assert lr_factor(int(mid), steps, warmup, floor) == pytest.approx(
        floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (int(mid) - warmup) / (steps - 1 - warmup)))
    )
    assert all(a >= b for a, b in itertools.pairwise(f[4:]))


@pytest.fixture(scope="module")
def compressed():
    """(teacher, student): a tiny Llama, and its copy compressed to 30% retention by SVD-LLM."""
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    stats = collect_stats(
        student, torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    )
    plan = CompressionPlan.uniform(target_shapes(student), 0.3, "svdllm", model_fingerprint(student))
    compress(student, plan, stats)
    return teacher, student


def test_distillation_lowers_the_loss_and_changes_only_the_factors(compressed):
    teacher, student = copy.deepcopy(compressed[0]), copy.deepcopy(compressed[1])
    g = torch.Generator().manual_seed(1)
    train = [torch.randint(0, VOCAB, (4, 32), generator=g) for _ in range(2)]
    held_out = [torch.randint(0, VOCAB, (4, 32), generator=g)]
    before_train = evaluate_distillation(student, teacher, train, temperature=2.0)
    before_held = evaluate_distillation(student, teacher, held_out, temperature=2.0)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_state = {k: v.clone() for k, v in student.state_dict().items()}
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    calls = []
    result = distill(
        student,
        teacher,
        train,
        steps=12,
        lr=1e-3,
        temperature=2.0,
        grad_clip=1.0,
        progress=lambda done, total, what: calls.append((done, total, what)),
    )
    after_train = evaluate_distillation(student, teacher, train, temperature=2.0)
    after_held = evaluate_distillation(student, teacher, held_out, temperature=2.0)
    assert after_train["loss"] < 0.8 * before_train["loss"]
    assert after_held["loss"] < 0.95 * before_held["loss"]  # it generalises, not only memorises
    assert len(result.history) == 12 and calls[-1] == (12, 12, "distillation")
    assert result.trained_parameters == sum(p.numel() for p in factor_parameters(student))
    factor_names = {
        f"{name}.{part}.weight"
        for name, module in student.named_modules()
        if isinstance(module, LowRankLinear)
        for part in ("left", "right")
    }
    after = student.state_dict()
    for key, value in student_state.items():
        if key in factor_names:
            assert not torch.equal(value, after[key]), key
        else:
            assert torch.equal(value, after[key]), key  # embeddings, norms, untouched matrices
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert {name: p.requires_grad for name, p in student.named_parameters()} == flags
    lrs = [s.lr for s in result.history]
    assert lrs[0] == pytest.approx(1e-3 * lr_factor(0, 12, 1, 0.1))
    assert lrs[-1] == pytest.approx(1e-3 * 0.1)
    assert all(s.grad_norm >= 0 and math.isfinite(s.loss) for s in result.history)


def test_first_recorded_loss_is_the_loss_before_training(compressed):
    teacher, student = copy.deepcopy(compressed[0]), copy.deepcopy(compressed[1])
    batch = [torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))]
    before = evaluate_distillation(student, teacher, batch, temperature=1.5, ce_weight=0.25)
    result = distill(student, teacher, batch, steps=1, lr=1e-3, temperature=1.5, ce_weight=0.25)
    first = result.history[0]
    assert first.loss == pytest.approx(before["loss"], rel=1e-5)
    assert first.kl == pytest.approx(before["kl"], rel=1e-5) and first.ce == pytest.approx(
        before["ce"], rel=1e-5
    )


def test_bad_inputs_are_refused(compressed):
    teacher, student = compressed
    batch = [torch.randint(0, VOCAB, (1, 8))]
    with pytest.raises(ValueError, match="no LowRankLinear"):
        distill(copy.deepcopy(teacher), teacher, batch, steps=1)
    for kwargs, message in [
        ({"steps": -1}, "steps"),
        ({"steps": 1, "lr": 0.0}, "lr"),
        ({"steps": 1, "temperature": 0.0}, "temperature"),
        ({"steps": 1, "ce_weight": 1.5}, "ce_weight"),
        ({"steps": 1, "grad_clip": 0.0}, "grad_clip"),
    ]:
        with pytest.raises(ValueError, match=message):
            distill(student, teacher, batch, **kwargs)
    with pytest.raises(ValueError, match="at least one"):
        distill(student, teacher, [], steps=1)
    with pytest.raises(ValueError, match="seq_len"):
        distill(copy.deepcopy(student), teacher, [torch.randint(0, VOCAB, (8,))], steps=1)
