"""Bad input: one line on stderr naming the problem and the fix, exit code 2, no traceback, nothing saved is lost."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_cli, tiny_config, write_config

from trainer.cli import main
from trainer.config import load_config
from trainer.errors import UserError


def cli_error(capsys, *argv: str) -> str:
    """The one line a command fails with: exit code 2, exactly one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_config_overrides_are_typed(tmp_path, corpus, gpt_tok):
    path = write_config(tiny_config(tmp_path / "r", corpus, gpt_tok), tmp_path / "c.yaml")
    cfg = load_config(
        path,
        [
            "train.lr=3e-4",
            "data.train=[a.txt,b.txt]",
            "log.wandb.mode=disabled",
            "train.compile=true",
            "model.preset=gpt-tiny",
        ],
    )
    assert cfg.train.lr == 3e-4 and cfg.data.train == ["a.txt", "b.txt"] and cfg.train.compile is True
    assert cfg.model.preset == "gpt-tiny" and cfg.log.wandb.mode == "disabled"
    assert load_config(path, ["data.train=x.txt"]).data.train == ["x.txt"]


def test_unknown_key_is_named_with_the_closest_one(tmp_path, corpus, gpt_tok):
    """Through a real subprocess, as a user sees it."""
    path = write_config(tiny_config(tmp_path / "r", corpus, gpt_tok), tmp_path / "c.yaml")
    r = run_cli("trainer", "train", str(path), "train.stepz=3")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: unknown config key train.stepz (did you mean train.steps?)"
    assert not (tmp_path / "r").exists()


def test_unknown_key_in_yaml(tmp_path, capsys, corpus, gpt_tok):
    cfg = tiny_config(tmp_path / "r", corpus, gpt_tok)
    cfg["train"]["warmup"] = 10
    line = cli_error(capsys, "train", str(write_config(cfg, tmp_path / "c.yaml")))
    assert "train.warmup" in line and "train.warmup_steps" in line


def test_wrong_type(tmp_path, capsys, corpus, gpt_tok):
    path = write_config(tiny_config(tmp_path / "r", corpus, gpt_tok), tmp_path / "c.yaml")
    line = cli_error(capsys, "train", str(path), "train.steps=many")
    assert "train.steps" in line and "integer" in line and "'many'" in line
    line = cli_error(capsys, "train", str(path), "train.precision=fp8")
    assert "train.precision" in line and "bf16" in line


def test_missing_config_file(tmp_path, capsys):
    assert "does not exist" in cli_error(capsys, "train", str(tmp_path / "nope.yaml"))


def test_missing_corpus_file_and_empty_glob(tmp_path, capsys, corpus, gpt_tok):
    path = write_config(tiny_config(tmp_path / "r", corpus, gpt_tok), tmp_path / "c.yaml")
    line = cli_error(capsys, "train", str(path), f"data.train=[{tmp_path / 'missing.txt'}]")
    assert "missing.txt" in line
    line = cli_error(capsys, "train", str(path), f"data.train=[{tmp_path / 'none' / '*.jsonl'}]")
    assert "*.jsonl" in line


def test_tokenizer_larger_than_model_vocab(tmp_path, capsys, corpus, gpt_tok):
    path = write_config(tiny_config(tmp_path / "r", corpus, gpt_tok), tmp_path / "c.yaml")
    line = cli_error(capsys, "train", str(path), "model.vocab_size=100")
    assert "512 tokens" in line and "model.vocab_size" in line


def test_seq_len_beyond_positions(tmp_path, capsys, corpus, gpt_tok):
    path = write_config(tiny_config(tmp_path / "r", corpus, gpt_tok), tmp_path / "c.yaml")
    line = cli_error(capsys, "train", str(path), "data.seq_len=128")
    assert "data.seq_len=128" in line and "64 positions" in line


def test_wrong_tokenizer_kind_for_arch(tmp_path, capsys, corpus, bert_tok):
    path = write_config(tiny_config(tmp_path / "r", corpus, bert_tok, "gpt"), tmp_path / "c.yaml")
    assert "--kind bpe" in cli_error(capsys, "train", str(path))


