"""The engine on a CUDA device agrees with the CPU. Skipped where no GPU is present (CI has none); run
on a GPU machine with `python3 -m pytest tests/test_cuda.py`.

References are the CPU results of the same calls (float64 math on both sides where the engine uses
it), so a device-specific shortcut or a stray `.cpu()` / `.cuda()` shows up as a mismatch or an error.
"""

import copy

import pytest
import torch
from conftest import anisotropic_inputs, decaying_matrix
from tiny import VOCAB, tiny_model

from sigmascale_core import ActivationStats, activation_loss, decompose, loss_curve
from sigmascale_core.calibration import collect_stats
from sigmascale_core.finetune import distill, evaluate_distillation
from sigmascale_core.models import model_fingerprint
from sigmascale_core.perplexity import perplexity
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.surgery import LowRankLinear, compress, target_shapes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def matrix():
    W = decaying_matrix(96, 64, seed=3).float()
    X = anisotropic_inputs(400, 64, seed=4).float()
    return W, X


def test_stats_on_cuda_equal_the_cpu_sums(matrix):
    _, X = matrix
    cpu, gpu = ActivationStats(64), ActivationStats(64).to(CUDA)
    for chunk in X.split(100):
        cpu.update(chunk)
        gpu.update(chunk.to(CUDA))
    assert gpu.gram.device.type == "cuda" and gpu.count == cpu.count
    torch.testing.assert_close(gpu.gram.cpu(), cpu.gram, rtol=1e-6, atol=1e-6 * cpu.gram.abs().max().item())
    torch.testing.assert_close(gpu.abs_mean.cpu(), cpu.abs_mean, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["svd", "asvd", "svdllm", "sigmascale"])
def test_decompose_on_cuda_matches_the_cpu(matrix, method):
    W, X = matrix
    stats = ActivationStats.from_inputs(X)
    cpu = decompose(W, stats, 20, method)
    gpu = decompose(W.to(CUDA), stats.to(CUDA), 20, method)
    assert gpu.left.device.type == gpu.right.device.type == "cuda"
    loss_cpu = activation_loss(W, cpu.to_dense(), stats)
    loss_gpu = activation_loss(W, gpu.to_dense().cpu(), stats)
    if method == "sigmascale":  # float32 Adam on another device: the same optimum, not the same digits
        assert loss_gpu <= activation_loss(W, decompose(W, stats, 20, "asvd").to_dense(), stats) + 1e-9
        assert loss_gpu == pytest.approx(loss_cpu, rel=0.05)
    else:
        assert loss_gpu == pytest.approx(loss_cpu, rel=1e-6)
        torch.testing.assert_close(gpu.to_dense().cpu(), cpu.to_dense(), rtol=1e-4, atol=1e-5)


def test_loss_curve_on_cuda_matches_the_cpu(matrix):
    W, X = matrix
    stats = ActivationStats.from_inputs(X)
    for method in ("svd", "svdllm"):
        cpu = loss_curve(W, stats, method)
        gpu = loss_curve(W.to(CUDA), stats.to(CUDA), method)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-9)


def test_calibrate_compress_and_perplexity_on_cuda_match_the_cpu():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    plan = CompressionPlan.uniform(target_shapes(model), 0.5, "svdllm", model_fingerprint(model))
    gpu_model = copy.deepcopy(model).to(CUDA)
    stats_cpu = collect_stats(model, ids)
    stats_gpu = collect_stats(gpu_model, ids)
    for key, s in stats_cpu.items():
        torch.testing.assert_close(
            stats_gpu[key].gram.cpu(), s.gram, rtol=1e-4, atol=1e-4 * s.gram.abs().max().item()
        )
    compress(model, plan, stats_cpu)
    compress(gpu_model, plan, stats_gpu)
    assert all(p.device.type == "cuda" for p in gpu_model.parameters())
    assert sum(isinstance(m, LowRankLinear) for m in gpu_model.modules()) == len(plan.compressed)
    tokens = torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(1))
    ppl_cpu = perplexity(model, tokens, window=64, batch_size=2)
    ppl_gpu = perplexity(gpu_model, tokens, window=64, batch_size=2)
    assert ppl_gpu.tokens == ppl_cpu.tokens
    assert ppl_gpu.perplexity == pytest.approx(ppl_cpu.perplexity, rel=1e-3)


def test_distillation_on_cuda_lowers_the_loss():
    teacher = tiny_model("llama").to(CUDA)
    student = copy.deepcopy(teacher)
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(2))
    stats = collect_stats(student, ids)
    compress(student, CompressionPlan.uniform(target_shapes(student), 0.3, "svd", "x"), stats)
    batches = list(ids.split(4))
    before = evaluate_distillation(student, teacher, batches)["loss"]
    distill(student, teacher, batches, steps=10, lr=3e-3)
    after = evaluate_distillation(student, teacher, batches)["loss"]
    assert after < before
