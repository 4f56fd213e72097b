"""The Checkpointer: saves and restores everything with state, collectively over all ranks, through the directory
protocol of trainer/checkpoint/directory.py (the layout is described in trainer/checkpoint/__init__.py).

With checkpoint.async the payload is written in the background (trainer/engines/dcp_write.py): the small files go
into `.tmp_step_<N>` at once, and the same protocol (manifest, rename, `latest`, `keep`) runs once DCP reports every
rank's write complete, which `poll` checks every step without waiting and `finish` waits for (before the next save,
and before the final or stop save). One write is in flight at a time; a failed one is reported in a line naming the
rank, its directory removed, and the run goes on.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from trainer.checkpoint.directory import (
    DAMAGED_PREFIX,
    LATEST,
    candidates,
    complete_checkpoints,
    resolve_checkpoint_dir,
)
from trainer.checkpoint.failures import agree, is_disk_full, write_failure
from trainer.checkpoint.state import file_sha256, read_state, rng_file_name, rng_state, same_model
from trainer.engines import check_payload
from trainer.engines.base import Engine, fsync
from trainer.engines.dcp_write import BackgroundWriter, background
from trainer.errors import SharedError, UserError
from trainer.integrity import STATE_FILE, checkpoint_bytes, damage, write_manifest
from trainer.parallel import ParallelDims, barrier, broadcast_object

MiB = 2**20


class Checkpointer:
    """Saves and restores everything with state, collectively over all ranks. Rank 0 decides what is on disk (which
    checkpoint to resume from, whether there is room) and every rank follows the same decision."""

    def __init__(self, root: Path, keep: int, dims: ParallelDims) -> None:
        self.root = root
        self.keep = keep
        self.dims = dims
        self.writer: BackgroundWriter | None = None  # checkpoint.async: the background DCP writer
        self.pending: tuple[Path, Path] | None = None  # (temporary, final) directory of the write in flight
        self.say = lambda line: print(line, flush=True) if dims.is_main else None

    def use_async(self, engine: Engine, device: torch.device, say) -> str | None:
        """checkpoint.async: sets up the background writer (collective: its own gloo group); returns a line to print
        when the engine saves synchronously all the same (DeepSpeed writes its own checkpoint)."""
        self.say = say
        if engine.name == "deepspeed":
            return (
                "checkpoint.async=true: parallel.engine=deepspeed writes its own checkpoint, which has no background "
                "write: checkpoints are saved synchronously"
            )
        self.writer = BackgroundWriter(device)
        return None

    def wait_staged(self) -> None:
        """Returns once the checkpoint in flight has copied the state aside: call it before the optimizer changes
        the weights (without it the background write could save the next step's values)."""
        if self.writer is not None:
            self.writer.wait_staged()

    def poll(self) -> None:
        """Publishes the background write once it is complete on every rank (DCP completes a rank's future only after
        every rank's write result reached the coordinator); never waits."""
        if self.pending is not None and self.writer.written.done():
            self.finish()

    def finish(self) -> None:
        """Waits for the background write in flight, if any, and publishes it (rank 0: manifest, rename, `latest`,
        `keep`), or reports its failure in one line naming the rank and removes its directory. Every rank gets the same
        outcome from DCP, so no collective is needed."""
        if self.pending is None:
            return
        tmp, final = self.pending
        self.writer.wait_staged()
        error = self.writer.written.exception()  # waits; DCP's CheckpointException names the failed ranks
        self.pending = None
        if not self.dims.is_main:
            return
        if error is None:
            try:
                self._publish(tmp, final)
                self.say(f"checkpoint saved: {final} (written in the background)")
                return
            except OSError as e:
                error = e
        shutil.rmtree(tmp, ignore_errors=True)
        last = complete_checkpoints(self.root)
        kept = f"{last[-1].name} stays the latest" if last else "no checkpoint was written yet"
        full = " (the disk is full: free space there or lower checkpoint.keep)" if is_disk_full(error) else ""
        self.say(
            f"checkpoint {final.name} could not be written in the background ({write_failure(error)}){full}; "
            f"removed {tmp.name}, {kept}; training goes on"
        )

    def close(self) -> None:
        """At the end of a run: the write in flight published, the staging buffers freed."""
        self.finish()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def clean_partial(self) -> None:
        """Removes half-written checkpoints a crash left behind. Call it only under the run directory's lock: then no
        live job can be writing them."""
        if self.dims.is_main and self.root.is_dir():
            for tmp in self.root.glob(".tmp_step_*"):
                shutil.rmtree(tmp, ignore_errors=True)
        barrier()

    def save(
        self, step: int, engine: Engine, state: dict, tokenizer_path: str | None, in_background: bool = False
    ) -> Path | None:
        """Every rank writes its part into `.tmp_step_<N>` and fsyncs it; after a barrier rank 0 lists every file
        in `manifest.json`, renames the directory into place and moves `latest`. A disk too full for it, or a write
        that failed on any rank, is a SharedError (one line; the temporary directory removed, the previous checkpoints
        intact). `in_background` (checkpoint.async set up): returns None once the state is handed to the background
        writer; `poll`/`finish` publish it. A write still in flight is finished first."""
        self.finish()
        in_background = in_background and self.writer is not None
        if in_background:
            self.writer.staged = self.writer.written = None  # set again when the engine hands its state over
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"
        short = self.make_room(final.name) if self.dims.is_main else None
        if short := broadcast_object(short):
            raise SharedError(short)
        error = None
        if self.dims.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir(parents=True)
            except OSError as e:
                error = self._disk_error(e, final.name) if is_disk_full(e) else f"cannot create {tmp}: {e}"
        if error := agree(error):
            raise SharedError(error)
        try:
            with background(self.writer if in_background else None):
                self._write(tmp, engine, state, tokenizer_path)
        except (OSError, CheckpointException) as e:  # DCP reports a failed write on any rank on every rank
            if in_background and self.writer.written is not None:
                self.writer.written.exception()  # waits: nothing may write into the directory once it is removed
            error = self._disk_error(e, final.name) if is_disk_full(e) else self._write_error(e, final.name)
        if error := agree(error):
            if self.dims.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            barrier()
            raise SharedError(error)
        if in_background and self.writer.written is not None:
            self.pending = (tmp, final)
            return None
        if self.dims.is_main:
            try:
                self._publish(tmp, final)
            except OSError as e:
                if not is_disk_full(e):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                error = self._disk_error(e, final.name)
        if error := agree(error):
            raise SharedError(error)
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rank 0, once every rank's files are on disk: the manifest, the rename, the pointer, then `keep`."""
        fsync(write_manifest(tmp))
        fsync(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = self.root / f".{LATEST}.tmp"
        pointer_tmp.write_text(final.name)
        fsync(pointer_tmp)
        os.replace(pointer_tmp, self.root / LATEST)
        fsync(self.root)
        for old in complete_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _write(self, tmp: Path, engine: Engine, state: dict, tokenizer_path: str | None) -> None:
        """Every rank's files of the checkpoint, each fsynced; errors of one rank's own files reach every rank."""
        barrier()
        engine.save(tmp)  # collective; DCP fsyncs every file it writes
        error: BaseException | None = None
        try:
            written = []
            if self.dims.tp_rank == 0 and self.dims.cp_rank == 0:  # tp and cp peers share one RNG stream
                written.append(tmp / rng_file_name(self.dims.dp_rank, self.dims.pp_rank))
                torch.save(rng_state(), written[-1])
            if self.dims.is_main:
                if tokenizer_path:
                    shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
                    written.append(tmp / "tokenizer.json")
                layout = {"world_size": self.dims.world_size, "dp": self.dims.dp, "tp": self.dims.tp}
                layout.update({"pp": self.dims.pp} if self.dims.pp > 1 else {})
                layout.update({"cp": self.dims.cp} if self.dims.cp > 1 else {})
                (tmp / STATE_FILE).write_text(json.dumps({**state, **layout}, indent=1))
                written.append(tmp / STATE_FILE)
            for path in written:  # each rank flushes its own files before the rename can make them visible
                fsync(path)
        except OSError as e:
            error = e
        failed = agree(f"{type(error).__name__}: {error}" if error else None)
        if error is not None:
            raise error
        if failed:
            raise OSError(errno.EIO, f"another rank failed to write its files ({failed})")

    def make_room(self, name: str) -> str | None:
        """Rank 0, before a save: None when the disk has room for one more checkpoint of the last one's size (first
        deleting, when it has not, the oldest checkpoints that `checkpoint.keep` would delete after this save, never
        the newest complete one); else the one-line message."""
        done = complete_checkpoints(self.root)
        if not done:
            return None  # nothing to size it by: a write that runs out of space is caught as it happens
        needed = checkpoint_bytes(done[-1])
        free = shutil.disk_usage(self.root).free
        if free >= needed:
            return None
        for old in done[: len(done) - max(self.keep - 1, 1)]:
            print(
                f"checkpoint: {free / MiB:,.1f} MiB free in {self.root}, {name} needs about {needed / MiB:,.1f} MiB: "
                f"deleting {old.name} now (checkpoint.keep={self.keep} would delete it after this save)",
                flush=True,
            )
            shutil.rmtree(old, ignore_errors=True)
            free = shutil.disk_usage(self.root).free
            if free >= needed:
                return None
        return (
            f"not enough disk space for checkpoint {name} in {self.root}: it needs about {needed / MiB:,.1f} MiB (the "
            f"size of {done[-1].name}) and {free / MiB:,.1f} MiB are free; checkpoint.keep={self.keep} holds "
            f"{self.keep} checkpoint(s) of that size on disk plus the one being written. Free space there or lower "
            f"checkpoint.keep, then run the same command: it resumes from {done[-1].name}, which is intact"
        )

    def _resumes_from(self) -> str:
        """What the same command does after a failed save."""
        last = complete_checkpoints(self.root)
        return f"resumes from {last[-1].name}, which is intact" if last else "starts again (no checkpoint was written)"

    def _write_error(self, exc: BaseException, name: str) -> str:
        return (
            f"checkpoint {name} could not be written ({write_failure(exc)}); it was removed. Fix the cause, then run "
            f"the same command: it {self._resumes_from()}"
        )

    def _disk_error(self, exc: BaseException, name: str) -> str:
        kept = self._resumes_from()
        return (
            f"the disk holding {self.root} is full: checkpoint {name} could not be written and was removed "
            f"({shutil.disk_usage(self.root).free / MiB:,.1f} MiB free); free space there or lower checkpoint.keep "
            f"(now {self.keep}), then run the same command: it {kept}"
        )

    def find_resume(self, resume: str) -> Path | None:
        """The checkpoint to resume from, verified (trainer/integrity.py), the same on every rank. With `auto`, a
        damaged checkpoint is reported in one line, moved aside and the next older complete one taken."""
        if resume == "never":
            return None
        if resume == "auto":
            decision = self._newest_complete() if self.dims.is_main else None
            kind, value = broadcast_object(decision)
            if kind == "error":
                raise SharedError(value)
            return Path(value) if value else None
        path = Path(resume)
        if not path.exists():
            raise UserError(f"checkpoint.resume={resume} does not exist: give a checkpoint directory, auto or never")
        return resolve_checkpoint_dir(path)

    def _newest_complete(self) -> tuple[str, str | None]:
        """Rank 0's resume decision: ("path", newest complete checkpoint or None) or ("error", message)."""
        found, pointer_problem = candidates(self.root)
        if pointer_problem:
            print(f"checkpoint: {pointer_problem}; looking for the newest complete step_<N> instead", flush=True)
        damaged = []
        for path in found:
            why = damage(path)
            if why is None:
                for name, reason, aside in damaged:
                    print(
                        f"checkpoint {name} is damaged ({reason}); moved aside to {aside}; resuming from {path.name}",
                        flush=True,
                    )
                return "path", str(path)
            damaged.append((path.name, why, self._move_aside(path).name))
        if damaged:
            said = "; ".join(f"{name} ({reason}) moved aside to {aside}" for name, reason, aside in damaged)
            return "error", (
                f"no complete checkpoint left in {self.root}: {said}. Start a fresh run with "
                f"checkpoint.resume=never (or another run.dir), or give checkpoint.resume=PATH"
            )
        return "path", None

    def _move_aside(self, path: Path) -> Path:
        """Renames a damaged checkpoint out of the way (never deleted: there may be something to recover)."""
        aside, n = self.root / f"{DAMAGED_PREFIX}{path.name}", 1
        while aside.exists():
            aside, n = self.root / f"{DAMAGED_PREFIX}{path.name}.{n}", n + 1
        os.replace(path, aside)
        return aside

    def check_resume(
        self, path: Path, model_config: dict, engine: str, zero_stage: int, tokenizer_path: str | Path
    ) -> dict:
        """The checkpoint's state, once it is known that this run can continue it (same model shape, same
        tokenizer, an engine that reads its payload); raised before anything is built or written."""
        state = read_state(path)
        if not same_model(state.get("model_config", {}), model_config):
            saved, now = state.get("model_config", {}), model_config
            diff = ", ".join(
                f"{k}: {saved.get(k)} -> {now.get(k)}"
                for k in sorted(set(saved) | set(now))
                if saved.get(k) != now.get(k)
            )
            raise UserError(
                f"checkpoint {path} holds another model shape ({diff}); match model.* to it or start "
                f"a fresh run (checkpoint.resume=never or another run.dir)"
            )
        saved_tok = state.get("tokenizer_sha256")
        if saved_tok is None and (path / "tokenizer.json").is_file():  # written before the hash was saved
            saved_tok = file_sha256(path / "tokenizer.json")
        now_tok = file_sha256(tokenizer_path)
        if saved_tok is not None and saved_tok != now_tok:
            raise SharedError(
                f"data.tokenizer {tokenizer_path} is not the tokenizer checkpoint {path.name} was trained with "
                f"(sha256 {now_tok[:12]} vs {saved_tok[:12]}); the saved data position and the "
                f"embeddings are in that one's tokens: set data.tokenizer={path / 'tokenizer.json'} to resume, or "
                f"start a fresh run (checkpoint.resume=never or another run.dir)"
            )
        check_payload(path, engine, zero_stage)
        return state

    def load(self, path: Path, engine: Engine) -> dict | None:
        """Loads the engine's state (saved by any layout the engine reads) and returns this data-parallel rank's RNG
        state, or None when the checkpoint has none for it (as after a resume on more ranks). The caller sets the
        RNG right before the first step."""
        engine.load(path)
        for name in dict.fromkeys(
            [rng_file_name(self.dims.dp_rank, self.dims.pp_rank), rng_file_name(self.dims.dp_rank)]
        ):
            if (path / name).is_file():  # a pipeline stage's own stream, else its data-parallel rank's
                return torch.load(path / name, weights_only=False)
        return None
