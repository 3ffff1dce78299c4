"""A throwaway single-node Slurm cluster (munged, slurmctld, slurmd) under one directory, for tests.

Everything it writes (config, munge key, state, spool, logs, sockets, pid files) lives in `root`, on
ports picked free; the daemons run in the foreground as children of the test process and `stop()` ends
them. Needs Debian's slurm-wlm and munge (.ci/run installs them) and root (slurmd starts jobs as their
submitter, slurmctld and slurmd run as root here).
"""
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

COMMANDS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
# CPU slots the node offers whatever the machine has (config_overrides), so a test's jobs run side by side.
CPU_SLOTS = 8
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


class SlurmError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unmet_requirement(path: str) -> str | None:
    """Why a local cluster cannot start on this machine (None: it can): Slurm not installed, or not root."""
    missing = [name for name in COMMANDS if shutil.which(name, path=path) is None]
    if missing:
        return (f"needs slurm-wlm and munge (no {', '.join(missing)} here): `bash .ci/run` installs them, "
                "or apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        return "needs root: the local Slurm cluster's slurmd starts jobs as their submitter"
    return None


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf"),
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"}

    def start(self, timeout: float = 60) -> "LocalSlurm":
        unmet = unmet_requirement(self.env["PATH"])
        if unmet is not None:
            raise SlurmError(unmet)
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge = self.root / "munge"
        munge.chmod(0o700)  # munged refuses a key or socket directory others can write to
        self._run(["mungekey", "--create", f"--keyfile={munge / 'munge.key'}"])
        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={munge / 'munge.key'}",
                               f"--socket={munge / 'socket'}", f"--pid-file={munge / 'munged.pid'}",
                               f"--seed-file={munge / 'munged.seed'}", f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait_for(lambda: (munge / "socket").exists(), timeout, "munged did not open its socket")
        (self.root / "slurm.conf").write_text(self._config(munge / "socket"))
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.host])
        self._wait_for(self._node_idle, timeout, "the node did not come up idle")
        return self

    def stop(self) -> None:
        """slurmd, slurmctld, then munged (the others sign their last messages with it)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            proc.log.close()
        self.procs.clear()

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        return self._run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})}).strip()

    def scontrol(self, *args: str) -> str:
        return self._run(["scontrol", *args])

    def scancel(self, *args: str) -> str:
        return self._run(["scancel", *args])

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict: JobState, Restarts, ExitCode, StdOut, ..."""
        line = self.scontrol("show", "job", "--oneliner", job_id)
        return dict(field.split("=", 1) for field in line.split() if "=" in field)

    def wait_for_end(self, job_id: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in ENDED:
                return info
            time.sleep(1)
        raise SlurmError(f"job {job_id} still {info['JobState']} after {timeout:.0f} s")

    def _config(self, munge_socket: Path) -> str:
        # cred_expire also holds a requeued job back that long (120 s by default): 10 s here.
        root = self.root
        return f"""\
ClusterName=baton-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={CPU_SLOTS} RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%T"], env=self.env, capture_output=True,
                             text=True, timeout=10)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        proc.log, proc.name = log, name
        self.procs.append(proc)

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [proc for proc in self.procs if proc.poll() is not None]
            if dead:
                raise SlurmError(f"{dead[0].name} exited ({dead[0].returncode}): {self.log_tail(dead[0].name)}")
            if ready():
                return
            time.sleep(0.5)
        raise SlurmError(f"{what} within {timeout:.0f} s: {self.log_tail('slurmctld')} | {self.log_tail('slurmd')}")

    def log_tail(self, name: str, lines: int = 5) -> str:
        paths = [self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.out"]
        text = "".join(path.read_text(errors="replace") for path in paths if path.exists())
        return " / ".join(text.strip().splitlines()[-lines:])

    def _run(self, argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run(argv, env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout
