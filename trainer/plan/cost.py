"""The step-time model of `trainer plan`: FLOPs per rank, the bytes each mesh axis moves, and a stated, simple time.

- Compute: the training FLOPs of the step's tokens (6N + 12 L d T + 6 d V per token, the MFU convention of
  `trainer.metrics`), plus the forward recomputed by activation checkpointing (full: every block and the chunked
  head once more; selective: every other block), split over dp x tp x pp ranks, at `peak x efficiency` (0.45 by
  default), scaled down for small micro-batches (`size_factor`).
- dp axis, per rank per step (ring algorithms: a collective over n ranks moves (n-1)/n of its buffer per rank):
  ddp all-reduces the fp32 gradients once (2x); fsdp ZeRO-3 all-gathers the parameters in forward and again in
  backward for every micro-batch and reduce-scatters the fp32 gradients once; ZeRO-2 gathers once per micro-batch;
  DeepSpeed ZeRO-1/2 reduce-scatter the gradients and all-gather the updated parameters, ZeRO-3 as fsdp's.
- tp axis: sequence parallelism all-gathers the block's input twice and reduce-scatters its output twice in forward,
  and the mirror in backward (8 activation-sized transfers per block per micro-batch), plus the embedding and head.
- pp axis: one activation forward and one gradient backward per stage boundary per micro-batch.
- Time: `compute + tp / bw_tp + pp / bw_pp`, stretched by the schedule's bubble (its action order played with the
  stages' costs), plus the dp traffic that does not hide behind compute (ddp and fsdp overlap it with backward;
  DeepSpeed's ZeRO-1/2 parameter all-gather runs after the step), plus under offload the optimizer state crossing
  PCIe and the CPU's AdamW. Bandwidth is the in-node link while an axis's ranks share a node, else the network's.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.build import model_flops_per_token
from trainer.models import ModelConfig, count_params
from trainer.plan.hardware import Accelerator
from trainer.plan.memory import DTYPE_BYTES, Layout, pipeline_of
from trainer.plan.params import head_cost, meta_model, model_key, n_params

DEFAULT_EFFICIENCY = 0.45  # the share of peak FLOP/s a well-tuned transformer step reaches (MFU)
HALF_EFFICIENCY_TOKENS = 512  # tokens per micro-batch and tp rank at which matmuls reach half that efficiency


def size_factor(tokens: int) -> float:
    """Small matmuls use the device poorly: the efficiency is scaled by tokens / (tokens + 512), the tokens being
    those of one micro-batch on one tp rank (0.67 at 1024, 0.94 at 8192)."""
    return tokens / (tokens + HALF_EFFICIENCY_TOKENS)


@dataclass
class StepCost:
    flops_per_rank: float
    dp_bytes: float
    tp_bytes: float
    pp_bytes: float
    compute_s: float
    comm_s: float
    bubble: float
    step_s: float
    cp_bytes: float = 0.0

    def as_dict(self) -> dict:
        return dict(vars(self))


_FLOPS: dict[str, tuple[float, int]] = {}


def model_flops(model_cfg: ModelConfig, seq_len: int) -> tuple[float, int]:
    """(training FLOPs per token, non-embedding parameters), as `trainer train` counts them for MFU."""
    key = model_key(model_cfg) + str(seq_len)
    if key not in _FLOPS:
        n = count_params(meta_model(model_cfg), exclude_embeddings=True)
        per_token = model_flops_per_token(model_cfg, {"n_params_non_embedding": n}, seq_len)
        _FLOPS[key] = (per_token, n)
    return _FLOPS[key]


def _bw(acc: Accelerator, span: int) -> float:
    """The bandwidth of a collective whose ranks lie `span` ranks apart end to end."""
    return acc.intra_node_bw if span <= acc.gpus_per_node else acc.inter_node_bw


def step_cost(
    model_cfg: ModelConfig, layout: Layout, seq_len: int, acc: Accelerator, efficiency: float = DEFAULT_EFFICIENCY
) -> StepCost:
    per_token, _ = model_flops(model_cfg, seq_len)
    tokens = layout.micro_batch * layout.grad_accum * layout.dp * seq_len  # the global batch
    recompute = {"none": 0.0, "selective": 0.5, "full": 1.0}[layout.activation_checkpointing]
    # a forward is a third of forward + backward; blocks are all but the head's share
    head_share = 6.0 * model_cfg.d_model * model_cfg.vocab_size / per_token
    extra = recompute * (1 - head_share) / 3 + (head_share / 3 if recompute == 1.0 and layout.tp == 1 else 0.0)
    flops = per_token * tokens * (1 + extra) / layout.world
    local_tokens = layout.micro_batch * seq_len // (layout.tp * layout.cp)
    compute = flops / (acc.peak_flops * efficiency * size_factor(local_tokens))

    ce = DTYPE_BYTES[layout.precision]
    n = n_params(model_cfg)
    n_rank = n / (layout.tp * layout.pp)  # parameters of one dp group's shard owners
    dp, m = layout.dp * layout.cp, layout.grad_accum  # gradients are reduced over dp and cp
    ring = (dp - 1) / dp if dp > 1 else 0.0
    if layout.engine == "ddp":
        dp_bytes = 2 * ring * 4 * n_rank
    elif layout.engine == "fsdp":
        gathers = (2 if layout.zero_stage == 3 else 1) * m
        dp_bytes = ring * (gathers * ce * n_rank + 4 * n_rank)
    elif layout.zero_stage == 3:
        dp_bytes = ring * (2 * m * ce * n_rank + 4 * n_rank)
    else:
        dp_bytes = ring * (4 * n_rank + ce * n_rank)
    tp = layout.tp
    layers = model_cfg.n_layer / layout.pp
    cp = layout.cp
    act = layout.micro_batch * seq_len // cp * model_cfg.d_model * ce
    tp_bytes = (8 * layers + 4) * (tp - 1) / tp * act * m if tp > 1 else 0.0
    # cp: each block all-gathers keys and values in forward (and again when recomputed) and reduce-scatters their
    # gradients in backward
    kv = 2 * layout.micro_batch * seq_len * getattr(model_cfg, "n_kv_heads", model_cfg.n_head) * model_cfg.head_dim
    cp_bytes = (2 + (layout.activation_checkpointing != "none")) * layers * (cp - 1) / cp * kv * ce / tp * m
    pp_bytes = 2 * act / tp * m * (2 if layout.pp > 1 else 0)  # sends and receives of an inner stage

    t_tp = tp_bytes / _bw(acc, tp) if tp > 1 else 0.0
    t_tp += cp_bytes / _bw(acc, cp * tp) if cp > 1 else 0.0
    t_pp = pp_bytes / _bw(acc, layout.dp * tp * layout.pp) if layout.pp > 1 else 0.0
    t_dp = dp_bytes / _bw(acc, dp * tp) if dp > 1 else 0.0
    bubble = pipeline_bubble(model_cfg, layout, seq_len) if layout.pp > 1 else 0.0
    busy = compute + t_tp + t_pp
    step = busy / (1 - bubble)
    if layout.engine == "deepspeed" and layout.zero_stage in (1, 2):
        exposed = ring * ce * n_rank / _bw(acc, dp * tp) if dp > 1 else 0.0  # the parameter all-gather after the step
        step += exposed + max(0.0, t_dp - exposed - compute)
    else:
        step += max(0.0, t_dp - compute)
    if layout.offload == "cpu":
        part = n_rank / dp
        step += (4 + ce) * part / acc.pcie_bw + 16 * part / acc.host_adam_bw
    return StepCost(flops, dp_bytes, tp_bytes, pp_bytes, compute, t_tp + t_pp + t_dp, bubble, step, cp_bytes)


_BUBBLES: dict[tuple, float] = {}


def pipeline_bubble(model_cfg: ModelConfig, layout: Layout, seq_len: int) -> float:
    """The largest idle share of any pp rank: the schedule's action order played with each stage's cost (its blocks
    and, on the last stage, the head in blocks), backward twice the forward."""
    from trainer.plan.schedule import play_steady

    key = (model_key(model_cfg), layout.pp, layout.pp_schedule, layout.pp_virtual, layout.pp_split, layout.grad_accum)
    key += (seq_len,)
    if key not in _BUBBLES:
        plan = pipeline_of(model_cfg, layout, seq_len)
        head = head_cost(model_cfg, seq_len)
        costs = []
        for s in range(plan.n_stages):
            c = plan.split[s] + (head if s == plan.n_stages - 1 else 0.0)
            costs.append({"F": c, "B": 2 * c, "I": c, "W": c})
        _BUBBLES[key] = max(play_steady(layout.pp_schedule, layout.pp, layout.grad_accum, costs)["bubble"])
    return _BUBBLES[key]
