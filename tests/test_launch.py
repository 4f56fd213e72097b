"""`launch local` and `launch slurm`: the commands they build, their argument checks, and a job that dies with its
launcher."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli, tiny_config, write_config

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


# --- a bad config is refused before any rank starts (the trainer's own checks, in the launcher's process) ---

TP3 = ["model.n_head=3", "model.d_model=96", "data.seq_len=48", "parallel.tp=3"]  # a model tp=3 splits
BAD_CONFIGS = [
    (["train.lrr=1"], "unknown config key train.lrr (did you mean train.lr?)"),
    (["train.micro_batch=zero"], "config key train.micro_batch expects an integer, got 'zero'"),
    (TP3, "parallel.tp=3 does not divide the world size 2"),
]


@pytest.fixture
def good_config(tmp_path, corpus, gpt_tok) -> Path:
    return write_config(tiny_config(tmp_path / "run", corpus, gpt_tok), tmp_path / "c.yaml")


def refused_line(capsys, argv: list[str]) -> str:
    """The launcher's one line for `argv`: exit code 2, nothing on stdout (no command printed), one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: "), (out, err)
    return lines[0]


@pytest.mark.parametrize("overrides, message", BAD_CONFIGS, ids=["key", "value", "layout"])
def test_local_refuses_a_bad_config_before_torchrun(capsys, monkeypatch, good_config, overrides, message):
    """A bad key, a bad value, and a layout that does not fit the 2 processes asked for: one line, before torchrun."""

    def no_torchrun(cmd):
        raise AssertionError(f"torchrun started: {cmd}")

    monkeypatch.setattr("launch.cli.run_forwarding_signals", no_torchrun)
    line = refused_line(capsys, ["local", "--nproc-per-node", "2", "--", str(good_config), *overrides])
    assert message in line, line
    start = time.monotonic()  # the check itself (the imports done): fast, in this process
    refused_line(capsys, ["local", "--nproc-per-node", "2", "--", str(good_config), *overrides])
    assert time.monotonic() - start < 5


def test_local_checks_the_layout_against_every_node(capsys, monkeypatch, good_config):
    """The world size is --nproc-per-node x --nnodes; a config that fits it starts torchrun."""
    monkeypatch.setattr("launch.cli.run_forwarding_signals", lambda cmd: 0)
    argv = ["local", "--nnodes", "2", "--master", "127.0.0.1:29500", "--nproc-per-node", "2", "--", str(good_config)]
    line = refused_line(capsys, [*argv, *TP3, "parallel.engine=fsdp"])
    assert "parallel.tp=3 does not divide the world size 4" in line, line
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "parallel.tp=2", "parallel.engine=fsdp"])
    assert exit_info.value.code == 0
    assert "--nproc-per-node 2" in capsys.readouterr().out


def test_local_bad_config_prints_no_rank_or_torchrun_lines(good_config):
    """The real command: one line on stderr and no process started (no `[rank` lines, no torchrun report)."""
    r = run_cli("launch", "local", "--nproc-per-node", "2", "--", str(good_config), *TP3)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines() == [
        "error: parallel.tp=3 does not divide the world size 2: launch a multiple of 3 ranks or lower parallel.tp"
    ], r.stderr


@pytest.mark.parametrize("overrides, message", BAD_CONFIGS, ids=["key", "value", "layout"])
def test_slurm_refuses_a_bad_config_before_sbatch(capsys, good_config, overrides, message):
    """`launch slurm` (--dry-run too) checks the config for nodes x ranks per node: nothing rendered or submitted."""
    for nodes in (["--nodes", "2"], ["--nodes", "1", "--nproc-per-node", "2"]):
        line = refused_line(capsys, ["slurm", *nodes, "--dry-run", "--", str(good_config), *overrides])
        assert message in line, line
    line = refused_line(capsys, ["slurm", "--nodes", "1", "--gpus-per-node", "2", "--", str(good_config), *overrides])
    assert message in line, line
    assert not (good_config.parent / "run").exists()


