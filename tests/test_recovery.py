"""Faults that long runs on shared clusters meet: a damaged checkpoint, a full disk, a second job on the same run
directory, another tokenizer. Each ends in one line, loses nothing that was saved, and a resume continues with the
uninterrupted run's losses and weights."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    read_metrics,
    run_cli,
    start_trainer,
    step_losses,
    tiny_config,
    torchrun,
    wait_for_step,
    write_config,
)

from trainer.checkpoint import latest_checkpoint, load_model
from trainer.config import load_config
from trainer.errors import UserError
from trainer.tokenizer import train_tokenizer
from trainer.train import train

STEPS = 8  # the base run checkpoints every 2 steps and keeps them all


def run_in_process(cfg: dict, path: Path) -> dict:
    return train(load_config(write_config(cfg, path)))


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_model(ckpt).state_dict()


def assert_continues(run_dir: Path, base: dict, resumed_from: int) -> None:
    """The last start resumed from `resumed_from`; every logged loss and the final weights equal the base run's."""
    starts = [m for m in read_metrics(run_dir) if m.get("event") == "start"]
    assert starts[-1]["resumed_from_step"] == resumed_from
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in base["losses"].items():
        assert losses[step] == pytest.approx(loss, rel=1e-6, abs=0), step
    final = weights(run_dir / "checkpoints" / f"step_{STEPS}")
    for name, w in base["weights"].items():
        torch.testing.assert_close(final[name], w, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus, gpt_tok) -> dict:
    """One uninterrupted 1-process run of STEPS steps, every checkpoint kept."""
    tmp = tmp_path_factory.mktemp("base")
    cfg = tiny_config(
        tmp / "run", corpus, gpt_tok, **{"train.steps": STEPS, "checkpoint.every": 2, "checkpoint.keep": 10}
    )
    run_in_process(cfg, tmp / "c.yaml")
    ckpts = tmp / "run" / "checkpoints"
    return {
        "dir": tmp / "run",
        "cfg": cfg,
        "losses": step_losses(tmp / "run"),
        "weights": weights(ckpts / f"step_{STEPS}"),
    }


def stopped_at_6(base: dict, run_dir: Path) -> Path:
    """A copy of the base run as it was when it stopped after step 6 (step_8 never written)."""
    shutil.copytree(base["dir"], run_dir)
    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts / "step_8")
    (ckpts / "latest").write_text("step_6")
    return ckpts


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def legacy(ckpt: Path, damaged: str) -> None:
    (ckpt / "manifest.json").unlink()
    truncate(ckpt / damaged)


