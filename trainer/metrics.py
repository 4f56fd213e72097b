"""Throughput accounting: training FLOPs per token, the device's peak FLOP/s, MFU and peak memory.

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOP/s / peak dense FLOP/s of the device. "Model FLOPs"
are the FLOPs the model needs (forward + backward), not what the hardware ends up executing, so activation
recomputation does not raise MFU.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time

import torch

from trainer.errors import UserError

# Dense (no sparsity) peak FLOP/s from vendor spec sheets, per accelerator, by precision of the matmul inputs.
# "bf16"/"fp16" are tensor-core numbers with fp32 accumulation (what PyTorch uses); "tf32" is the tensor-core rate for
# fp32 inputs when TF32 matmuls are allowed; "fp32" the plain fp32 rate. Order matters: the first name that is a
# substring of torch's device name wins, so specific names ("H100 PCIe", "A10G", "L40S") come before general ones.
_GPU_PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    ("H200 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),  # SXM, e.g. "H100 80GB HBM3"
    ("H800", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    ("B200", {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12, "fp32": 75e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("A800", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),  # no bf16 or tf32 tensor cores
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
    ("RTX 4090", {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    ("RTX 3090", {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    ("MI325X", {"bf16": 1307e12, "fp16": 1307e12, "tf32": 654e12, "fp32": 163e12}),
    ("MI300X", {"bf16": 1307e12, "fp16": 1307e12, "tf32": 654e12, "fp32": 163e12}),
    ("MI250X", {"bf16": 383e12, "fp16": 383e12, "fp32": 95.7e12}),
    ("MI250", {"bf16": 362e12, "fp16": 362e12, "fp32": 90.5e12}),
]

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

_measured_peak_cache: dict[tuple, float] = {}


def flops_per_token(
    n_params_non_embedding: int,
    n_layer: int,
    d_model: int,
    seq_len: int,
    causal: bool,
    vocab_size: int = 0,
    attention_dim: int | None = None,
) -> float:
    """Training (forward + backward) FLOPs per token: 6*N + 12*L*d*T + 6*d*V.

    - 6*N: every non-embedding weight does one multiply-add (2 FLOPs) per token forward and two backward.
    - 12*L*d*T: attention scores (QK^T) and the weighted sum (AV), 2*2*d*T FLOPs per token per layer forward, times 3.
      Counted over the full T x T score matrix for causal and bidirectional models alike (the PaLM / nanoGPT /
      torchtitan convention), so `causal` does not change the count and MFU stays comparable with published numbers.
      d is the width of the query/key products over all heads: `attention_dim` (n_head * head_dim) where that is not
      d_model (Qwen3).
    - 6*d*V: the output projection to the vocabulary (LM head / MLM decoder). It is real compute even when its
      weight is tied to the embedding, which keeps it out of N; pass vocab_size=0 to leave it out.
    """
    for name, value in [
        ("n_params_non_embedding", n_params_non_embedding),
        ("n_layer", n_layer),
        ("d_model", d_model),
        ("seq_len", seq_len),
        ("vocab_size", vocab_size),
    ]:
        if value < 0:
            raise UserError(f"flops_per_token: {name}={value} is negative; pass the model's real size")
    del causal  # same count either way, see the docstring
    attention = d_model if attention_dim is None else attention_dim
    return 6.0 * n_params_non_embedding + 12.0 * n_layer * attention * seq_len + 6.0 * d_model * vocab_size


def _precision_key(dtype: torch.dtype) -> str:
    """The peak-table column for matmuls with inputs of `dtype` (fp32 reads as tf32 when PyTorch allows TF32)."""
    if dtype not in _DTYPE_KEYS:
        raise UserError(f"peak_flops: unsupported dtype {dtype}; use torch.float32, torch.bfloat16 or torch.float16")
    key = _DTYPE_KEYS[dtype]
    if key == "fp32" and torch.get_float32_matmul_precision() != "highest":
        key = "tf32"
    return key


def gpu_peak_from_table(device_name: str, dtype: torch.dtype) -> tuple[float, str] | None:
    """Look up the dense peak FLOP/s of a GPU by its name (as torch reports it); None when the name is unknown."""
    key = _precision_key(dtype)
    for pattern, peaks in _GPU_PEAK_FLOPS:
        if pattern.lower() in device_name.lower():
            # Missing precisions fall back to the plain fp32 rate (e.g. bf16 on V100/T4 has no tensor cores).
            column = key if key in peaks else "fp32"
            return peaks[column], f"spec sheet: {pattern} dense {column} peak ({device_name})"
    return None


def _synchronize(device: torch.device) -> None:
    """Wait for queued kernels on `device` so timings cover the work, whatever the backend."""
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    if backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, budget_s: float = 1.0) -> float:
    """FLOP/s of the fastest of the square matmuls on `device` in `dtype` that fit in ~`budget_s` of wall time (at
    least three; up to 2048 x 2048 on CPU, 4096 on accelerators; the largest size, grown from 256, whose one product
    takes at most a tenth of the budget: smaller e.g. for fp16 on CPU).

    Used where no spec sheet applies (CPUs, unknown accelerators). It runs on the current torch thread count, so it
    is the peak this process can reach, the one its MFU is measured against. The best single product, not a mean: a
    shared machine's neighbours only ever slow a trial down, and the same rule every time keeps MFU comparable. The
    budget is wall time, so a loaded machine does not make the measurement take longer (only read lower)."""
    start = time.perf_counter()
    largest = 2048 if device.type == "cpu" else 4096

    def operands(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two n x n operands, after one product of them (warm-up: thread pool, kernel selection)."""
        x, y = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        torch.matmul(x, y)
        _synchronize(device)
        return x, y

    def one_product() -> float:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _synchronize(device)
        return time.perf_counter() - t0

    # grow from a small product, never start from the largest: fp16 has no fast kernel on most CPUs, where one
    # 2048^3 product takes 15-50 s (the first run of a tiny fp16 model spent 100 s here)
    size = 256
    a, b = operands(size)
    one = one_product()
    while size < largest and 8 * one <= budget_s / 10:  # twice the size, about 8 times the work: still in budget
        size *= 2
        a, b = operands(size)
        one = one_product()
    while one > budget_s / 10 and size > 128:  # slower than predicted (a loaded machine): shrink
        size //= 2
        a, b = a[:size, :size].contiguous(), b[:size, :size].contiguous()
        one = one_product()
    times = [one]
    while len(times) < 3 or time.perf_counter() - start < budget_s:
        times.append(one_product())
    return 2.0 * size**3 / min(times)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak dense FLOP/s of one `device` for matmuls in `dtype`, and where the number comes from.

    GPUs: the spec-sheet table above, by device name. CPUs and accelerators missing from the table: a short matmul
    benchmark, measured once per process (per device, dtype and thread count) and cached.
    """
    device = torch.device(device)
    key = _precision_key(dtype)
    name = ""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = gpu_peak_from_table(name, dtype)
        if found is not None:
            return found
    cache_key = (device.type, device.index, dtype, key, torch.get_num_threads())
    if cache_key not in _measured_peak_cache:
        _measured_peak_cache[cache_key] = measure_matmul_peak(device, dtype)
    where = f"{name or device.type}, {torch.get_num_threads()} threads" if device.type == "cpu" else name or str(device)
    return _measured_peak_cache[cache_key], f"measured {key} matmul peak ({where})"


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: tokens_per_s * flops_per_token / peak (all for the same devices); NaN without a peak.
    Plain arithmetic against a fixed peak: a training loop logs PeakMeter.mfu, which keeps the figure honest."""
    if not (peak > 0 and math.isfinite(peak)):
        return math.nan
    return tokens_per_s * flops_per_token / peak


