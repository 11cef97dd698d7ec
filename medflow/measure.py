"""One speed or memory measurement in a fresh process: ``python -m medflow.measure SPEC``.

``SPEC`` is a ``Case`` as JSON; the process prints its result as one JSON line (times in
seconds, memories in MiB), or ``{"error": ...}``. ``medflow.bench`` runs every measurement this
way, so peak memories do not mix; this module imports only torch and the model code, so a
worker starts quickly.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from medflow.optimizer import adamw

MIB = 2.0**20


def volume_text(shape) -> str:
    """(96, 112, 96) -> '96x112x96'."""
    return "x".join(str(s) for s in shape)


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----- memory --------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_now_mib(device: torch.device) -> float:
    """Resident set size (CPU) or memory allocated by torch (CUDA) now, in MiB."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MIB
    return (_proc_status_kib("VmRSS") or 0) / 1024


def reset_peak_memory(device: torch.device) -> None:
    """Restart the high-water mark: CUDA peak stats, or the process's VmHWM via /proc/self/clear_refs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mib(device: torch.device) -> float:
    """Peak since ``reset_peak_memory``, in MiB: torch.cuda.max_memory_allocated, or the RSS
    high-water mark VmHWM (getrusage's ru_maxrss where /proc is missing; it is not reset and, in a
    spawned process, starts at the parent's RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / MIB if sys.platform == "darwin" else maxrss / 1024


# ----- one measurement ------------------------------------------------------------------------
@dataclass
class Case:
    """One measurement. task: ``train`` (one optimiser step), ``sample`` (``DualGlow.sample``) or
    ``max_batch`` (the largest training batch that fits, up to ``batch``); impl: ``medflow`` or
    ``peer`` (FrEIA); shape: volume in voxels; overrides: model options; bf16: bfloat16 coupling
    subnets (``set_subnet_bf16``); compiled: ``DualGlow.compile_subnets``; batch: volumes per
    training step or MRIs per sampling call (``max_batch``: the largest batch tried);
    channels_last: the peer's weights stored channels-last (medflow's layout on a CPU)."""

    task: str
    preset: str
    shape: tuple[int, int, int]
    impl: str = "medflow"
    recompute: bool = False
    overrides: dict = field(default_factory=dict)
    samples: int = 1
    temperature: float = 0.5
    warmup: int = 1
    timed: int = 3
    device: str = "cpu"
    bf16: bool = False
    compiled: bool = False
    batch: int = 1
    channels_last: bool = False

    @property
    def variant(self) -> str:
        """Backward, precision and compilation in words: 'plain, bf16 subnets, torch.compile'."""
        words = ["memory-saving" if self.recompute else "plain", "bf16 subnets" if self.bf16 else "fp32"]
        return ", ".join(words + (["torch.compile"] if self.compiled else []))

    @property
    def label(self) -> str:
        what = f"{self.samples} sample(s)" if self.task == "sample" else (
            "FrEIA peer" if self.impl == "peer" else self.variant)
        return f"{self.task} {self.preset} {volume_text(self.shape)} {what} on {self.device}"


def build_model(case: Case, device: torch.device) -> torch.nn.Module:
    """The medflow model or its FrEIA peer for ``case``, untrained, on ``device``: medflow's in the
    layout ``place_model`` gives it (channels-last weights on a CPU), the peer's in PyTorch's default
    layout, as a FrEIA user's model has it, or channels-last with ``case.channels_last``."""
    if case.impl == "peer":
        from medflow.peer_flow import PeerDualGlow

        peer = PeerDualGlow.from_preset(case.preset, tuple(case.shape), **case.overrides).to(device)
        return peer.to(memory_format=torch.channels_last_3d) if case.channels_last else peer
    from medflow.device import place_model
    from medflow.model import DualGlow

    model = DualGlow.from_preset(case.preset, **case.overrides)
    model.set_recompute(case.recompute)
    model.set_subnet_bf16(case.bf16)
    if case.compiled:
        model.compile_subnets()
    return place_model(model, device)


def example_pair(shape, device: torch.device, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded uniform MRI and PET volumes [batch, 1, *shape] in the model's [-0.5, 0.5] range."""
    g = torch.Generator().manual_seed(0)
    mri, pet = (torch.rand((batch, 1, *shape), generator=g) - 0.5 for _ in range(2))
    return mri.to(device), pet.to(device)


def train_step(model, optimizer, pet: torch.Tensor, mri: torch.Tensor) -> None:
    """Forward, backward and one AdamW step on batch 1."""
    optimizer.zero_grad(set_to_none=True)
    loss, _ = model.loss(pet, mri)
    loss.backward()
    optimizer.step()


def seconds(fn, device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds (all threads) of ``fn()``, synchronising CUDA before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def initialised_model(case: Case, device: torch.device) -> tuple[torch.nn.Module, float]:
    """``build_model`` with ActNorm initialised by one training-mode forward without gradients,
    and that forward's wall-clock seconds (compilation of the forward included)."""
    torch.set_num_threads(usable_cores())
    torch.manual_seed(0)
    model = build_model(case, device)
    mri, pet = example_pair(case.shape, device)
    model.train()
    with torch.no_grad():
        init_s, _ = seconds(partial(model.loss, pet, mri), device)
    return model, init_s


def timed_runs(run, case: Case, device: torch.device) -> dict:
    """Time ``case.timed`` calls of ``run`` after ``case.warmup`` untimed ones (the first call's
    time, compilation included, is reported too). Memory: baseline now, peak above it."""
    baseline = memory_now_mib(device)
    reset_peak_memory(device)
    times = [seconds(run, device) for _ in range(case.warmup + case.timed)]
    peak = peak_memory_mib(device)
    timed = times[case.warmup:]
    return {"times_s": [wall for wall, _ in timed], "median_s": statistics.median(wall for wall, _ in timed),
            "first_s": times[0][0], "median_cpu_s": statistics.median(cpu for _, cpu in timed),
            "baseline_mib": baseline, "peak_mib": peak, "above_baseline_mib": peak - baseline,
            "threads": torch.get_num_threads()}


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def measure(case: Case) -> dict:
    """Build and initialise the model, then time ``case.timed`` training steps or sampling calls
    on batch ``case.batch``. Memory: baseline after build and initialisation, peak above it."""
    device = torch.device(case.device)
    model, init_s = initialised_model(case, device)
    mri, pet = example_pair(case.shape, device, case.batch)
    if case.task == "train":
        run = partial(train_step, model, adamw(model.parameters(), lr=1e-4), pet, mri)
    else:
        model.eval()
        run = partial(model.sample, mri, case.temperature, case.samples)
    return {"params": trainable_parameters(model), "init_s": init_s, **timed_runs(run, case, device)}


def largest_batch(fits, cap: int) -> int:
    """The largest batch b <= cap with ``fits(b)`` to within an eighth, for a ``fits`` that is true
    up to some size and false above it: doubling from 1, then bisection until the first batch that
    failed is at most b + max(1, b // 8). 0 when batch 1 does not fit."""
    if not fits(1):
        return 0
    good, bad = 1, None
    while good < cap and bad is None:
        trial = min(2 * good, cap)
        if fits(trial):
            good = trial
        else:
            bad = trial
    while bad is not None and bad - good > max(1, good // 8):
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def step_fits(model, optimizer, shape, device: torch.device, failures: list[str], steps: int, batch: int) -> bool:
    """``steps`` consecutive training steps on ``batch`` random volumes run (as many as a timed
    measurement takes: a batch whose first step fits may not fit its second). A failure (out of
    memory, or a kernel refusing a tensor that large) is appended to ``failures`` as 'batch N: reason'."""
    mri, pet = example_pair(shape, device, batch)
    try:
        for _ in range(steps):
            train_step(model, optimizer, pet, mri)
        return True
    except RuntimeError as error:
        reason = "out of memory" if isinstance(error, torch.OutOfMemoryError) else str(error).splitlines()[0][:120]
        failures.append(f"batch {batch}: {reason}")
        optimizer.zero_grad(set_to_none=True)
    finally:
        del mri, pet
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return False


def measure_largest_batch(case: Case) -> dict:
    """The largest training batch up to ``case.batch`` whose ``case.warmup + case.timed`` steps fit
    (``largest_batch``, all tries in this one process) and the first failure above it ("limit")."""
    device = torch.device(case.device)
    model, _ = initialised_model(case, device)
    optimizer = adamw(model.parameters(), lr=1e-4)
    failures: list[str] = []
    batch = largest_batch(partial(step_fits, model, optimizer, case.shape, device, failures,
                                  case.warmup + case.timed), case.batch)
    if batch == 0:
        return {"error": failures[0]}
    return {"max_batch": batch, "limit": failures[-1] if failures else f"the search's cap {case.batch}"}


def run_worker(spec: str) -> None:
    """Entry point of ``python -m medflow.measure SPEC``: print the measurement as one JSON line."""
    case = Case(**json.loads(spec))
    try:
        result = measure_largest_batch(case) if case.task == "max_batch" else measure(case)
    except torch.OutOfMemoryError:
        result = {"error": f"out of {case.device} memory"}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    run_worker(sys.argv[1])