def test_slurm_dry_run_renders_the_batch_script(capsys, tmp_path, slurm_config):
    """`launch slurm --dry-run` prints slurm/train.sbatch filled in: the sbatch options asked for, the USR1 warning
    and requeue, one `launch local` per node with a c10d rendezvous on the first node, and nothing left unfilled."""
    cfg = slurm_config
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


# --- argument types, and what `launch slurm` refuses to write into a batch script ---


@pytest.mark.parametrize(
    "argv, message",
    [
        (["local", "--nproc-per-node", "abc", "run.yaml"], "'abc' is not a positive integer"),
        (["local", "--max-restarts", "x", "run.yaml"], "'x' is not a non-negative integer"),
        (["slurm", "--nodes", "abc", "run.yaml"], "'abc' is not a positive integer"),
    ],
)
def test_argument_types_are_named_in_words(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last and "_int" not in last


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90", 5400),
        ("10:30", 630),
        ("01:00:00", 3600),
        ("1-2", 93600),
        ("1-02:30", 95400),
        ("1-00:00:00", 86400),
        ("2-00:00:00", 172800),
        ("unlimited", None),
        ("INFINITE", None),
        ("0", None),
    ],
)
def test_time_limit_seconds(text, seconds):
    from launch.slurm import time_limit_seconds

    assert time_limit_seconds(text) == seconds


@pytest.mark.parametrize("text", ["garbage", "", "1h", "1:2:3:4", "1-2-3", "-5", "1.5", "1-", ":30", "1- 2", "٣"])
def test_time_limit_seconds_refuses_other_formats(text):
    from launch.slurm import time_limit_seconds

    with pytest.raises(ValueError, match="not a Slurm time limit"):
        time_limit_seconds(text)


TINY = "model: {arch: gpt, preset: gpt-tiny}\n"


@pytest.fixture
def slurm_config(tmp_path, gpt_tok):
    """A config the trainer's checks pass (a real tokenizer: `launch slurm` checks the config before it renders)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"run: {{name: big, dir: {tmp_path / 'run'}}}\ndata: {{train: [x.txt], tokenizer: {gpt_tok}}}\n{TINY}"
    )
    return cfg


@pytest.mark.parametrize(
    "args, message",
    [
        (["--time", "garbage"], "--time garbage is not a Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH"),
        (["--time", "00:01:00"], "--signal-seconds 300 is not below the time limit --time 00:01:00 (60 s)"),
        (["--time", "5", "--signal-seconds", "300"], "--signal-seconds 300 is not below"),
        (["--partition", "gpu\n#SBATCH --exclusive"], "--partition 'gpu\\n#SBATCH --exclusive' contains a control"),
        (["--account", "a\rb"], "--account"),
        (["--qos", "q\x7f"], "--qos"),
        (["--constraint", "a\tb"], "--constraint"),
        (["--time", "1:00\n"], "--time"),
        (["--sbatch=--exclusive", "--sbatch=--mem=0\n#SBATCH --x"], "--sbatch"),
        (["--log-dir", "logs\x00"], "--log-dir"),
    ],
)
def test_slurm_refuses_what_would_corrupt_the_script(capsys, slurm_config, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["slurm", *args, "--dry-run", "--", str(slurm_config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("launch slurm: error:") and err[0].startswith("usage:")  # usage, then one line


def test_slurm_refuses_control_characters_in_overrides_config_path_run_name_and_dir(capsys, tmp_path, slurm_config):
    def refused(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["slurm", "--dry-run", "--", *argv])
        assert exit_info.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "override 'train.steps=5\\x1b' contains a control character" in refused(
        str(slurm_config), "train.steps=5\x1b"
    )
    odd = tmp_path / "a\nb.yaml"
    odd.write_text(slurm_config.read_text())
    assert "the config path" in refused(str(odd))
    named = tmp_path / "named.yaml"
    named.write_text(slurm_config.read_text().replace("name: big", 'name: "big\\nx"'))
    assert "run.name 'big\\nx' (the job name) contains a control character" in refused(str(named))
    moved = tmp_path / "moved.yaml"
    moved.write_text(slurm_config.read_text().replace("dir: ", 'dir: "').replace("/run}", '/r\\tun"}'))
    line = refused(str(moved))
    assert "run.dir '" in line and "\\tun' (the log and checkpoint paths) contains a control character" in line


def test_slurm_accepts_a_signal_inside_the_time_limit(capsys, slurm_config):
    main(["slurm", "--time", "10", "--signal-seconds", "120", "--dry-run", "--", str(slurm_config)])
    script = capsys.readouterr().out.splitlines()
    assert "#SBATCH --time=10" in script and "#SBATCH --signal=B:USR1@120" in script
    main(["slurm", "--time", "UNLIMITED", "--dry-run", "--", str(slurm_config)])
    assert "#SBATCH --time=UNLIMITED" in capsys.readouterr().out.splitlines()


def test_slurm_does_not_import_launch_cli():
    import ast
    from pathlib import Path

    import launch.slurm

    tree = ast.parse(Path(launch.slurm.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "launch.cli" not in imported and "launch.args" in imported


# --- the job dies with its launcher (Linux parent-death signals: launch/cli.py, trainer/lifetime.py) ---


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process (Linux /proc)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return table


def _descendants(root: int) -> set[int]:
    table = _proc_table()
    found, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                frontier.append(pid)
    return found


def _alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie counts as gone)."""
    table = _proc_table()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}


@pytest.fixture
def running_job(tmp_path, corpus, gpt_tok):
    """`launch local --nproc-per-node 2` training a tiny model for good: (launcher Popen, agent pid, every pid of
    the job) once the ranks have logged a step. Whatever is left at the end is killed."""
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, corpus, gpt_tok, **{"train.steps": 100000, "checkpoint.every": 0})
    path = write_config(cfg, tmp_path / "c.yaml")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch", "local", "--nproc-per-node", "2", "--", str(path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    pids: set[int] = {launcher.pid}
    try:
        deadline = time.monotonic() + 120
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and '"step"' in metrics.read_text()):
            assert launcher.poll() is None, f"launch local ended early: {launcher.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no training step logged within 120 s"
            time.sleep(0.2)
        pids = _descendants(launcher.pid)
        table = _proc_table()
        agents = [pid for pid in pids if table.get(pid, (0,))[0] == launcher.pid]
        assert len(agents) == 1, agents
        ranks = [pid for pid in pids if table.get(pid, (0,))[0] == agents[0]]
        assert len(ranks) == 2, f"expected 2 ranks under the agent, found {ranks}"
        yield launcher, agents[0], pids
    finally:
        for pid in _alive(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.wait(10)
        launcher.stderr.close()


def _all_gone(pids: set[int], within: float = 10.0) -> set[int]:
    """The pids still running after `within` seconds."""
    deadline = time.monotonic() + within
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(pids)


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")


@linux_only
def test_kill_9_of_the_launcher_ends_the_whole_job(running_job):
    launcher, _agent, pids = running_job
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait(10)
    left = _all_gone(pids)
    assert not left, f"still running 10 s after kill -9 of the launcher: {sorted(left)} of {sorted(pids)}"


@linux_only
def test_kill_9_of_the_agent_ends_the_whole_job(running_job):
    _launcher, agent, pids = running_job
    os.kill(agent, signal.SIGKILL)
    left = _all_gone(pids)
    assert not left, f"still running 10 s after kill -9 of the agent: {sorted(left)} of {sorted(pids)}"


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "LAUNCH_AGENT_PID")}
    return subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


FOLLOW_THEN_REPORT = (
    "import ctypes, sys; from trainer.lifetime import follow_parent; follow_parent(); "
    "sig = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0); "  # 2 = PR_GET_PDEATHSIG
    "print(sig.value, 'torch' in sys.modules)"
)


