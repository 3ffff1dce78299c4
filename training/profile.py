"""`train.profile.steps=[a,b]`: a torch profiler trace of optimizer steps a..b (inclusive) of this rank,
written to run_dir/profile/rank{r}_steps{a}-{b}.json (open it in Perfetto or chrome://tracing)."""
from pathlib import Path

import torch


class StepProfiler:
    def __init__(self, steps: list[int], out_dir: Path, rank: int):
        self.first, self.last = (steps[0], steps[1]) if steps else (None, None)
        self.path = Path(out_dir) / f"rank{rank}_steps{self.first}-{self.last}.json"
        self.profiler = None

    def step(self, finished: int) -> None:
        """Called after optimizer step `finished`: start before step `first`, stop after step `last`."""
        if self.first is None:
            return
        if finished == self.first - 1:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False)
            self.profiler.start()
        elif finished == self.last and self.profiler is not None:
            self.profiler.stop()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.profiler.export_chrome_trace(str(self.path))
            print(f"profile of steps {self.first}-{self.last}: {self.path}")
            self.profiler = None
