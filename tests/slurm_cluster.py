"""A real two-node Slurm cluster on loopback for the launch tests: Debian's slurmctld/slurmd/munge, started by hand as
root (no systemd), two slurmd daemons emulating nodes n1 and n2 on this host. Everything lives in one directory;
`stop()` ends every daemon it started, by PID.

    python tests/slurm_cluster.py start DIR    # prints the SLURM_CONF to export
    python tests/slurm_cluster.py stop DIR
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = ("n1", "n2")


def ensure_installed() -> str | None:
    """None when Slurm is usable here, else why not (the tests then skip, saying so)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and this is not a root Debian machine that could install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", *PACKAGES]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:  # the package lists may be missing on a fresh machine
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, check=False)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {r.stderr.strip().splitlines()[-1:]}"
    return None


def write_config(root: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    for d in ("state", "log", *(f"spool-{n}" for n in NODES)):
        (root / d).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=trainer-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10,socket={root}/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
InactiveLimit=0
MinJobAge=3600
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port=17001-17002 CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
"""
    )
    return conf


def start(root: Path) -> dict[str, str]:
    """Starts munged, slurmctld and two slurmd; returns the environment the Slurm commands need."""
    root.mkdir(parents=True, exist_ok=True)
    conf = write_config(root)
    key = root / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    subprocess.run(
        [
            "munged",
            "--force",
            f"--key-file={key}",
            f"--socket={root}/munge.socket",
            f"--pid-file={root}/munged.pid",
            f"--log-file={root}/log/munged.log",
            f"--seed-file={root}/munged.seed",
        ],
        check=True,
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    for node in NODES:
        subprocess.run(["slurmd", "-f", str(conf), "-N", node], env=env, check=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, check=False)
        states = r.stdout.split()
        if states and all(s in ("idle", "mix", "alloc") for s in states):
            return {"SLURM_CONF": str(conf)}
        time.sleep(0.5)
    stop(root)
    raise RuntimeError(f"the test Slurm cluster did not come up: {r.stdout} {r.stderr}")


def stop(root: Path) -> None:
    """Ends every daemon start() began, by the PID files they wrote."""
    files = [root / "slurmctld.pid", *(root / f"slurmd-{n}.pid" for n in NODES), root / "munged.pid"]
    pids = []
    for pid_file in files:
        try:
            pids.append(int(pid_file.read_text().split()[0]))
            os.kill(pids[-1], signal.SIGTERM)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 30
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        time.sleep(0.2)
    for pid in pids:  # still there after 30 s
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    what, where = sys.argv[1], Path(sys.argv[2])
    if what == "start":
        print(start(where)["SLURM_CONF"])
    else:
        stop(where)
