"""FLOPs accounting, peak FLOP/s lookup and measurement, MFU and memory."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trainer import metrics
from trainer.errors import UserError
from trainer.metrics import PeakMeter, flops_per_token, gpu_peak_from_table, mem_peak_gb, mfu, peak_flops
from trainer.models import build_model, count_params


@pytest.fixture(autouse=True)
def measured_peaks(monkeypatch):
    """These tests measure peaks: the suite's named peak (conftest) is unset here."""
    monkeypatch.delenv(metrics.PEAK_ENV, raising=False)


def test_flops_per_token_gpt2_small_by_hand():
    # gpt2-small: 12 layers, d_model 768, context 1024, vocab 50257 (tied). Non-embedding params: per layer
    # attention 4*768*768 + 4*768 = 2,362,368, MLP 8*768*768 + 4*768 + 768 = 4,722,432, two LayerNorms 3,072:
    # 7,087,872 per layer, 85,054,464 for 12 layers, plus the final LayerNorm 1,536 = 85,056,000.
    n_nonemb = 85_056_000
    # 6*N = 510,336,000; 12*L*d*T = 12*12*768*1024 = 113,246,208; 6*d*V = 6*768*50257 = 231,584,256.
    assert flops_per_token(n_nonemb, 12, 768, 1024, causal=True) == 510_336_000 + 113_246_208
    assert flops_per_token(n_nonemb, 12, 768, 1024, causal=True, vocab_size=50257) == 855_166_464
    # The attention term is counted in full for causal and bidirectional models alike (documented convention).
    assert flops_per_token(n_nonemb, 12, 768, 1024, causal=False) == flops_per_token(n_nonemb, 12, 768, 1024, True)


FLOP_MODELS = {
    "gpt": ("gpt", {"n_head": 4}),
    "bert": ("bert", {"n_head": 4}),
    "llama-gqa-untied": ("llama", {"n_head": 4, "n_kv_heads": 2}),
    "qwen3-tied-head_dim": (
        "llama",
        {"n_head": 4, "n_kv_heads": 2, "head_dim": 32, "qk_norm": True, "tie_embeddings": True},
    ),
}


@pytest.mark.parametrize("name", FLOP_MODELS)
def test_flops_per_token_matches_pytorchs_flop_counter(name):
    """PyTorch's FlopCounterMode over a real forward + backward (attention on its math path, so its matmuls are
    counted too) gives the trainer's FLOPs per token (the figure MFU uses) exactly, once the formula's 6 FLOPs per
    token for each bias and norm parameter (in N by the nanoGPT/PaLM convention; no matmul) are taken out. A wrong
    factor anywhere (the attention term and its width when head_dim * n_head != d_model, a tied or untied LM head,
    forward vs backward) breaks the equality."""
    from trainer.build import model_flops_per_token

    arch, dims = FLOP_MODELS[name]
    n_layer, d_model, vocab, batch, seq = 2, 64, 512, 2, 64
    model = build_model(arch, n_layer=n_layer, d_model=d_model, vocab_size=vocab, max_seq_len=seq, **dims)
    ids = torch.randint(0, vocab, (batch, seq))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids).float().sum().backward()
    counted = counter.get_total_flops() / (batch * seq)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    not_matmul = sum(p.numel() for p in model.parameters() if p.dim() < 2 and id(p) not in embeddings)
    counts = {"n_params_non_embedding": count_params(model, exclude_embeddings=True)}
    assert counted + 6 * not_matmul == model_flops_per_token(model.config, counts, seq)


def test_flops_per_token_rejects_negative_sizes():
    with pytest.raises(UserError, match="n_layer"):
        flops_per_token(1000, -1, 64, 32, causal=True)


def test_peak_table_h100_bf16():
    flops, source = gpu_peak_from_table("NVIDIA H100 80GB HBM3", torch.bfloat16)
    assert flops == 989e12
    assert "H100" in source and "bf16" in source


