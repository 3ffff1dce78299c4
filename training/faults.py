"""What a long run survives: preemption signals, non-finite steps, loss spikes.

Exit codes of train.py (the README lists them):
  0   finished
  1   a bug (traceback)
  2   a user error: bad config, data or checkpoint (one line)
  3   stopped after train.max_bad_steps consecutive non-finite steps; the last checkpoint is intact
  4   a collective timed out (parallel.timeout_s): another rank is hung or dead
  75  stopped by SIGTERM or SIGUSR1 after saving the step reached (EX_TEMPFAIL): `resume=auto` continues
"""
import math
import signal
import sys
import traceback
from collections import deque
from pathlib import Path

EXIT_DIVERGED = 3
EXIT_TIMEOUT = 4
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingDiverged(Exception):
    """Too many consecutive non-finite steps: continuing would only burn compute."""


class StopSignals:
    """Turns SIGTERM / SIGUSR1 into a request the loop honours after the current optimizer step (every rank
    agrees on it through the step's all-reduce). A second signal while stopping changes nothing: the save
    of the step reached goes on undisturbed."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            print(f"{name}: finishing this step, saving a checkpoint, then exiting with {EXIT_PREEMPTED}",
                  file=sys.stderr, flush=True)
        else:
            print(f"{name}: already stopping (after {self.received}); the save goes on", file=sys.stderr, flush=True)


class StepGuard:
    """Counts non-finite steps (their update is skipped by the engine) and flags loss spikes against the
    running mean of recent good losses."""

    def __init__(self, max_bad_steps: int, spike_factor: float, window: int = 50):
        self.max_bad_steps = max_bad_steps
        self.spike_factor = spike_factor
        self.recent = deque(maxlen=window)
        self.consecutive_bad = 0
        self.total_bad = 0
        self.last_bad_step = 0

    def check(self, step: int, loss: float, grad_norm: float) -> dict:
        """Record step `step`; return the metrics fields it adds. Once max_bad_steps are bad in a row,
        `raise_if_diverged` (called after the step's record is logged) stops the run."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.consecutive_bad += 1
            self.total_bad += 1
            print(f"step {step}: non-finite loss {loss} or grad norm {grad_norm}; update skipped "
                  f"({self.consecutive_bad} in a row, {self.total_bad} in all)", file=sys.stderr, flush=True)
            self.last_bad_step = step
            return {"skipped": True, "bad_steps": self.total_bad}
        self.consecutive_bad = 0
        fields = {"bad_steps": self.total_bad}
        if len(self.recent) >= 10 and loss > self.spike_factor * (sum(self.recent) / len(self.recent)):
            print(f"step {step}: loss spike {loss:.4f} > {self.spike_factor} x running mean "
                  f"{sum(self.recent) / len(self.recent):.4f}", file=sys.stderr, flush=True)
            fields["loss_spike"] = True
        self.recent.append(loss)
        return fields

    def raise_if_diverged(self) -> None:
        if self.consecutive_bad >= self.max_bad_steps:
            raise TrainingDiverged(f"{self.consecutive_bad} consecutive non-finite steps (the last at step "
                                   f"{self.last_bad_step}, train.max_bad_steps={self.max_bad_steps}); stopped "
                                   "without saving, the last checkpoint is intact")


def describe_timeout(err: BaseException, timeout_s: float) -> str | None:
    """One line naming the collective that timed out (the innermost torch.distributed call of the
    traceback) and where our code called it; None if `err` is not a collective timeout. Gloo's own
    message only says it waited for a recv."""
    text = str(err)
    if "Timed out" not in text and "timed out" not in text and type(err).__name__ != "DistBackendError":
        return None
    frames = traceback.extract_tb(err.__traceback__)
    collective = next((f for f in reversed(frames) if "torch/distributed/" in f.filename), None)
    ours = next((f for f in reversed(frames) if _REPO in Path(f.filename).parents and ".venv" not in f.filename), None)
    where = f" called from {Path(ours.filename).relative_to(_REPO)}:{ours.lineno} ({ours.name})" if ours else ""
    name = collective.name if collective else "a collective"
    return (f"collective {name}{where} timed out after {timeout_s:g}s (parallel.timeout_s): another rank is hung "
            f"or dead ({text.strip().splitlines()[0][-120:]})")


_REPO = Path(__file__).resolve().parents[1]
