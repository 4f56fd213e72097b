"""The commands' one-line errors for what the file system refuses (a read-only mount, an immutable directory, a path
under a regular file, an --out that is a file), and overrides anywhere on the command line.

Read-only file systems are real mounts (tmpfs or a bind mount, read-only); the tests skip, saying why, where this
process may not mount (not root, or no CAP_SYS_ADMIN)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_config, write_config
from test_errors import cli_error

from trainer.cli import main
from trainer.errors import UserError
from trainer.run_lock import RunLock


@contextlib.contextmanager
def read_only(path: Path, source: Path | None = None):
    """`path` as a read-only mount: an empty tmpfs, or `source` bound read-only; unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a read-only file system needs root and mount(8)")
    path.mkdir(parents=True, exist_ok=True)
    if source is None:
        cmd = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)]
    else:
        cmd = ["mount", "--bind", "-o", "ro", str(source), str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only file system here: {r.stderr.strip() or r.returncode}")
    try:
        if os.access(path, os.W_OK):  # an old mount(8) that ignores ro on a bind: not read-only
            pytest.skip("mount --bind -o ro left the directory writable")
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def immutable(path: Path):
    """`path` made immutable (chattr +i): even root cannot create anything in it."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, check=False)
    if r.returncode != 0 or os.access(path, os.W_OK):
        pytest.skip(f"chattr +i is not available on this file system: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)


@pytest.fixture
def config(tmp_path, corpus, gpt_tok) -> Path:
    return write_config(tiny_config(tmp_path / "run", corpus, gpt_tok, **{"train.steps": 1}), tmp_path / "c.yaml")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus, gpt_tok) -> Path:
    """A one-step run with its checkpoint (to export, and to draw a report of)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(root / "run", corpus, gpt_tok, **{"train.steps": 1, "data.valid": []})
    main(["train", str(write_config(cfg, root / "c.yaml"))])
    return root / "run"


# --- train: run.dir and what the run creates under it ---


def test_run_dir_on_a_read_only_file_system(tmp_path, capsys, config):
    with read_only(tmp_path / "ro") as ro:
        line = cli_error(capsys, "train", str(config), f"run.dir={ro / 'run'}")
    assert f"run.dir {ro / 'run'} cannot be written: {ro} is on a read-only file system" in line, line
    assert "give run.dir a writable location" in line


def test_checkpoints_on_a_read_only_file_system(tmp_path, capsys, config):
    """run.dir is writable but its checkpoints/ is a read-only mount: refused before the first step, not at the
    first save."""
    with read_only(tmp_path / "run" / "checkpoints") as ro:
        line = cli_error(capsys, "train", str(config), "checkpoint.every=1")
    assert f"run.dir {ro} cannot be written: {ro} is on a read-only file system" in line, line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_run_dir_in_an_immutable_directory(tmp_path, capsys, config):
    with immutable(tmp_path / "locked") as locked:
        line = cli_error(capsys, "train", str(config), f"run.dir={locked / 'run'}")
    assert f"run.dir {locked / 'run'} cannot be written: {locked} is not writable by this user" in line, line


def test_run_dir_under_a_regular_file(tmp_path, capsys, config, corpus):
    line = cli_error(capsys, "train", str(config), f"run.dir={corpus}/run")
    assert f"run.dir {corpus}/run cannot be created: {corpus} is a file, not a directory" in line, line
    line = cli_error(capsys, "train", str(config), f"run.dir={corpus}")
    assert f"run.dir {corpus} is a file, not a directory" in line, line


def test_run_lock_says_why_run_dir_cannot_be_written(tmp_path):
    """The lock is the first write into run.dir (rank 0, after the up-front check): a refusal there, as from a file
    system that turned read-only since, is a UserError naming run.dir, not an OSError."""
    refused = pytest.raises(UserError, match=r"run.dir .*/ro/run cannot be written \(Read-only file system")
    with read_only(tmp_path / "ro") as ro, refused:
        RunLock(ro / "run").acquire()


def test_refusal_met_while_a_command_writes_is_one_line(tmp_path, capsys, trained_run):
    """A refusal no up-front check saw (here `trainer report` into a read-only run directory) is still one line,
    naming the path and the file system's reason."""
    with read_only(tmp_path / "ro_run", source=trained_run) as ro:
        line = cli_error(capsys, "report", str(ro))
    assert f"cannot use {ro / 'report.png'} (Read-only file system)" in line, line


# --- --out of tokenizer, prepare and export ---


def test_out_is_an_existing_file(tmp_path, capsys, corpus, config, trained_run):
    """tokenizer, prepare and export refuse an --out that is a file, in one line, before any work."""
    taken = tmp_path / "taken"
    taken.write_text("not a directory\n")
    expected = f"--out {taken} is a file, not a directory"
    assert expected in cli_error(capsys, "tokenizer", "--kind", "char", "--out", str(taken), str(corpus))
    assert expected in cli_error(capsys, "prepare", str(config), "--out", str(taken))
    assert expected in cli_error(capsys, "export", str(trained_run), "--out", str(taken))
    assert taken.read_text() == "not a directory\n"


def test_out_on_a_read_only_file_system(tmp_path, capsys, corpus, config, trained_run):
    with read_only(tmp_path / "ro") as ro:
        lines = [
            cli_error(capsys, "tokenizer", "--kind", "bpe", "--vocab-size", "300", "--out", str(ro / "t"), str(corpus)),
            cli_error(capsys, "prepare", str(config), "--out", str(ro / "shards")),
            cli_error(capsys, "export", str(trained_run), "--out", str(ro / "hf")),
        ]
    for line, name in zip(lines, ("t", "shards", "hf"), strict=True):
        assert f"--out {ro / name} cannot be written: {ro} is on a read-only file system" in line, line


# --- overrides anywhere on the line ---


def test_train_overrides_before_the_config(capsys, config):
    """CONFIG is the first word that is not a section.key=value override, wherever the overrides are."""
    line = cli_error(capsys, "train", "train.lrr=1", str(config))
    assert "unknown config key train.lrr (did you mean train.lr?)" in line, line


def test_prepare_overrides_after_the_options(tmp_path, capsys, corpus, gpt_tok):
    """`trainer prepare CFG --out DIR data.tokenizer=T` (the issue's line): the override after --out counts."""
    cfg = tiny_config(tmp_path / "run", corpus, tmp_path / "none.json", **{"data.valid": []})
    path = write_config(cfg, tmp_path / "c.yaml")
    line = cli_error(capsys, "prepare", str(path), "--out", str(tmp_path / "shards"))
    assert "none.json" in line, line  # without the override: the config's tokenizer, which does not exist
    main(["prepare", str(path), "--out", str(tmp_path / "shards"), f"data.tokenizer={gpt_tok}"])
    out = capsys.readouterr().out
    assert f"train on them with: data.train=[{tmp_path / 'shards' / 'train'}]" in out, out
    assert json.loads((tmp_path / "shards" / "train" / "meta.json").read_text())["n_tokens"] > 0


def test_data_overrides_between_and_after_the_options(capsys, config):
    """The same samples whether the overrides come before the options, between them or after them."""
    overrides = ["data.seq_len=8", "data.shuffle=false"]
    main(["data", str(config), *overrides, "--range", "0:3", "--tokens", "2"])
    before = capsys.readouterr().out
    main(["data", str(config), "--range", "0:3", overrides[0], "--tokens", "2", overrides[1]])
    assert capsys.readouterr().out == before
    main(["data", str(config), "--range", "0:3", "--tokens", "2"])
    assert capsys.readouterr().out != before  # (the overrides change the samples)


def test_plan_overrides_before_the_config_and_between_options(capsys, config):
    line = cli_error(capsys, "plan", "train.lrr=1", str(config), "--gpus", "2")
    assert "unknown config key train.lrr" in line, line
    line = cli_error(capsys, "plan", str(config), "--gpus", "2", "train.lrr=1", "--json")
    assert "unknown config key train.lrr" in line, line