def test_peak_table_specific_names_win_and_unknown_is_none():
    assert gpu_peak_from_table("NVIDIA H100 PCIe", torch.bfloat16)[0] == 756e12
    assert gpu_peak_from_table("NVIDIA A10G", torch.float16)[0] == 70e12
    assert gpu_peak_from_table("NVIDIA L40S", torch.bfloat16)[0] == 362e12
    assert gpu_peak_from_table("NVIDIA A100-SXM4-80GB", torch.float32)[0] in (19.5e12, 156e12)  # fp32 or tf32
    assert gpu_peak_from_table("Tesla V100-SXM2-16GB", torch.bfloat16)[0] == 15.7e12  # no bf16 tensor cores
    assert gpu_peak_from_table("Mystery Accelerator 9000", torch.bfloat16) is None


def test_peak_table_fp32_follows_tf32_setting():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert gpu_peak_from_table("NVIDIA H100 80GB HBM3", torch.float32)[0] == 67e12
        torch.set_float32_matmul_precision("high")
        assert gpu_peak_from_table("NVIDIA H100 80GB HBM3", torch.float32)[0] == 495e12
    finally:
        torch.set_float32_matmul_precision(before)


def test_cpu_peak_is_measured_once_and_cached():
    t0 = time.perf_counter()
    first, source = peak_flops(torch.device("cpu"), torch.float32)
    first_s = time.perf_counter() - t0
    assert first > 1e8 and math.isfinite(first)
    assert "measured" in source and "threads" in source
    t0 = time.perf_counter()
    second, _ = peak_flops(torch.device("cpu"), torch.float32)
    assert second == first
    assert time.perf_counter() - t0 < 0.01
    assert first_s < 2.0


def test_peak_flops_rejects_unsupported_dtype():
    with pytest.raises(UserError, match="dtype"):
        peak_flops(torch.device("cpu"), torch.int8)


def test_mfu_arithmetic():
    # 10k tok/s * 855,166,464 FLOPs/token = 8.55e12 FLOP/s against a 989 TFLOP/s peak.
    assert mfu(10_000, 855_166_464, 989e12) == pytest.approx(8_551_664_640_000 / 989e12)
    assert mfu(1.0, 2.0, 4.0) == 0.5
    assert math.isnan(mfu(1.0, 2.0, 0.0))
    assert math.isnan(mfu(1.0, 2.0, math.nan))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_slow_dtype_is_measured_within_the_budget(dtype):
    """fp16 (and bf16 without AVX-512) matmuls are slow on CPU: one 2048^3 product took 15-50 s, and a tiny fp16 run
    spent 100 s measuring its peak before its first step. The size grows from a small product instead."""
    t0 = time.perf_counter()
    meter = PeakMeter("cpu", dtype)
    assert time.perf_counter() - t0 < 3.0 and meter.per_device > 0


def test_peak_meter_cpu_is_measured_in_under_a_second_and_scales_with_ranks():
    t0 = time.perf_counter()
    meter = PeakMeter("cpu", torch.float32, world_size=3)
    assert time.perf_counter() - t0 < 1.5  # ~budget_s (0.8 s); a loaded machine only makes products slower
    assert meter.per_device > 1e8 and meter.peak == 3 * meter.per_device
    assert meter.source.startswith("best measured fp32 matmul peak (cpu, ") and meter.raises == 0
    fpt = 1e6
    assert meter.mfu(0.25 * meter.peak / fpt, fpt) == pytest.approx(0.25)  # below the peak: plain arithmetic
    assert meter.raises == 0 and math.isnan(meter.mfu(math.nan, fpt)) and meter.mfu(0.0, fpt) == 0.0