@linux_only
def test_follow_parent_asks_for_sigkill_under_an_agent_only():
    under_agent = _run_python(FOLLOW_THEN_REPORT, {"TORCHELASTIC_RUN_ID": "x", "LAUNCH_AGENT_PID": str(os.getpid())})
    assert under_agent.returncode == 0, under_agent.stderr
    assert under_agent.stdout.split() == [str(int(signal.SIGKILL)), "False"]  # and no torch import
    alone = _run_python(FOLLOW_THEN_REPORT, {})
    assert alone.returncode == 0 and alone.stdout.split() == ["0", "False"]


@linux_only
def test_follow_parent_exits_at_once_when_the_agent_is_already_gone():
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer exists: the agent died first
    r = _run_python(FOLLOW_THEN_REPORT, {"LAUNCH_AGENT_PID": str(dead.pid)})
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"agent (pid {dead.pid})" in lines[0] and "gone" in lines[0]
    # a pid that is alive but not our parent (the variable leaked from an outer process): no exit
    assert _run_python(FOLLOW_THEN_REPORT, {"LAUNCH_AGENT_PID": "1"}).returncode == 0


def test_agent_tells_the_ranks_its_pid(monkeypatch):
    import launch.torchrun

    seen = {}
    monkeypatch.setenv("LAUNCH_AGENT_PID", "")  # restored (removed) after the test: main() sets it in os.environ
    monkeypatch.delenv("LAUNCH_AGENT_PID")
    monkeypatch.setattr(launch.torchrun, "run", lambda args: seen.update(pid=os.environ.get("LAUNCH_AGENT_PID")))
    launch.torchrun.main(["--nproc-per-node", "1", "--standalone", "-m", "trainer", "train", "x.yaml"])
    assert seen["pid"] == str(os.getpid())


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138), (signal.SIGINT, 130)])
def test_agent_says_what_it_did_with_a_signal(monkeypatch, capsys, sig, code):
    from torch.distributed.elastic.multiprocessing.api import SignalException

    import launch.torchrun

    def signalled(args):
        raise SignalException(f"got {sig}", sigval=sig)

    monkeypatch.setattr(launch.torchrun, "run", signalled)
    with pytest.raises(SystemExit) as exit_info:
        launch.torchrun.main(["--shutdown-timeout", "77", "--standalone", "-m", "trainer", "train", "x.yaml"])
    assert exit_info.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert f"got {sig.name} and passed {sig.name} to the ranks" in lines[0] and "77 s" in lines[0]
    assert "resumes from the latest complete checkpoint" in lines[0]


def test_slurm_script_keeps_shell_syntax_in_paths_as_data(capsys, tmp_path, slurm_config, gpt_tok):
    """A run dir and a log dir holding `$(...)`, quotes and spaces reach the script's shell as the literal paths: the
    script quotes them once (log_dir=..., run_dir=...) and only ever expands those variables."""
    import subprocess

    hostile = tmp_path / 'run $(touch pwned) "x" `id`'
    cfg = tmp_path / "hostile.yaml"
    cfg.write_text(f"run: {{name: big, dir: '{hostile}'}}\ndata: {{train: [x.txt], tokenizer: {gpt_tok}}}\n{TINY}")
    logs = tmp_path / "logs $(touch pwned2)"
    main(["slurm", "--log-dir", str(logs), "--dry-run", "--", str(cfg)])
    script = capsys.readouterr().out
    assert "{{" not in script
    assignments = [line for line in script.splitlines() if line.startswith(("log_dir=", "run_dir="))]
    assert len(assignments) == 2
    shell = "\n".join(assignments) + '\nprintf "%s\\n%s" "$log_dir" "$run_dir"'
    out = subprocess.run(["bash", "-c", shell], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [str(logs), str(hostile)]
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()
    body = script.split("run_dir=", 1)[1]
    assert "$(touch" not in body.split("\n", 1)[1]  # after the assignments, the paths appear only as variables