def test_invalid_json_lines_skipped_or_fatal(tmp_path, capfd, corpus, gpt_tok):
    rows = [json.dumps({"text": p}) for p in corpus.read_text().split("\n\n")[:10]]
    rows.insert(3, "{not json")
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(rows) + "\n")
    cfg = tiny_config(
        tmp_path / "r",
        corpus,
        gpt_tok,
        **{"data.train": [str(data)], "data.valid": [], "data.format": "jsonl", "train.steps": 8},
    )
    path = write_config(cfg, tmp_path / "c.yaml")
    main(["train", str(path)])  # skip is the default: trains, and says how many lines it skipped (worker's stderr)
    assert "skipped 1" in capfd.readouterr().err
    line = cli_error(capfd, "train", str(path), "data.bad_lines=error", f"run.dir={tmp_path / 'r2'}")
    assert "corpus.jsonl:4: invalid JSON" in line and "data.bad_lines=skip" in line


def test_resume_with_another_model_shape_keeps_the_checkpoint(tmp_path, capsys, corpus, gpt_tok):
    path = write_config(tiny_config(tmp_path / "r", corpus, gpt_tok, **{"train.steps": 1}), tmp_path / "c.yaml")
    main(["train", str(path)])
    capsys.readouterr()
    line = cli_error(capsys, "train", str(path), "model.d_model=32", "train.steps=2")
    assert "another model shape" in line and "d_model: 64 -> 32" in line
    assert (tmp_path / "r" / "checkpoints" / "step_1" / "dcp" / ".metadata").is_file()


def test_user_error_type_for_api_users(tmp_path):
    with pytest.raises(UserError, match="data.train is empty"):
        load_config(None, ["data.tokenizer=x.json"])


@pytest.mark.parametrize("name", ["demo.yaml", "demo-bert.yaml", "gpt2-small.yaml", "bert-base.yaml"])
def test_shipped_configs_are_valid(name):
    from trainer.models import resolve_model_config

    cfg = load_config(REPO / "configs" / name)
    dims = {k: v for k, v in cfg.model.dims.items() if v is not None}
    model = resolve_model_config(cfg.model.arch, cfg.model.preset, **{"vocab_size": 2048, **dims})
    assert cfg.data.seq_len <= model.max_seq_len


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["parallel.zero_stage=2"], "parallel.zero_stage=2 needs a sharding engine (ddp is ZeRO stage 0)"),
        (["parallel.engine=fsdp", "parallel.zero_stage=1"], "FSDP2 has no ZeRO-1"),
        (["parallel.engine=fsdp", "parallel.zero_stage=0"], "ZeRO stage 0 is parallel.engine=ddp"),
        (["parallel.offload=cpu"], "parallel.offload=cpu is not offered by parallel.engine=ddp"),
        (
            ["parallel.engine=fsdp", "parallel.offload=cpu"],
            "parallel.offload=cpu is not offered by parallel.engine=fsdp",
        ),
        (["parallel.tp=2"], "parallel.tp=2 does not divide the world size 1"),
        (["parallel.tp=2", "model.n_head=3", "model.d_model=96"], "does not divide model.n_head=3"),
        (["parallel.tp=2", "model.d_ff=129"], "does not divide model.d_ff=129"),
        (["parallel.tp=2", "data.seq_len=31"], "does not divide data.seq_len=31"),
        (
            ["parallel.engine=deepspeed", "parallel.zero_stage=0"],
            "for ZeRO stage 0 (no sharding) use parallel.engine=ddp",
        ),
        (
            ["parallel.engine=deepspeed", "parallel.zero_stage=0", "parallel.offload=cpu"],
            "parallel.offload=cpu needs a ZeRO stage",
        ),
        (["parallel.engine=deepspeed", "parallel.tp=2"], "parallel.engine=deepspeed does not combine with tensor"),
        (
            ["parallel.engine=deepspeed", "parallel.deepspeed.zero_optimization.stage=3"],
            "parallel.deepspeed.zero_optimization.stage=3 contradicts parallel.zero_stage",
        ),
        (
            ["parallel.engine=deepspeed", "parallel.deepspeed.gradient_accumulation_steps=4"],
            "parallel.deepspeed.gradient_accumulation_steps=4 contradicts train.grad_accum",
        ),
        (
            ["parallel.engine=deepspeed", "parallel.deepspeed.optimizer.type=Adam"],
            "parallel.deepspeed.optimizer is not",
        ),
        (["parallel.deepspeed.zero_optimization.overlap_comm=true"], "are for parallel.engine=deepspeed (here ddp)"),
        (
            ["parallel.engine=deepspeed", "train.precision=fp16"],
            "needs a GPU (DeepSpeed's CPU accelerator has no fp16)",
        ),
    ],
    ids=[
        "zero_with_ddp",
        "fsdp_zero1",
        "fsdp_zero0",
        "offload_ddp",
        "offload_fsdp",
        "world",
        "heads",
        "d_ff",
        "seq",
        "deepspeed_zero0",
        "deepspeed_offload_zero0",
        "deepspeed_tp",
        "deepspeed_setting_contradicts_ours",
        "deepspeed_accumulation_contradicts_ours",
        "deepspeed_optimizer",
        "deepspeed_settings_without_deepspeed",
        "deepspeed_fp16_on_cpu",
    ],
)
def test_parallel_layout_refused_up_front(tmp_path, capsys, corpus, gpt_tok, overrides, expected):
    """One line naming the setting and the fix, before any process group, model or run directory exists."""
    path = write_config(tiny_config(tmp_path / "r", corpus, gpt_tok), tmp_path / "c.yaml")
    line = cli_error(capsys, "train", str(path), *overrides)
    assert expected in line, line
    assert not (tmp_path / "r").exists()


