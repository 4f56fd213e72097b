"""The accelerators `trainer plan` knows: memory, dense bf16 peak FLOP/s and link bandwidths, every one overridable.

Figures are the vendors' published dense (no sparsity) bf16 tensor-core peaks and per-GPU link bandwidths in one
direction: NVLink / Infinity Fabric within a node, the node's InfiniBand or Ethernet share per GPU across nodes
(e.g. 8 x 400 Gb/s NICs per 8-GPU node: 50 GB/s per GPU). Usable memory is `memory x headroom` (default 0.9): the
rest goes to the CUDA context, NCCL's buffers and the caching allocator's fragmentation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from trainer.errors import UserError

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory: int  # bytes
    peak_flops: float  # dense bf16 FLOP/s
    intra_node_bw: float  # bytes/s per GPU, one direction, within a node
    inter_node_bw: float  # bytes/s per GPU, one direction, across nodes
    gpus_per_node: int = 8
    pcie_bw: float = 25 * GB  # host <-> device, for offloaded optimizer state
    host_adam_bw: float = 10 * GB  # bytes of optimizer state a node's CPUs step per second per GPU (offload)

    def describe(self) -> str:
        return (
            f"{self.name}: {self.memory / GiB:.0f} GiB, {self.peak_flops / 1e12:.0f} TFLOP/s bf16, "
            f"{self.intra_node_bw / GB:.0f} GB/s in a node, {self.inter_node_bw / GB:.1f} GB/s across nodes per GPU"
        )


GPUS = {
    "h100": Accelerator("h100", 80 * GiB, 989e12, 450 * GB, 50 * GB),
    "h200": Accelerator("h200", 141 * GiB, 989e12, 450 * GB, 50 * GB),
    "b200": Accelerator("b200", 180 * GiB, 2250e12, 900 * GB, 100 * GB),
    "a100": Accelerator("a100", 80 * GiB, 312e12, 300 * GB, 25 * GB),
    "a100-40g": Accelerator("a100-40g", 40 * GiB, 312e12, 300 * GB, 25 * GB),
    "l40s": Accelerator("l40s", 48 * GiB, 362e12, 32 * GB, 12.5 * GB),
    "a10g": Accelerator("a10g", 24 * GiB, 125e12, 16 * GB, 6.25 * GB),
    "v100": Accelerator("v100", 32 * GiB, 125e12, 150 * GB, 12.5 * GB),
    "mi300x": Accelerator("mi300x", 192 * GiB, 1307e12, 448 * GB, 50 * GB),
}
GPUS["a100-80g"] = replace(GPUS["a100"], name="a100-80g")
GPUS["h100-80g"] = replace(GPUS["h100"], name="h100-80g")


def parse_bytes(text: str) -> int:
    """'80GiB', '40GB', '24G', '512MiB' -> bytes (G and GiB are binary, GB decimal)."""
    m = re.fullmatch(r"\s*([0-9]+\.?[0-9]*|\.[0-9]+)\s*([KMGT]?)(i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"cannot read {text!r} as a memory size: write it like 80GiB, 40GB or 24G")
    value, unit, suffix = float(m.group(1)), m.group(2).upper(), m.group(3).lower()
    power = "KMGT".index(unit) + 1 if unit else 0
    base = 1000 if suffix == "b" else 1024  # "GB" decimal; "GiB" and bare "G" binary
    return int(value * base**power)


def _positive(value: float | None, option: str) -> None:
    """A figure the planner divides by or compares against must be above zero (one line otherwise)."""
    if value is not None and not value > 0:
        raise UserError(f"{option} {value:g} must be above zero: give the GPU's real figure")


def accelerator(
    gpu: str | None,
    gpu_memory: str | None = None,
    peak_tflops: float | None = None,
    intra_node_gbps: float | None = None,
    inter_node_gbps: float | None = None,
    gpus_per_node: int | None = None,
) -> Accelerator:
    """The named GPU (default h100) with any figure overridden; --gpu-memory alone keeps the h100's speeds."""
    name = (gpu or "h100").lower()
    if name not in GPUS:
        raise UserError(f"unknown --gpu {gpu!r}: choose one of {', '.join(sorted(GPUS))}, or give --gpu-memory")
    acc = GPUS[name]
    for value, option in (
        (peak_tflops, "--peak-tflops"),
        (intra_node_gbps, "--intra-node-gbps"),
        (inter_node_gbps, "--inter-node-gbps"),
        (gpus_per_node, "--gpus-per-node"),
    ):
        _positive(value, option)
    if gpu_memory is not None:
        memory = parse_bytes(gpu_memory)
        if memory < 1:
            raise UserError(f"--gpu-memory {gpu_memory} is no memory at all: give the memory of one GPU, e.g. 80GiB")
        acc = replace(acc, memory=memory, name=f"{acc.name} ({gpu_memory})" if gpu else gpu_memory)
    if peak_tflops is not None:
        acc = replace(acc, peak_flops=peak_tflops * 1e12)
    if intra_node_gbps is not None:
        acc = replace(acc, intra_node_bw=intra_node_gbps * GB)
    if inter_node_gbps is not None:
        acc = replace(acc, inter_node_bw=inter_node_gbps * GB)
    if gpus_per_node is not None:
        acc = replace(acc, gpus_per_node=gpus_per_node)
    return acc
