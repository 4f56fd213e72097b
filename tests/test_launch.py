"""`launch local`: the torchrun command it builds, and its argument checks."""

from __future__ import annotations

import shlex
import sys

import pytest

from launch.cli import main


def dry_run(capsys, *args: str) -> list[str]:
    """The printed command, without its leading VAR=value environment assignments."""
    main(["local", "--dry-run", *args])
    words = shlex.split(capsys.readouterr().out.strip())
    assert words[0] == "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"  # restarts need a fresh rendezvous store
    return words[1:]


def test_dry_run_single_node(capsys):
    cmd = dry_run(
        capsys,
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "3",
        "--",
        "configs/demo.yaml",
        "train.lr=3e-4",
        "data.train=[a.jsonl, b.jsonl]",
    )
    assert cmd[:3] == [sys.executable, "-m", "launch.torchrun"]  # torchrun with a one-line failure report
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[cmd.index("--max-restarts") + 1] == "3"
    assert cmd[cmd.index("--nnodes") + 1] == "1"
    assert "--standalone" in cmd
    assert "SIGUSR1" in cmd[cmd.index("--signals-to-handle") + 1].split(",")
    assert cmd[cmd.index("--shutdown-timeout") + 1] == "300"
    assert cmd[-6:] == ["-m", "trainer", "train", "configs/demo.yaml", "train.lr=3e-4", "data.train=[a.jsonl, b.jsonl]"]


def test_dry_run_multi_node(capsys):
    cmd = dry_run(
        capsys,
        "--nproc-per-node",
        "8",
        "--nnodes",
        "4",
        "--node-rank",
        "2",
        "--master",
        "node001:29500",
        "--",
        "run.yaml",
    )
    assert "--standalone" not in cmd
    assert cmd[cmd.index("--nnodes") + 1] == "4"
    assert cmd[cmd.index("--rdzv-backend") + 1] == "c10d"
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "node001:29500"
    assert cmd[-4:] == ["-m", "trainer", "train", "run.yaml"]


def test_dry_run_default_nproc_is_positive(capsys):
    cmd = dry_run(capsys, "run.yaml")
    assert int(cmd[cmd.index("--nproc-per-node") + 1]) >= 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nproc-per-node", "0", "run.yaml"], "positive"),
        (["--nnodes", "2", "run.yaml"], "--master"),
        (["--nnodes", "2", "--node-rank", "2", "--master", "h:1", "run.yaml"], "--node-rank"),
        (["--nnodes", "2", "--master", "nohost", "run.yaml"], "HOST:PORT"),
        (["--dry-run"], "config"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["local", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1]


def test_missing_config_is_reported_before_running(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["local", "--nproc-per-node", "1", str(tmp_path / "absent.yaml")])
    assert exit_info.value.code == 2
    assert "config file not found" in capsys.readouterr().err


def test_slurm_dry_run_renders_the_batch_script(capsys, tmp_path):
    """`launch slurm --dry-run` prints slurm/train.sbatch filled in: the sbatch options asked for, the USR1 warning
    and requeue, one `launch local` per node with a c10d rendezvous on the first node, and nothing left unfilled."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{name: big, dir: {tmp_path / 'run'}}}\ndata: {{train: [x.txt], tokenizer: t.json}}\n")
    argv = ["slurm", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--account", "proj", "--qos", "high"]
    argv += ["--time", "2-00:00:00", "--constraint", "h100", "--cpus-per-task", "64", "--sbatch=--exclusive"]
    main([*argv, "--signal-seconds", "600", "--dry-run", "--", str(cfg), "train.steps=5000"])
    script = capsys.readouterr().out
    for line in (
        "#SBATCH --job-name=big",
        "#SBATCH --nodes=4",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --constraint=h100",
        "#SBATCH --cpus-per-task=64",
        "#SBATCH --exclusive",
        "#SBATCH --signal=B:USR1@600",
        "#SBATCH --requeue",
        f"#SBATCH --output={tmp_path / 'run' / 'logs'}/%x-%j.out",
    ):
        assert line in script.splitlines(), line
    assert "--nproc-per-node 8" in script and '--master "${head_addr:-$head_node}:$port"' in script
    assert f"{cfg} train.steps=5000" in script and "step_5000" in script
    assert "{{" not in script and script.startswith("#!/bin/bash")