def test_peak_meter_never_reports_above_one_and_raises_a_low_peak(monkeypatch):
    """The reported case: the start-up measurement ran under load (69 GFLOP/s against ~180 later), so steps achieved
    124% of it. MFU stays <= 1: the first step to beat the peak re-measures and takes the best figure; later ones
    (within remeasure_every_s) raise it to their own figure; each raise is in `source`."""
    measurements = [69e9, 180e9]
    calls = []
    monkeypatch.setattr(metrics, "_measured_peak_cache", {})
    monkeypatch.setattr(
        metrics, "measure_matmul_peak", lambda *args: calls.append(args) or measurements[len(calls) - 1]
    )
    meter = PeakMeter("cpu", torch.float32, world_size=2, remeasure_every_s=3600)
    assert meter.peak == 2 * 69e9 and len(calls) == 1
    fpt = 1e6
    assert meter.mfu(1.24 * meter.peak / fpt, fpt) == pytest.approx(1.24 * 69 / 180)
    assert meter.peak == 2 * 180e9 and len(calls) == 2 and meter.raises == 1
    assert "raised 1x" in meter.source and "re-measurement" in meter.source and "now 0.18 TFLOP/s" in meter.source
    assert meter.mfu(2 * 150e9 / fpt, fpt) == pytest.approx(150 / 180) and meter.raises == 1  # below: no change
    assert meter.mfu(2 * 200e9 / fpt, fpt) == 1.0  # beats the re-measured peak: raised to it, not re-measured
    assert meter.peak == pytest.approx(2 * 200e9) and len(calls) == 2 and "raised 2x" in meter.source
    assert meter.mfu(2 * 100e9 / fpt, fpt) == pytest.approx(0.5)  # the raised peak stays
    assert peak_flops(torch.device("cpu"), torch.float32)[0] == pytest.approx(200e9)  # peak_flops shares it


def test_peak_meter_gpu_uses_the_spec_sheet(monkeypatch):
    """On a GPU in the table: the spec sheet, not a measurement, times the ranks; a figure above it (a FLOP count or
    table entry that is wrong) is clamped to 1 and recorded."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    meter = PeakMeter("cuda", torch.bfloat16, world_size=8)
    assert meter.peak == 8 * 989e12 and meter.source.startswith("spec sheet: H100 dense bf16 peak")
    assert meter.mfu(1e6, 8 * 989e12 * 0.4 / 1e6) == pytest.approx(0.4)
    assert meter.mfu(1e6, 8 * 989e12 * 1.2 / 1e6) == 1.0
    assert meter.raises == 1 and "beat the spec sheet" in meter.source


def test_a_named_peak_is_used_as_given_and_never_measured(monkeypatch):
    """$TRAINER_PEAK_TFLOPS: the per-device peak as given, no measurement at start-up or on a raise; a bad value is
    one line naming the variable."""
    monkeypatch.setenv(metrics.PEAK_ENV, "0.5")
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda *a, **k: pytest.fail("a named peak is never measured"))
    meter = PeakMeter("cpu", torch.float32, world_size=2)
    assert meter.peak == 2 * 0.5e12 and not meter.measured and meter.source == "TRAINER_PEAK_TFLOPS=0.5 per device"
    assert meter.mfu(1e6, 0.25e12 / 1e6) == pytest.approx(0.25)
    assert meter.mfu(1e6, 2 * 0.6e12 / 1e6) == 1.0 and meter.per_device == pytest.approx(0.6e12)  # beaten: raised
    for bad in ("fast", "0", "-3", "nan"):
        monkeypatch.setenv(metrics.PEAK_ENV, bad)
        with pytest.raises(UserError, match=f"TRAINER_PEAK_TFLOPS='{bad}' is not a positive number"):
            PeakMeter("cpu", torch.float32)


def test_mem_peak_gb_cpu_is_process_rss():
    before = mem_peak_gb(torch.device("cpu"))
    assert 0.01 < before < 1000
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    assert block.sum() > 0
    assert mem_peak_gb(torch.device("cpu")) >= before
