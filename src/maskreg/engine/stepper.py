"""One optimisation iteration, run eagerly or replayed as a CUDA graph.

An iteration of a stage is a few hundred small torch operations (sampling, the loss and its gradient, the
update). On a GPU, launching them one by one from Python costs more than running them at the coarse pyramid
levels, where the GPU then mostly waits for the launches. A CUDA graph records the iteration once and replays
it with one launch.

The iteration ``fn`` must be *graph-safe*: it reads and updates only tensors that outlive it (parameters,
optimiser moments, a device-side iteration counter, output buffers), in place, and never reads a value on
the host (no ``float(t)``, ``.item()``, ``.cpu()``, no branch on a tensor's value, no host → device copy).
The same ``fn`` runs eagerly on the CPU, so both devices share one code path.

``MASKREG_CUDA_GRAPHS=0`` turns the graphs off (eager on CUDA too), e.g. to compare both or to debug.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable

import torch


def graphs_enabled(device: torch.device) -> bool:
    """Whether iterations on ``device`` are replayed as CUDA graphs."""
    return device.type == "cuda" and os.environ.get("MASKREG_CUDA_GRAPHS", "1") not in ("0", "false", "no")


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One capture stream per device for the whole process: a new stream per level would get its own cuBLAS
    handle and workspace each time."""
    key = torch.device(device)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(key)
    return _SIDE_STREAMS[key]


class Stepper:
    """Calls ``fn(key)`` once per iteration. Eager on the CPU (or with graphs off); on CUDA the first
    ``warmup`` calls run eagerly on a side stream (lazy library set-up happens there, not during a capture),
    then each distinct ``key`` (a variant of the iteration with other static shapes or op counts, e.g. the
    number of squarings of an exponential) is captured once and replayed. Warm-up calls are real
    iterations: they update the state like replays do."""

    def __init__(self, fn: Callable[[Hashable], None], device: torch.device, graphs: bool = True, warmup: int = 1):
        self.fn = fn
        self.graphed = graphs and graphs_enabled(device)
        self.warmup = warmup
        self.calls = 0
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        if self.graphed:
            self.stream = _side_stream(device)
            self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, key: Hashable = None) -> None:
        self.calls += 1
        if not self.graphed:
            self.fn(key)
            return
        graph = self.graphs.get(key)
        if graph is None:
            main = torch.cuda.current_stream()
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                if self.calls <= self.warmup:
                    self.fn(key)
                else:
                    # capture_begin/end rather than ``with torch.cuda.graph(...)``, whose entry runs a
                    # garbage collection and empties the allocator's cache at every capture (slow).
                    # The capture records without running: the replay below does this iteration's work.
                    graph = torch.cuda.CUDAGraph()
                    graph.capture_begin(pool=self.pool)
                    try:
                        self.fn(key)
                    finally:
                        graph.capture_end()
                    self.graphs[key] = graph
            main.wait_stream(self.stream)
        if graph is not None:
            graph.replay()

    def close(self) -> None:
        """Free the graphs and their private memory pool (call at the end of a pyramid level: a pool kept
        per level would hold every level's intermediates at once)."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.pool = None
        if self.graphed:
            # a capture gives cuBLAS a workspace of its own (in the graph's pool); torch keeps it in a map
            # until told to drop it: without this, every level would leak one
            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None:
                clear()
