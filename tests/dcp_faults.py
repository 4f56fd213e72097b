"""`trainer ...` with faults injected into DCP's background checkpoint write, for tests/test_async_checkpoint.py and
bench/kill_trials.py: run as the torchrun script in place of `-m trainer`. The trainer itself has no test hooks;
this wrapper patches torch's own classes in the rank's process before the CLI starts. Environment:

- DCP_FAULT_STAGE_S: seconds each staging copy (DefaultStager) waits before copying: a slow host copy, so that a
  missing wait before the optimizer step would let the step change the weights before they are copied.
- DCP_FAULT_WRITE_S: seconds each background write (FileSystemWriter.write_data in DCP's async thread) waits
  before writing: a slow disk, so that a kill or a signal lands during the write.
- DCP_FAULT_FAIL_RANK, DCP_FAULT_FAIL_STEP: that rank's write of checkpoint step N fails (permission denied).
"""

from __future__ import annotations

import errno
import os
import threading
import time

from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.staging import DefaultStager


def _install() -> None:
    stage_s = float(os.environ.get("DCP_FAULT_STAGE_S", "0"))
    write_s = float(os.environ.get("DCP_FAULT_WRITE_S", "0"))
    fail_rank = os.environ.get("DCP_FAULT_FAIL_RANK")
    fail_step = os.environ.get("DCP_FAULT_FAIL_STEP")
    rank = os.environ.get("RANK", "0")

    if stage_s:
        stage = DefaultStager._stage

        def slow_stage(self, state_dict, **kwargs):
            time.sleep(stage_s)
            return stage(self, state_dict, **kwargs)

        DefaultStager._stage = slow_stage

    write_data = FileSystemWriter.write_data

    def faulty_write_data(self, plan, planner):
        in_background = threading.current_thread().name.startswith("AsyncCheckpointExecutor")
        if in_background and write_s:
            time.sleep(write_s)
        if rank == fail_rank and f".tmp_step_{fail_step}" in str(self.path):
            raise PermissionError(errno.EACCES, "Permission denied (injected)", str(self.path))
        return write_data(self, plan, planner)

    FileSystemWriter.write_data = faulty_write_data


if __name__ == "__main__":
    _install()
    from trainer.cli import main

    main()
