"""The measurement a benchmark worker makes (medflow.measure); no timing assertions."""

from functools import partial

import pytest
import torch

from medflow import measure

SHAPE = (16, 16, 16)


@pytest.mark.parametrize("case", [
    measure.Case("train", "tiny", SHAPE, timed=1),
    measure.Case("train", "tiny", SHAPE, recompute=True, timed=1),
    measure.Case("train", "tiny", SHAPE, impl="peer", timed=1),
    measure.Case("sample", "tiny", SHAPE, samples=2, timed=1),
    measure.Case("train", "tiny", SHAPE, bf16=True, batch=2, timed=1),
])
def test_measure_reports_times_and_memory(case):
    result = measure.measure(case)
    assert len(result["times_s"]) == 1 and result["median_s"] > 0
    assert result["baseline_mib"] > 0 and result["peak_mib"] > 0
    assert result["params"] > 0


@pytest.mark.parametrize("limit", [1, 5, 37, 64, 300])
def test_largest_batch_finds_the_boundary_in_few_tries(limit):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= limit

    found = measure.largest_batch(fits, cap=256)
    if limit >= 256:
        assert found == 256
    else:
        assert found <= limit < found + max(1, found // 8)
    assert len(tried) <= 2 * 8 + 1 and max(tried) <= 256
    assert measure.largest_batch(lambda b: False, cap=256) == 0


def test_a_batch_fits_only_if_as_many_steps_as_a_timed_run_takes_fit(monkeypatch):
    """A batch whose first step fits and second does not (memory that grows after the first step,
    simulated above batch 3) is not the largest batch: the timed run in a fresh process would fail."""
    real_step = measure.train_step
    steps_at = {}

    def step(model, optimizer, pet, mri):
        batch = pet.shape[0]
        steps_at[batch] = steps_at.get(batch, 0) + 1
        if batch > 3 and steps_at[batch] > 1:
            raise torch.OutOfMemoryError("simulated")
        real_step(model, optimizer, pet, mri)

    monkeypatch.setattr(measure, "train_step", step)
    case = measure.Case("max_batch", "tiny", SHAPE, batch=8, timed=2)
    assert measure.measure_largest_batch(case) == {"max_batch": 3, "limit": "batch 4: out of memory"}
    assert steps_at[3] == case.warmup + case.timed


def test_batch_search_stops_at_out_of_memory(monkeypatch):
    """A step that runs out of memory above batch 3 (simulated) ends the search at 3 and names why."""
    real_step = measure.train_step

    def step(model, optimizer, pet, mri):
        if pet.shape[0] > 3:
            raise torch.OutOfMemoryError("simulated")
        real_step(model, optimizer, pet, mri)

    monkeypatch.setattr(measure, "train_step", step)
    case = measure.Case("max_batch", "tiny", SHAPE, batch=16)
    model, _ = measure.initialised_model(case, torch.device("cpu"))
    failures = []
    fits = partial(measure.step_fits, model, torch.optim.AdamW(model.parameters()), SHAPE, torch.device("cpu"),
                   failures, 1)
    assert measure.largest_batch(fits, cap=16) == 3
    assert failures[-1] == "batch 4: out of memory"
    assert measure.measure_largest_batch(measure.Case("max_batch", "tiny", SHAPE, batch=2)) == {
        "max_batch": 2, "limit": "the search's cap 2"}