DAMAGES = {  # name: (what is done to checkpoints/, the checkpoint resumed from, what the line says)
    "payload shard truncated": (lambda c: truncate(c / "step_6" / "dcp" / "__0_0.distcp"), 4, "dcp/__0_0.distcp has"),
    "dcp metadata deleted": (lambda c: (c / "step_6" / "dcp" / ".metadata").unlink(), 4, "dcp/.metadata missing"),
    "state.json truncated": (lambda c: truncate(c / "step_6" / "state.json"), 4, "(state.json has"),
    "rng file truncated": (lambda c: truncate(c / "step_6" / "rng_dp0.pt"), 4, "(rng_dp0.pt has"),
    # checkpoints written before manifests existed are held to the parse checks
    "no manifest, shard truncated": (lambda c: legacy(c / "step_6", "dcp/__0_0.distcp"), 4, "dcp/__0_0.distcp has"),
    "no manifest, state.json truncated": (lambda c: legacy(c / "step_6", "state.json"), 4, "state.json unreadable"),
    "no manifest, rng file truncated": (lambda c: legacy(c / "step_6", "rng_dp0.pt"), 4, "rng_dp0.pt unreadable"),
    "manifest lists a lost file": (lambda c: (c / "step_6" / "tokenizer.json").unlink(), 4, "tokenizer.json missing"),
    "garbage in latest": (lambda c: (c / "latest").write_bytes(b"\xff\xfe\x00garbage"), 6, "pointer latest is"),
    "latest names a missing directory": (lambda c: (c / "latest").write_text("step_12"), 6, "names step_12"),
    "tmp directory left by a crash": (
        lambda c: (c / ".tmp_step_8").mkdir() or (c / ".tmp_step_8" / "rng_dp0.pt").write_bytes(b"half"),
        6,
        None,
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_resumes_from_the_newest_complete_one(tmp_path, capsys, base_run, damage):
    """One line names the damaged checkpoint and the file; it is moved aside (never deleted, never counted by keep);
    the run continues from the newest complete checkpoint with the uninterrupted run's losses and weights."""
    ckpts = stopped_at_6(base_run, tmp_path / "run")
    do, resumed_from, said = DAMAGES[damage]
    do(ckpts)
    capsys.readouterr()
    cfg = {**base_run["cfg"], "run": {**base_run["cfg"]["run"], "dir": str(tmp_path / "run")}}
    run_in_process(cfg, tmp_path / "c.yaml")
    out = capsys.readouterr().out
    assert "Traceback" not in out
    if said is not None:
        lines = [line for line in out.splitlines() if said in line]
        assert len(lines) == 1, out
    if resumed_from == 4:
        assert lines[0].startswith("checkpoint step_6 is damaged (") and lines[0].endswith("resuming from step_4")
        assert (ckpts / "damaged_step_6").is_dir()
    assert not list(ckpts.glob(".tmp_step_*"))
    assert_continues(tmp_path / "run", base_run, resumed_from)
    assert (ckpts / "latest").read_text() == f"step_{STEPS}"


def test_none_complete_left_is_one_line_and_nothing_is_lost(tmp_path, base_run):
    ckpts = stopped_at_6(base_run, tmp_path / "run")
    for step in (2, 4, 6):
        (ckpts / f"step_{step}" / "dcp" / ".metadata").unlink()
    cfg = {**base_run["cfg"], "run": {**base_run["cfg"]["run"], "dir": str(tmp_path / "run")}}
    r = run_cli("trainer", "train", str(write_config(cfg, tmp_path / "c.yaml")))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no complete checkpoint left in"), err
    assert "checkpoint.resume=never" in err[0]
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [f"damaged_step_{s}" for s in (2, 4, 6)]


def test_damaged_checkpoint_given_by_path_export_and_load_model_are_one_line(tmp_path, capsys, base_run):
    ckpts = stopped_at_6(base_run, tmp_path / "run")
    truncate(ckpts / "step_6" / "dcp" / "__0_0.distcp")
    cfg = {**base_run["cfg"], "run": {**base_run["cfg"]["run"], "dir": str(tmp_path / "run")}}
    cfg["checkpoint"] = {**cfg["checkpoint"], "resume": str(ckpts / "step_6")}
    r = run_cli("trainer", "train", str(write_config(cfg, tmp_path / "c.yaml")))
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "step_6 is damaged (dcp/__0_0.distcp has" in err[0], err
    assert step_losses(tmp_path / "run") == base_run["losses"]  # nothing trained, nothing logged
    r = run_cli("trainer", "export", str(ckpts / "step_6"), "--out", str(tmp_path / "hf"))
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "is damaged" in err[0], err
    assert not (tmp_path / "hf").exists()
    with pytest.raises(UserError, match="is damaged"):
        load_model(ckpts / "step_6")
    assert latest_checkpoint(ckpts).name == "step_4"  # a run directory's newest complete one; nothing moved
    assert (ckpts / "step_6").is_dir()


def test_two_rank_fsdp_skips_damaged_checkpoints_of_any_rank(tmp_path, corpus, gpt_tok):
    """2 ranks, FSDP ZeRO-3: the newest checkpoint lost rank 1's shard, the one before rank 1's RNG file, the pointer
    is garbage and a crash left a temporary directory. Every rank takes the same decision, said once: resume from
    step 4, and the losses and weights from there equal the uninterrupted run's."""
    over = {"train.steps": STEPS, "checkpoint.every": 2, "checkpoint.keep": 10, "parallel.engine": "fsdp"}
    cfg = write_config(tiny_config(tmp_path / "run", corpus, gpt_tok, **over), tmp_path / "c.yaml")
    r = torchrun(2, cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    base = {"losses": step_losses(tmp_path / "run"), "weights": weights(ckpts / f"step_{STEPS}")}
    truncate(ckpts / "step_8" / "dcp" / "__1_0.distcp")
    truncate(ckpts / "step_6" / "rng_dp1.pt")
    (ckpts / "latest").write_bytes(b"\x00\x9f\x92\x96")
    (ckpts / ".tmp_step_10").mkdir()
    r = torchrun(2, cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "Traceback" not in out
    said = [line for line in out.splitlines() if "is damaged" in line or "pointer" in line]
    assert len(said) == 3, said
    assert "step_8 is damaged (dcp/__1_0.distcp has" in said[1] and "resuming from step_4" in said[1]
    assert "step_6 is damaged (rng_dp1.pt has" in said[2]
    assert not (ckpts / ".tmp_step_10").exists()
    assert_continues(tmp_path / "run", base, 4)


def test_resume_with_another_tokenizer_is_refused(tmp_path, corpus, gpt_tok, base_run):
    """A tokenizer with the same vocabulary size but other merges would make the saved data position and every
    trained embedding row mean other text: refused in one line, as a changed seed or seq_len is."""
    other_corpus = tmp_path / "other.txt"
    other_corpus.write_text(corpus.read_text()[::-1])
    other = train_tokenizer("bpe", 512, [str(other_corpus)], tmp_path / "other_tok")
    shutil.copytree(base_run["dir"], tmp_path / "run")
    cfg = {**base_run["cfg"], "run": {**base_run["cfg"]["run"], "dir": str(tmp_path / "run")}}
    cfg["data"] = {**cfg["data"], "tokenizer": str(other)}
    cfg["train"] = {**cfg["train"], "steps": STEPS + 2}
    with pytest.raises(UserError, match="is not the tokenizer checkpoint step_8 was trained with"):
        run_in_process(cfg, tmp_path / "c.yaml")
    assert step_losses(tmp_path / "run") == base_run["losses"]
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step_8" / "state.json").read_text())
    assert len(saved["tokenizer_sha256"]) == 64


def test_second_job_on_a_run_directory_is_refused_and_the_first_is_unharmed(tmp_path, corpus, gpt_tok):
    """The second job exits with one line naming the holder (pid, host, since when) and writes nothing; the first
    trains on, and its curve equals a lone run's. When the holder dies (kill -9), the lock goes with it."""
    steps = 40
    over = {"train.steps": steps, "checkpoint.every": 20, "log.every": 1}
    lone = tiny_config(tmp_path / "lone", corpus, gpt_tok, **over)
    run_in_process(lone, tmp_path / "lone.yaml")
    cfg = write_config(tiny_config(tmp_path / "run", corpus, gpt_tok, **over), tmp_path / "c.yaml")
    first = start_trainer(cfg)
    try:
        wait_for_step(tmp_path / "run", 1, first)
        os.kill(first.pid, signal.SIGSTOP)  # mid-run however long the second job takes to start
        second = run_cli("trainer", "train", str(cfg), timeout=120)
        err = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(err) == 1, second.stderr[-2000:]
        assert f"is in use by another job (pid {first.pid} on " in err[0] and "since" in err[0], err
        assert first.poll() is None, "the first job should still be training"
    finally:
        os.kill(first.pid, signal.SIGCONT)
        _, errs = first.communicate(timeout=300)
    assert first.returncode == 0, errs[-2000:]
    starts = [m for m in read_metrics(tmp_path / "run") if m.get("event") == "start"]
    assert len(starts) == 1
    steps_logged = [m["step"] for m in read_metrics(tmp_path / "run") if "loss" in m and "event" not in m]
    assert steps_logged == list(range(1, steps + 1))  # no interleaved second writer
    assert step_losses(tmp_path / "run") == pytest.approx(step_losses(tmp_path / "lone"), rel=1e-6, abs=0)

    third = start_trainer(cfg, f"train.steps={steps + 100000}")
    wait_for_step(tmp_path / "run", steps + 1, third)
    os.killpg(third.pid, signal.SIGKILL)
    third.communicate(timeout=60)
    r = run_cli("trainer", "train", str(cfg), f"train.steps={steps + 2}")
    assert r.returncode == 0, r.stderr[-2000:]


def mount_tmpfs(path: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs run directory needs root; this test runs as root in CI")
    path.mkdir(parents=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, check=False
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); it needs CAP_SYS_ADMIN")


@pytest.fixture
def small_disk(tmp_path):
    mounts = []

    def make(size: str) -> Path:
        path = tmp_path / f"disk{len(mounts)}"
        mount_tmpfs(path, size)
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_is_one_line_and_the_previous_checkpoint_survives(tmp_path, corpus, gpt_tok, small_disk):
    """A 4 MiB run directory holds one 2 MiB checkpoint of the tiny model but not a second beside it (keep=1 may not
    delete the last complete one): the save is refused before it writes, in one line naming the directory, what is
    needed and what checkpoint.keep costs; step_2 stays intact and loadable, and the next start finds no .tmp_step_*.
    """
    disk = small_disk("4m")
    over = {"train.steps": 6, "checkpoint.every": 2, "checkpoint.keep": 1}
    cfg = write_config(tiny_config(disk / "run", corpus, gpt_tok, **over), tmp_path / "c.yaml")
    r = run_cli("trainer", "train", str(cfg))
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert err[0].startswith(f"error: not enough disk space for checkpoint step_4 in {disk / 'run' / 'checkpoints'}")
    assert "checkpoint.keep=1" in err[0] and "step_2, which is intact" in err[0]
    ckpts = disk / "run" / "checkpoints"
    assert latest_checkpoint(ckpts).name == "step_2"
    load_model(ckpts / "step_2")
    assert not list(ckpts.glob(".tmp_step_*"))

    (ckpts / ".tmp_step_4").mkdir()  # as a kill during a write would leave it
    (ckpts / ".tmp_step_4" / "rng_dp0.pt").write_bytes(b"\0" * 1024)
    r = run_cli("trainer", "train", str(cfg), "train.steps=2")  # resumes a complete run: nothing more to write
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(ckpts.glob(".tmp_step_*")) and latest_checkpoint(ckpts).name == "step_2"


def test_short_disk_deletes_what_keep_would_delete_before_writing(tmp_path, corpus, gpt_tok, small_disk):
    """keep=2 on a 5 MiB disk: the third checkpoint fits only once the oldest is gone, so it is deleted before the
    write instead of after, and the run completes with the two newest."""
    disk = small_disk("5m")
    over = {"train.steps": 6, "checkpoint.every": 2, "checkpoint.keep": 2}
    cfg = write_config(tiny_config(disk / "run", corpus, gpt_tok, **over), tmp_path / "c.yaml")
    r = run_cli("trainer", "train", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "deleting step_2 now (checkpoint.keep=2 would delete it after this save)" in r.stdout
    ckpts = disk / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_4", "step_6"]


def test_disk_full_during_the_first_write_is_one_line(tmp_path, corpus, gpt_tok, small_disk):
    """No earlier checkpoint to size the save by: the write itself runs out of space. One line, no .tmp_step_* left
    to keep the disk full."""
    disk = small_disk("1m")
    over = {"train.steps": 4, "checkpoint.every": 2}
    cfg = write_config(tiny_config(disk / "run", corpus, gpt_tok, **over), tmp_path / "c.yaml")
    r = run_cli("trainer", "train", str(cfg))
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "is full: checkpoint step_2 could not be written" in err[0], err
    assert not list((disk / "run" / "checkpoints").glob(".tmp_step_*"))


def test_stop_signal_during_start_up_is_one_line_and_exit_0(tmp_path, corpus, gpt_tok, base_run):
    """SIGTERM while the run is still starting (importing, loading the checkpoint): it stops before its next step,
    says so, and the checkpoint it would resume from is untouched."""
    shutil.copytree(base_run["dir"], tmp_path / "run")
    cfg = {**base_run["cfg"], "run": {**base_run["cfg"]["run"], "dir": str(tmp_path / "run")}}
    cfg["train"] = {**cfg["train"], "steps": STEPS + 4}
    proc = start_trainer(write_config(cfg, tmp_path / "c.yaml"))
    time.sleep(1.0)  # inside start-up: importing torch alone takes longer
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert f"stop signal received during start-up: stopped before step {STEPS + 1}" in out
    assert f"the checkpoint of step {STEPS} is unchanged" in out
    assert step_losses(tmp_path / "run") == base_run["losses"]
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == f"step_{STEPS}"


def test_deepspeed_checkpoint_with_a_truncated_partition_is_skipped(tmp_path, corpus, gpt_tok):
    """DeepSpeed writes its own files; the manifest lists them too: a truncated optimizer partition of the newest
    checkpoint is found before DeepSpeed reads it, and the run resumes from the one before."""
    over = {"train.steps": 4, "checkpoint.every": 2, "checkpoint.keep": 10, "parallel.engine": "deepspeed"}
    cfg = write_config(tiny_config(tmp_path / "run", corpus, gpt_tok, **over), tmp_path / "c.yaml")
    r = run_cli("trainer", "train", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    base = step_losses(tmp_path / "run")
    optim = next((ckpts / "step_4" / "deepspeed" / "state").glob("*optim_states.pt"))
    truncate(optim)
    r = run_cli("trainer", "train", str(cfg))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"checkpoint step_4 is damaged (deepspeed/state/{optim.name} has" in r.stdout
    assert [m["resumed_from_step"] for m in read_metrics(tmp_path / "run") if m.get("event") == "start"][-1] == 2
    assert step_losses(tmp_path / "run") == pytest.approx(base, rel=1e-6, abs=0)
