"""The DeepSpeed config generated from ours, and the notice while DeepSpeed compiles its C++ ops. (Training under
DeepSpeed against the single-process run, resume and export are in test_parallel.py; refusals in test_errors.py.)"""

from __future__ import annotations

import pytest

from trainer.config import ParallelConfig, TrainConfig
from trainer.engines.deepspeed import announce_op_builds, deepspeed_config
from trainer.errors import UserError


def test_generated_config_follows_ours_and_takes_extra_settings():
    t = TrainConfig(micro_batch=3, grad_accum=4, grad_clip=0.5, precision="bf16")
    p = ParallelConfig(
        engine="deepspeed", zero_stage=3, offload="cpu", deepspeed={"zero_optimization": {"overlap_comm": True}}
    )
    c = deepspeed_config(t, p, dp=2, d_model=64)
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (3, 4, 24)
    assert c["gradient_clipping"] == 0.5 and c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    assert c["data_types"]["grad_accum_dtype"] == "fp32"
    zero = c["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True and zero["reduce_bucket_size"] == 64 * 64
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    # an extra setting equal to ours is no contradiction; one that differs is
    same = ParallelConfig(engine="deepspeed", zero_stage=2, deepspeed={"gradient_clipping": 1.0})
    assert deepspeed_config(TrainConfig(), same, dp=1, d_model=64)["gradient_clipping"] == 1.0
    other = ParallelConfig(engine="deepspeed", zero_stage=2, deepspeed={"train_batch_size": 64})
    with pytest.raises(UserError, match="train_batch_size=64 contradicts train.micro_batch x train.grad_accum x dp"):
        deepspeed_config(TrainConfig(), other, dp=2, d_model=64)


def test_first_use_says_deepspeed_is_compiling(tmp_path, monkeypatch, capsys):
    """With an empty extension cache the console says which ops compile and where they are kept; once they are there,
    nothing is said."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    announce_op_builds("cpu")
    out = capsys.readouterr().out
    assert "compiling its C++ op(s) deepspeed_shm_comm, cpu_adam" in out and str(tmp_path) in out, out
    for name in ("deepspeed_shm_comm", "cpu_adam"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / f"{name}.so").write_bytes(b"")
    announce_op_builds("cpu")
    assert capsys.readouterr().out == ""
