"""Distillation fine-tune: after compression, train only the low-rank factors to match the dense teacher.

Loss per batch, over every position t that has a next token (logits z, temperature T):
    KL_t = Σ_v p_teacher(v) · (log p_teacher(v) − log p_student(v)),   p = softmax(z / T)
    loss = (1 − ce_weight) · T² · mean_t KL_t  +  ce_weight · mean_t CE(z_student, next token)
(T² keeps the gradient scale independent of T, as in Hinton et al. 2015.) AdamW on the factor weights
(left, right of every LowRankLinear) only; everything else, biases included, is frozen. The learning
rate warms up linearly, then follows a cosine down to min_lr_ratio · lr; gradients are clipped by
global norm. Works on any device: batches go to the student's device, teacher logits to the student's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sigmascale_core.progress import Progress
from sigmascale_core.surgery import LowRankLinear


@dataclass(frozen=True)
class DistillStep:
    step: int  # 1-based optimiser step
    loss: float  # the mixed loss that was minimised (before the step)
    kl: float  # T²-scaled mean KL(teacher ‖ student)
    ce: float  # mean next-token cross-entropy of the student
    lr: float  # learning rate used by this step
    grad_norm: float  # global gradient norm before clipping


@dataclass(frozen=True)
class DistillResult:
    history: list[DistillStep]  # one record per step
    trained_parameters: int  # elements in the factor weights that were trained
    seconds: float

    def to_dict(self) -> dict:
        return {
            "steps": len(self.history),
            "trained_parameters": self.trained_parameters,
            "seconds": self.seconds,
            "first_loss": self.history[0].loss if self.history else None,
            "last_loss": self.history[-1].loss if self.history else None,
            "history": [asdict(s) for s in self.history],
        }


def distillation_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce) for logits (B, L, V) of the same ids (B, L); the last position has no next token
    and is left out. kl is already scaled by T²; loss = (1 − ce_weight)·kl + ce_weight·ce."""
    s = student_logits[:, :-1].float().reshape(-1, student_logits.shape[-1])  # (B·(L−1), V)
    t = teacher_logits[:, :-1].float().reshape(-1, teacher_logits.shape[-1]).to(s.device)
    log_p_student = F.log_softmax(s / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * temperature**2
    ce = F.cross_entropy(s, ids[:, 1:].reshape(-1).to(s.device))
    return (1 - ce_weight) * kl + ce_weight * ce, kl, ce


def _check(steps: int, lr: float, temperature: float, ce_weight: float, grad_clip: float | None) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if not 0 <= ce_weight <= 1:
        raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight!r}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be positive or None, got {grad_clip!r}")


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights of every LowRankLinear's two factors (not their bias), in module order."""
    params = []
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            params += [module.left.weight, module.right.weight]
    return params


def lr_factor(step: int, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr for 0-based `step`: linear warm-up over warmup_steps (reaching 1 at
    the end of it), then a cosine from 1 down to min_lr_ratio at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = steps - warmup_steps
    progress = (step - warmup_steps) / max(decay - 1, 1)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def evaluate_distillation(
    student: nn.Module,
    teacher: nn.Module,
    token_batches: Sequence[torch.Tensor],
    temperature: float = 1.0,
    ce_weight: float = 0.0,
) -> dict[str, float]:
    """Mean (loss, kl, ce) over the batches, nothing trained: the before/after measure."""
    totals = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
    for ids in token_batches:
        loss, kl, ce = _terms(student, teacher, ids, temperature, ce_weight)
        for key, value in zip(totals, (loss, kl, ce), strict=True):
            totals[key] += float(value) / len(token_batches)
    return totals


def _terms(
    student: nn.Module, teacher: nn.Module, ids: torch.Tensor, temperature: float, ce_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ValueError(f"token batches must be (batch, seq_len ≥ 2), got {tuple(ids.shape)}")
    student_device = next(student.parameters()).device
    teacher_device = next(teacher.parameters()).device
    with torch.no_grad():
        teacher_logits = teacher(ids.to(teacher_device), use_cache=False).logits
    student_logits = student(ids.to(student_device), use_cache=False).logits
    return distillation_terms(student_logits, teacher_logits, ids, temperature, ce_weight)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    token_batches: Sequence[torch.Tensor],
    steps: int,
    lr: float = 1e-4,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    grad_clip: float | None = 1.0,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    progress: Progress | None = None,
) -> DistillResult:
    """Train the student's factor weights (every LowRankLinear) to match the teacher, `steps` AdamW steps
    cycling through `token_batches` ((B, L) id tensors); the student is changed in place.

    Only the factors get gradients; every parameter's requires_grad is restored afterwards, and both
    models keep their train/eval mode (eval: no dropout, so a run is deterministic). warmup_steps
    defaults to 10% of the steps. Returns the per-step history.
    """
    _check(steps, lr, temperature, ce_weight, grad_clip)
    if not token_batches:
        raise ValueError("distillation needs at least one token batch")
    factors = factor_parameters(student)
    if not factors:
        raise ValueError("the student has no LowRankLinear factors to train: compress it first")
    warmup = max(1, steps // 10) if warmup_steps is None else warmup_steps
    if warmup < 0:
        raise ValueError(f"warmup_steps must be non-negative, got {warmup_steps!r}")
    flags = {p: p.requires_grad for p in student.parameters()}
    started = time.perf_counter()
    history: list[DistillStep] = []
    try:
        for p in student.parameters():
            p.requires_grad_(False)
        for p in factors:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(factors, lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, steps, warmup, min_lr_ratio)
        )
        with torch.inference_mode(False), torch.enable_grad():
            for step in range(steps):
                ids = token_batches[step % len(token_batches)]
                loss, kl, ce = _terms(student, teacher, ids, temperature, ce_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(
                    factors, grad_clip if grad_clip is not None else math.inf
                )
                current_lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                schedule.step()
                history.append(
                    DistillStep(step + 1, loss.item(), kl.item(), ce.item(), current_lr, norm.item())
                )
                if progress is not None:
                    progress(step + 1, steps, "distillation")
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    trained = sum(p.numel() for p in factors)
    return DistillResult(history, trained, time.perf_counter() - started)