def test_deepspeed_checkpoint_refused_by_another_engine_or_stage(tmp_path, capsys, corpus, gpt_tok):
    """A DeepSpeed checkpoint resumes under deepspeed only, and not across the ZeRO-3 boundary (DeepSpeed cannot load
    a ZeRO-1/2 checkpoint into ZeRO-3); a DCP checkpoint not under deepspeed. Refused before anything is written."""
    ds = {"parallel.engine": "deepspeed", "parallel.zero_stage": 2, "train.steps": 2}
    path = write_config(tiny_config(tmp_path / "r", corpus, gpt_tok, **ds), tmp_path / "c.yaml")
    r = run_cli("trainer", "train", str(path))  # DeepSpeed keeps process-wide state: its own process
    assert r.returncode == 0, r.stderr[-2000:]
    config_before = (tmp_path / "r" / "config.yaml").read_text()
    for overrides, expected in (
        (["parallel.engine=fsdp", "parallel.zero_stage=3"], "was written by parallel.engine=deepspeed (ZeRO-2)"),
        (["parallel.zero_stage=3"], "cannot load into ZeRO-3: resume with parallel.zero_stage=1 or 2"),
    ):
        line = cli_error(capsys, "train", str(path), *overrides, "train.steps=4")
        assert expected in line, line
    assert (tmp_path / "r" / "config.yaml").read_text() == config_before
    path = write_config(tiny_config(tmp_path / "d", corpus, gpt_tok, **{"train.steps": 2}), tmp_path / "d.yaml")
    main(["train", str(path)])
    line = cli_error(capsys, "train", str(path), "parallel.engine=deepspeed", "train.steps=4")
    assert "was written by parallel.engine=ddp or fsdp (DCP)" in line, line


@pytest.mark.parametrize(
    ("world", "overrides", "expected"),
    [
        (
            3,
            ["parallel.pp=2", "parallel.engine=fsdp"],
            "parallel.pp=2 x parallel.tp=1 = 2 does not divide the world size 3",
        ),
        (2, ["parallel.pp=2", "parallel.engine=deepspeed"], "parallel.engine=deepspeed does not run under parallel.pp"),
        (4, ["parallel.pp=2", "train.grad_accum=2"], "use parallel.engine=fsdp for pp x dp layouts"),
        (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved-1f1b"], "makes 4 stages, more than the model's 2"),
        (2, ["parallel.pp=2", "parallel.pp_split=[1,2]", "train.grad_accum=2"], "does not cover the model's 2 layers"),
        (2, ["parallel.pp=2", "parallel.pp_split=[2]", "train.grad_accum=2"], "has 1 entries but the pipeline has 2"),
        (2, ["parallel.pp=2"], "needs at least 2 micro-batches per step (one per stage), got train.grad_accum=1"),
        (2, ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual=3"], "runs 2 stages per rank"),
        (2, ["parallel.pp=2", "parallel.pp_schedule=lol"], "parallel.pp_schedule='lol' is not one of 1f1b"),
        (1, ["parallel.pp_split=[2]"], "apply to pipelines: set parallel.pp >= 2"),
    ],
    ids=[
        "world",
        "deepspeed",
        "ddp_dp",
        "stages",
        "split_cover",
        "split_len",
        "micro_batches",
        "virtual",
        "name",
        "pp1",
    ],
)
def test_pipeline_refused_up_front(tmp_path, capsys, monkeypatch, corpus, gpt_tok, world, overrides, expected):
    """The launcher's world size is known before any process group: a pipeline that cannot run is one line."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    path = write_config(tiny_config(tmp_path / "r", corpus, gpt_tok), tmp_path / "c.yaml")
    line = cli_error(capsys, "train", str(path), *overrides)
    assert expected in line, line
    assert not (tmp_path / "r").exists()