PEAK_ENV = "TRAINER_PEAK_TFLOPS"


def named_peak() -> tuple[float, str] | None:
    """The per-device peak the user names in $TRAINER_PEAK_TFLOPS (dense TFLOP/s in the run's compute dtype), for an
    accelerator missing from the spec-sheet table or a CPU whose peak is known; None when unset. Used as a spec
    sheet is: never re-measured, raised only if a step beats it."""
    text = os.environ.get(PEAK_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{PEAK_ENV}={text!r} is not a positive number of TFLOP/s per device: fix it or unset it")
    return value * 1e12, f"{PEAK_ENV}={text} per device"


class PeakMeter:
    """The peak FLOP/s that MFU is measured against, for `world_size` ranks of `device` computing in `dtype`, and MFU
    against it: one figure, never above 1.0.

    A peak must be one that load cannot shrink. A peak named in $TRAINER_PEAK_TFLOPS comes first, then GPUs in the
    spec-sheet table: the table's dense peak. CPUs and accelerators missing from it: the best of several short matmul
    products at start-up (about `budget_s`; shared with peak_flops' cache). Load on a shared machine only ever makes a measurement low, so when a step's achieved FLOP/s
    beats the peak, the peak was measured low: it is measured again (at most once per `remeasure_every_s`) and becomes
    the best of the old peak, the new measurement and the achieved figure. A figure above a spec sheet means the FLOP
    count or the table is wrong: the peak is raised to it as a last resort. Every raise is recorded in `source`.

    Attributes: `peak` (FLOP/s of all ranks together), `per_device`, `source` (where the peak comes from, and any
    raise), `raises` (how many times a step beat the peak)."""

    def __init__(
        self,
        device: torch.device | str,
        dtype: torch.dtype,
        world_size: int = 1,
        *,
        budget_s: float = 0.8,
        remeasure_every_s: float = 30.0,
    ) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise UserError(f"PeakMeter: world_size={world_size!r} must be a positive integer")
        self.device, self.dtype, self.world_size = torch.device(device), dtype, world_size
        self.budget_s, self.remeasure_every_s = budget_s, remeasure_every_s
        key = _precision_key(dtype)
        found = named_peak()
        if found is None and self.device.type == "cuda":
            found = gpu_peak_from_table(torch.cuda.get_device_name(self.device), dtype)
        self.measured = found is None  # False: a spec sheet, which load cannot shrink and is never re-measured
        if found is not None:
            self.per_device, self._base = found
        else:
            self._cache_key = (self.device.type, self.device.index, dtype, key, torch.get_num_threads())
            cached = _measured_peak_cache.get(self._cache_key, 0.0)
            self.per_device = max(cached, measure_matmul_peak(self.device, dtype, budget_s))
            _measured_peak_cache[self._cache_key] = self.per_device
            threads = f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""
            self._base = f"best measured {key} matmul peak ({self.device}{threads})"
        self._remeasured_at: float | None = None  # the first step to beat the peak always re-measures
        self.raises = 0
        self.source = self._base

    @property
    def peak(self) -> float:
        """Peak FLOP/s of all ranks together."""
        return self.per_device * self.world_size

    def mfu(self, tokens_per_s: float, flops_per_token: float) -> float:
        """Model FLOPs utilisation of a step that processed `tokens_per_s` (all ranks) at `flops_per_token`: achieved
        FLOP/s / peak, in [0, 1]; NaN when the inputs are not finite. Raises the peak first if the step beat it."""
        achieved = tokens_per_s * flops_per_token
        if not math.isfinite(achieved) or achieved < 0:
            return math.nan
        if achieved > self.peak:
            self._raise(achieved / self.world_size)
        return min(1.0, achieved / self.peak)  # above 1 only by rounding once raised: the last-resort clamp

    def _raise(self, achieved_per_device: float) -> None:
        remeasured = 0.0
        now = time.monotonic()
        if self.measured and (self._remeasured_at is None or now - self._remeasured_at >= self.remeasure_every_s):
            remeasured = measure_matmul_peak(self.device, self.dtype, self.budget_s)
            self._remeasured_at = time.monotonic()
        self.per_device = max(self.per_device, achieved_per_device, remeasured)
        self.raises += 1
        if self.measured:
            _measured_peak_cache[self._cache_key] = max(_measured_peak_cache.get(self._cache_key, 0.0), self.per_device)
            how = "steps beat it: the best of it, their figure and a re-measurement"
        else:
            how = "steps beat the spec sheet (check the FLOP count): their figure"
        self.source = (
            f"{self._base}; raised {self.raises}x as {how}, now {self.per_device / 1e12:.4g} TFLOP/s per device"
        )


def mem_peak_gb(device: torch.device) -> float:
    """Peak memory in GB (1e9 bytes): allocated tensor memory on an accelerator, peak resident set size on CPU.

    On CPU this is the whole process's high-water mark since it started (ru_maxrss cannot be reset).
    """
    device = torch.device(device)
    if device.type == "cpu":
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / 1e9 if sys.platform == "darwin" else maxrss * 1024 / 1e9  # bytes on macOS, KiB on Linux
    backend = getattr(torch, device.type, None)
    if backend is not None and hasattr(backend, "max_memory_allocated"):
        return backend.max_memory_allocated(device) / 1e9
    return math.nan
