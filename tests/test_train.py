"""medflow train end to end: resume after SIGKILL equals an uninterrupted run, DDP, safety."""

import csv
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.progress import Progress

import medflow.checkpoint
import medflow.train
from medflow.checkpoint import load_state, read_config, save_state, save_step, step_checkpoints, write_config
from medflow.errors import InputError, ModelError, TrainingError
from medflow.model import DualGlow, DualGlowConfig, bits_per_voxel
from medflow.presets import preset_path
from medflow.train import Trainer, TrainOptions, lr_factor
from medflow.trained import load_trained, weights_file
from tests.paired_data import write_paired_csv
from tests.old_invconv_layout import separate_factor_entries

MEDFLOW = [sys.executable, "-m", "medflow.cli"]
TRAIN_ARGS = ["--preset", "tiny", "--steps", "8", "--checkpoint-every", "1", "--val-every", "4",
              "--seed", "3", "--device", "cpu", "--spacing", "6"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_paired_csv(tmp_path_factory.mktemp("pairs"), n=6)


def run_cli(*args, **kwargs):
    return subprocess.run([*MEDFLOW, *map(str, args)], capture_output=True, encoding="utf-8", errors="replace",
                          timeout=300, **kwargs)


def weights(run: Path) -> dict:
    return load_state(run / "final.pt")["model"]


def test_sigkill_then_resume_equals_uninterrupted_run(pairs, tmp_path):
    """A plain --resume takes the run's seed and stop rule (--seed 3, --steps 8) from the run."""
    straight = tmp_path / "straight"
    done = run_cli("train", pairs, "--out", straight, *TRAIN_ARGS)
    assert done.returncode == 0, done.stderr
    assert (straight / "metrics.csv").read_text().count("\n") == 9

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*MEDFLOW, "train", str(pairs), "--out", str(killed), *TRAIN_ARGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "step-0000003.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before the kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final.pt").exists()
    refused = run_cli("train", pairs, "--out", killed, *TRAIN_ARGS)
    assert refused.returncode == 4 and "--resume" in refused.stderr
    reseeded = run_cli("train", pairs, "--out", killed, "--resume", "--seed", "4", "--device", "cpu")
    assert reseeded.returncode == 3 and "has seed 3, which a resumed run keeps" in " ".join(reseeded.stderr.split())
    resumed = run_cli("train", pairs, "--out", killed, "--resume", "--device", "cpu", "--checkpoint-every", "1",
                      "--val-every", "4")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step-" in resumed.stderr
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


def test_a_plain_resume_keeps_the_runs_ema_and_stop_rule_and_a_new_stop_rule_becomes_the_runs(pairs, tmp_path):
    run = tmp_path / "run"
    first = Trainer(TrainOptions(data=pairs, out=run, preset="tiny", steps=3, ema=0.9, seed=5, device="cpu",
                                 spacing=6.0, val_fraction=0.0), reporter=lambda m: None)
    first.run(Progress(disable=True))
    plain = Trainer(TrainOptions(data=pairs, out=run, resume=True, device="cpu"), reporter=lambda m: None)
    assert (plain.opts.seed, plain.opts.ema, plain.total_steps) == (5, 0.9, 3) and plain.ema is not None
    longer = Trainer(TrainOptions(data=pairs, out=run, resume=True, time_limit=0.001, device="cpu"),
                     reporter=lambda m: None)
    assert (longer.total_steps, longer.opts.time_limit, longer.opts.ema) == (None, 0.001, 0.9)
    longer.run(Progress(disable=True))
    assert read_config(run)["settings"]["course"] == {"steps": None, "epochs": None, "time_limit": 0.001, "ema": 0.9,
                                                      "bf16": False, "recompute": False, "checkpoint_every": 100,
                                                      "val_every": 200}


def quiet_trainer(**options) -> Trainer:
    return Trainer(TrainOptions(**{"preset": "tiny", "device": "cpu", "spacing": 6.0, "val_fraction": 0.0,
                                   **options}), reporter=lambda m: None)


def test_a_resumed_run_keeps_its_backward_and_intervals_unless_given(pairs, tmp_path):
    """--memory-saving, --checkpoint-every and --val-every are the run's own (before, a plain
    --resume fell back to the defaults: another backward, other steps eligible for best.pt)."""
    run = tmp_path / "run"
    quiet_trainer(data=pairs, out=run, steps=2, recompute=True, checkpoint_every=1, val_every=7).run(
        Progress(disable=True))
    plain = Trainer(TrainOptions(data=pairs, out=run, resume=True, steps=3, device="cpu"), reporter=lambda m: None)
    assert (plain.opts.recompute, plain.opts.checkpoint_every, plain.opts.val_every) == (True, 1, 7)
    assert (plain.opts.preset, plain.opts.mri_columns, plain.opts.val_fraction) == ("tiny", ["mri"], 0.0)
    given = quiet_trainer(data=pairs, out=run, resume=True, steps=3, val_every=5)
    assert (given.opts.recompute, given.opts.val_every) == (True, 5)
    defaults = quiet_trainer(data=pairs, out=run, resume=True, steps=3, recompute=False, checkpoint_every=100)
    assert (defaults.opts.recompute, defaults.opts.checkpoint_every) == (False, 100), "given equal to the default"


def test_a_resumed_run_refuses_other_data_model_or_batch_size(pairs, tmp_path):
    """Options a resumed run cannot honour are a one-line error, not silently dropped."""
    run = tmp_path / "run"
    quiet_trainer(data=pairs, out=run, steps=1, batch_size=2).run(Progress(disable=True))
    other = write_paired_csv(tmp_path / "other", n=3)
    for options, named in (({"batch_size": 1}, "--batch-size 1 (the run's: 2)"),
                           ({"preset": "small"}, "--preset small (the run's: tiny)"),
                           ({"model_overrides": {"hidden": 4}}, "--set hidden 4 (the run's: 16)"),
                           ({"spacing": 5.0}, "--spacing 5.0 (the run's: 6.0)"),
                           ({"data": other}, f"DATA {other} (the run's: {pairs.resolve()})")):
        with pytest.raises(InputError, match=re.escape(named)):
            quiet_trainer(**{"data": pairs, "out": run, "resume": True, "steps": 2, **options})
    assert read_config(run)["settings"]["data"] == str(pairs.resolve())


def test_a_run_of_a_newer_config_format_is_not_resumed(pairs, tmp_path):
    """--resume of a run a newer medflow wrote (config_format above this one's) is a one-line
    model error before anything in the run folder changes."""
    from medflow.checkpoint import CONFIG_FORMAT

    run = tmp_path / "run"
    run.mkdir()
    config = run / "config.json"
    config.write_text(json.dumps({"config_format": CONFIG_FORMAT + 1, "medflow_version": "9.1", "settings": {}}))
    before = config.read_bytes()
    with pytest.raises(ModelError, match=rf"config.json: written by medflow 9.1 in config format {CONFIG_FORMAT + 1}"):
        quiet_trainer(data=pairs, out=run, resume=True, steps=2)
    assert config.read_bytes() == before and sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_a_resumed_run_whose_data_moved_reads_the_commands_data(pairs, tmp_path):
    run = tmp_path / "run"
    quiet_trainer(data=pairs, out=run, steps=1).run(Progress(disable=True))
    config = read_config(run)
    config["settings"]["data"] = str(tmp_path / "gone" / "pairs.csv")
    write_config(run, config)
    messages = []
    resumed = Trainer(TrainOptions(data=pairs, out=run, resume=True, steps=2, device="cpu"), reporter=messages.append)
    assert resumed.settings["data"] == str(pairs.resolve()) and any("is not found from here; reading" in m for m in messages)
    config["settings"]["data"] = "pairs.csv"  # runs before 782d175 recorded the path as typed
    write_config(run, config)
    resumed = Trainer(TrainOptions(data=pairs, out=run, resume=True, steps=2, device="cpu"), reporter=lambda m: None)
    assert resumed.settings["data"] == str(pairs.resolve())


def test_resume_with_a_new_lr_trains_on_at_that_peak(pairs, tmp_path, monkeypatch):
    """The way out of a diverged run that exit 8 names: --resume with a lower --lr. The learning
    rate of the resumed steps follows the new peak on the same schedule; the run records it."""
    run = tmp_path / "run"
    quiet_trainer(data=pairs, out=run, steps=4, lr=1e-3, warmup=1, checkpoint_every=2).run(Progress(disable=True))
    full = [float(r["lr"]) for r in csv.DictReader((run / "metrics.csv").open())]
    (run / "final.pt").unlink()
    for old in step_checkpoints(run)[:1]:
        old.unlink()
    resumed = quiet_trainer(data=pairs, out=run, resume=True, lr=1e-4)
    assert resumed.optimizer.param_groups[0]["initial_lr"] == pytest.approx(1e-4)
    used = rates_used(monkeypatch, resumed)
    resumed.run(Progress(disable=True))
    assert used == pytest.approx([lr / 10 for lr in full[1:3]]), "the rates the resumed updates used"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows[-2:]] == [3, 4]
    assert [float(r["lr"]) for r in rows[-2:]] == pytest.approx([lr / 10 for lr in full[2:]])
    assert read_config(run)["settings"]["train"]["lr"] == 1e-4


def test_a_run_checkpointed_on_the_default_adamw_resumes_on_the_fused_kernel(pairs, tmp_path):
    """Checkpoints of runs from before medflow.optimizer (AdamW's groups record fused None) resume
    on the kernel this machine has, not the one the saving machine used."""
    run = tmp_path / "run"
    quiet_trainer(data=pairs, out=run, steps=2, checkpoint_every=1).run(Progress(disable=True))
    (run / "final.pt").unlink()
    newest = step_checkpoints(run)[0]
    state = load_state(newest)
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = None
    save_state(newest, state)
    resumed = quiet_trainer(data=pairs, out=run, resume=True, steps=3)
    resumed.resume()
    assert resumed.step == 2 and [g["fused"] for g in resumed.optimizer.param_groups] == [True]
    assert resumed.optimizer.state_dict()["state"][0]["exp_avg"].abs().sum() > 0, "the saved moments"


def test_a_new_ema_on_resume_starts_from_the_resumed_weights(pairs, tmp_path):
    """--resume --ema D --steps N at the step it stopped at runs no step: final.pt must be the
    checkpoint's weights (before, the average of none: the initial random weights)."""
    run = tmp_path / "run"
    quiet_trainer(data=pairs, out=run, steps=2, checkpoint_every=2).run(Progress(disable=True))
    (run / "final.pt").unlink()
    trained = load_state(step_checkpoints(run)[0])["model"]
    quiet_trainer(data=pairs, out=run, resume=True, steps=2, ema=0.9).run(Progress(disable=True))
    final = load_state(run / "final.pt")["model"]
    for key, value in trained.items():
        assert torch.equal(final[key], value), key


def test_a_second_signal_during_the_last_checkpoint_does_not_lose_it(pairs, tmp_path, monkeypatch):
    """Ctrl-C stops the loop and the last checkpoint is written; a second Ctrl-C (or torchrun's
    SIGTERM after the terminal's SIGINT) while it is written waits for it instead of killing it."""
    original_batch, original_save = Trainer.train_batch, medflow.train.save_step

    def batch(self, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original_batch(self, step)

    def save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return original_save(*args, **kwargs)

    monkeypatch.setattr(Trainer, "train_batch", batch)
    monkeypatch.setattr(medflow.train, "save_step", save)
    run = tmp_path / "run"
    summary = quiet_trainer(data=pairs, out=run, steps=100, checkpoint_every=1000).run(Progress(disable=True))
    assert summary["stopped_by"] == "signal"
    assert [load_state(p)["step"] for p in step_checkpoints(run)] == [summary["step"]]


def test_checkpoints_a_resume_skipped_neither_push_out_new_ones_nor_the_fallback(tmp_path):
    """A run resumed below a checkpoint it could not load keeps what it writes and the intact
    checkpoint before it (two of its own, as always), and synthesis serves final.pt over a newer
    step checkpoint that does not load."""
    for step in (100, 200, 300):
        save_step(tmp_path, step, {"step": step})
    (tmp_path / "checkpoints" / "step-0000300.pt").write_bytes(b"corrupt")
    for step in (210, 220):
        path = save_step(tmp_path, step, {"step": step})
        assert path.exists() and load_state(path)["step"] == step
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step-0000300.pt", "step-0000220.pt", "step-0000210.pt"]
    save_state(tmp_path / "final.pt", {"step": 250})
    assert weights_file(tmp_path)[0].name == "final.pt"


def test_memory_saving_training_follows_the_plain_run(pairs, tmp_path):
    """``medflow train --memory-saving`` takes the plain run's steps: the same losses and gradient
    norms at every step and the same final weights, up to float rounding."""
    logs = {}
    for name, extra in (("plain", []), ("saving", ["--memory-saving"])):
        done = run_cli("train", pairs, "--out", tmp_path / name, *TRAIN_ARGS, *extra)
        assert done.returncode == 0, done.stderr
        with (tmp_path / name / "metrics.csv").open() as f:
            logs[name] = [(float(row["loss"]), float(row["grad_norm"])) for row in csv.DictReader(f)]
    assert len(logs["plain"]) == len(logs["saving"]) == 8
    assert logs["plain"][0][0] == logs["saving"][0][0]  # the first forward pass is the same arithmetic
    for plain, saving in zip(logs["plain"], logs["saving"]):
        assert saving == pytest.approx(plain, rel=1e-4)
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "saving")
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-3), key


@pytest.mark.parametrize("killed_before", ["weights", "checksum"])
def test_a_checkpoint_replaced_by_a_killed_process_still_loads(tmp_path, monkeypatch, killed_before):
    """best.pt is replaced in place. A process killed before the new weights are published leaves
    the old weights, one killed before the new checksum the new weights; either must load (the
    first fails if the new checksum went first, the second if the old one stayed)."""
    path = tmp_path / "best.pt"
    save_state(path, {"step": 1})
    publish = medflow.checkpoint.write_bytes_atomic

    def killed(target, payload, **kwargs):
        if Path(target).name.endswith(".sha256" if killed_before == "checksum" else ".pt"):
            raise KeyboardInterrupt
        return publish(target, payload, **kwargs)

    monkeypatch.setattr(medflow.checkpoint, "write_bytes_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        save_state(path, {"step": 2})
    assert load_state(path)["step"] == (1 if killed_before == "weights" else 2)


def test_synthesis_weights_are_best_then_final_unless_training_went_on_past_it(tmp_path):
    """weights_file: best.pt first; final.pt while no step checkpoint is newer; else the newest
    intact step checkpoint (steps compared as numbers, not as names)."""
    save_step(tmp_path, 9_999_999, {"step": 9_999_999})
    save_step(tmp_path, 10_000_001, {"step": 10_000_001})
    assert weights_file(tmp_path)[1]["step"] == 10_000_001
    save_state(tmp_path / "final.pt", {"step": 10_000_001})
    assert weights_file(tmp_path)[0].name == "final.pt"
    save_step(tmp_path, 10_000_002, {"step": 10_000_002})
    assert weights_file(tmp_path)[1]["step"] == 10_000_002
    save_state(tmp_path / "best.pt", {"step": 7})
    assert weights_file(tmp_path)[0].name == "best.pt"


def test_corrupted_newest_checkpoint_falls_back_to_previous(pairs, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", pairs, "--out", run, *TRAIN_ARGS[:2], "--steps", "3", "--checkpoint-every", "1",
                   "--device", "cpu", "--spacing", "6").returncode == 0
    newest = step_checkpoints(run)[0]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum"):
        load_state(newest)
    resumed = run_cli("train", pairs, "--out", run, "--steps", "4", "--resume", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping" in resumed.stderr and "resumed from step-0000002.pt" in resumed.stderr


def test_resume_from_a_checkpoint_of_older_layout_is_a_one_line_error(pairs, tmp_path):
    """Weights written with separate L and U factors load; their optimizer state cannot, and says so."""
    run = tmp_path / "run"
    assert run_cli("train", pairs, "--out", run, "--preset", "tiny", "--steps", "2", "--checkpoint-every", "1",
                   "--device", "cpu", "--spacing", "6").returncode == 0
    newest = step_checkpoints(run)[0]
    state = load_state(newest)
    model = state["model"]
    for key in [k for k in model if k.endswith("invconv.lu")]:
        prefix = key[: -len("lu")]
        old = separate_factor_entries(model.pop(key), model[prefix + "perm"])
        model.update({prefix + name: value for name, value in old.items()})
    DualGlow(DualGlowConfig.from_dict(read_config(run)["model"])).load_state_dict(model)
    state["optimizer"]["param_groups"][0]["params"].append(len(state["optimizer"]["param_groups"][0]["params"]))
    save_state(newest, state)
    resumed = run_cli("train", pairs, "--out", run, "--steps", "4", "--resume", "--device", "cpu")
    assert resumed.returncode == 5 and "Traceback" not in resumed.stderr
    assert f"{newest}: cannot resume from it" in resumed.stderr


def test_sigterm_saves_a_checkpoint_and_exits_130(pairs, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([*MEDFLOW, "train", str(pairs), "--out", str(run), "--preset", "tiny", "--steps", "100000",
                             "--checkpoint-every", "100000", "--device", "cpu", "--spacing", "6"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
    deadline = time.monotonic() + 240
    while not (run / "metrics.csv").exists() or (run / "metrics.csv").read_text().count("\n") < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert len(step_checkpoints(run)) == 1
    assert "qc" not in read_config(run) and not (run / "final.pt").exists()
    step = load_state(step_checkpoints(run)[0])["step"]
    assert f"--resume --steps {step}" in " ".join(err.split())
    finished = run_cli("train", pairs, "--out", run, "--resume", "--steps", step, "--device", "cpu")
    assert finished.returncode == 0, finished.stderr
    assert load_state(run / "final.pt")["step"] == step
    assert read_config(run)["qc"]["n"] == 5 and read_config(run)["calibration"]["subjects"] == 1
    extended = subprocess.Popen([*MEDFLOW, "train", str(pairs), "--out", str(run), "--resume", "--steps", "100000",
                                 "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while (run / "metrics.csv").read_text().count("\n") < step + 4:
        assert extended.poll() is None and time.monotonic() < deadline + 240
        time.sleep(0.05)
    extended.send_signal(signal.SIGTERM)
    assert extended.wait(timeout=120) == 130
    assert "qc" not in read_config(run) and "calibration" not in read_config(run)


class Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_crafted_pickle_checkpoint_is_refused(pairs, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", pairs, "--out", run, "--preset", "tiny", "--steps", "2", "--device", "cpu",
                   "--spacing", "6").returncode == 0
    payload = pickle.dumps({"model": Boom()})
    (run / "best.pt").write_bytes(payload)
    (run / "best.pt.sha256").write_text(hashlib.sha256(payload).hexdigest() + "\n")
    with pytest.raises(ModelError, match="refused to load"):
        load_trained(run, torch.device("cpu"))
    result = run_cli("synthesize", pairs.parent / "sub-00_t1.nii.gz", tmp_path / "out.nii.gz", "--model", run,
                     cwd=tmp_path)
    assert result.returncode == 5 and "refused to load" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out.nii.gz").exists()


def test_repeated_nonfinite_losses_stop_with_checkpoint_intact(pairs, tmp_path, monkeypatch):
    from medflow.model import DualGlow

    run = tmp_path / "run"
    opts = TrainOptions(data=pairs, out=run, preset="tiny", steps=20, checkpoint_every=2, device="cpu",
                        spacing=6.0, max_nonfinite=3)
    trainer = Trainer(opts, reporter=lambda m: None)
    original = DualGlow.loss

    def poisoned(self, pet, mri, side=None):
        loss, terms = original(self, pet, mri, side)
        return (loss * float("nan") if trainer.step >= 4 else loss), terms

    monkeypatch.setattr(DualGlow, "loss", poisoned)
    with pytest.raises(TrainingError, match="non-finite"):
        trainer.run(Progress(disable=True))
    assert step_checkpoints(run)[0].name == "step-0000004.pt"
    load_state(step_checkpoints(run)[0])


def test_quality_control_statistics_score_the_weights_synthesis_loads(pairs, tmp_path, monkeypatch):
    """Synthesis loads best.pt, here from the validation at step 4 of 8, so the training MRIs'
    bits per voxel stored for quality control must come from those weights, not the final ones."""
    run = tmp_path / "run"
    opts = TrainOptions(data=pairs, out=run, preset="tiny", steps=8, checkpoint_every=4, val_every=4, seed=3,
                        device="cpu", spacing=6.0)
    trainer = Trainer(opts, reporter=lambda m: None)
    validate = Trainer.validate

    def earliest_is_best(self):
        return {**validate(self), "val_pet_bpv": float(self.step)}

    monkeypatch.setattr(Trainer, "validate", earliest_is_best)
    trainer.run(Progress(disable=True))
    assert load_state(run / "best.pt")["step"] == 4
    served = load_trained(run, torch.device("cpu"))
    final = DualGlow(served.model.config)
    final.load_state_dict(weights(run))
    final.eval()

    def mean_bits(model):
        with torch.no_grad():
            return np.mean([bits_per_voxel(model.encode_mri(mri)[0], mri, model.config.n_bins).item()
                            for mri, _, _ in map(trainer.eval_item, trainer.train_cache)])

    assert served.qc["n"] == len(trainer.train_cache)
    assert served.qc["mri_bpv_mean"] == pytest.approx(mean_bits(served.model), rel=1e-6)
    assert abs(mean_bits(final) - served.qc["mri_bpv_mean"]) > 1e-4


def test_ddp_two_processes_on_cpu(pairs, tmp_path):
    run = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "medflow.cli", "train", str(pairs), "--out", str(run), "--preset", "tiny", "--steps", "3",
         "--device", "cpu", "--spacing", "6", "--batch-size", "1"],
        capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "final.pt").exists()
    assert (run / "metrics.csv").read_text().count("\n") == 4
    resumed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
         "-m", "medflow.cli", "train", str(pairs), "--out", str(run), "--resume", "--steps", "4", "--device", "cpu"],
        capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_state(run / "final.pt")["step"] == 4


def _on_gloo_rank(rank: int, init_file: str, work, args: tuple, results) -> None:
    """Rank ``rank`` of a two-process gloo group, on 2 threads as the tests run: puts (rank,
    work(rank, *args)) on ``results``, or (rank, the traceback) if it raised."""
    import traceback
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(2)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        results.put((rank, work(rank, *args)))
    except Exception:
        results.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def on_two_gloo_ranks(tmp_path: Path, work, *args) -> dict:
    """{rank: work(rank, *args)} from two spawned processes in one gloo group (``work`` module-level);
    a rank that raised gives its traceback, and no worker outlives the call."""
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_on_gloo_rank, args=(rank, str(tmp_path / "init"), work, args, results))
               for rank in range(2)]
    try:
        for worker in workers:
            worker.start()
        found = dict(results.get(timeout=120) for _ in workers)
        for worker in workers:
            worker.join(timeout=60)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
    return found


def _agree_on(rank: int, values: tuple[int, int]) -> bool:
    """Does ``Trainer._all_agree_on`` see the same value on both ranks?"""
    from medflow.device import Distributed

    trainer = SimpleNamespace(dist=Distributed(rank, rank, 2), device=torch.device("cpu"))
    return Trainer._all_agree_on(trainer, values[rank])


@pytest.mark.parametrize("values, agree", [((7, 7), True), ((6, 7), False)])
def test_ranks_that_resumed_from_different_steps_find_out_together(tmp_path, values, agree):
    """Without storage that every node shares, ranks can load different checkpoints; every rank
    learns it from one collective (and stops with the same error) instead of training on apart."""
    assert on_two_gloo_ranks(tmp_path, _agree_on, values) == {0: agree, 1: agree}


def _validation(rank: int, world_size: int = 2) -> tuple[list[int], dict]:
    """``Trainer.validate`` as rank ``rank`` of ``world_size`` on five random subjects (a tiny
    untrained model, seed 0): the subjects it read and the means it returned."""
    from medflow.device import Distributed
    from medflow.preprocess import Preprocessing

    torch.manual_seed(0)
    model = DualGlow.from_preset("tiny")
    generator = torch.Generator().manual_seed(1)
    cache = [(torch.rand(1, 1, 16, 16, 16, generator=generator) - 0.5,
              torch.rand(1, 1, 16, 16, 16, generator=generator) - 0.5) for _ in range(5)]
    seen = []

    def eval_item(item):
        seen.append(next(i for i, cached in enumerate(cache) if cached is item))
        return (*item, None)

    trainer = SimpleNamespace(model=model, ema=None, val_cache=cache, eval_item=eval_item, device=torch.device("cpu"),
                              opts=SimpleNamespace(val_samples=3), prep=Preprocessing((6.0,) * 3, (16, 16, 16), 2.0),
                              dist=Distributed(rank, rank, world_size))
    return seen, Trainer.validate(trainer)


def test_ranks_share_the_validation_and_agree_on_its_means(tmp_path):
    """Oracle: one process validating all five subjects. Two gloo ranks read subjects 0, 2, 4 and
    1, 3 (each synthesis among the first three on the rank that reads it) and both return the
    single process's means of bits per voxel, PSNR and SSIM."""
    seen, expected = _validation(0, 1)
    assert seen == [0, 1, 2, 3, 4] and all(np.isfinite(v) for v in expected.values())
    found = on_two_gloo_ranks(tmp_path, _validation)
    assert [found[0][0], found[1][0]] == [[0, 2, 4], [1, 3]]
    for _, means in found.values():
        assert means == pytest.approx(expected, rel=1e-6)


def test_pet_normalisation_is_recorded_and_sets_the_output_level(pairs, tmp_path):
    """The presets' global-mean normalisation stores the training PETs' median global mean as the
    level synthetic PETs are written at; ``--pet-normalization none`` keeps PET units as given."""
    from medflow.manifest import read_manifest
    from medflow.preprocess import global_mean, stage1

    subjects = read_manifest(pairs, ["mri"])
    for choice in ("global_mean", "none"):
        out = tmp_path / choice
        result = run_cli("train", pairs, "--out", out, *TRAIN_ARGS, "--steps", "1", "--val-fraction", "0",
                         "--pet-normalization", choice)
        assert result.returncode == 0, result.stderr
        prep = load_trained(out, torch.device("cpu")).prep
        assert prep.pet_normalization == choice
        if choice == "none":
            assert (prep.pet_level, prep.pet_level_moments) == (1.0, (1.0, 0.0))
            continue
        crop = stage1((6.0, 6.0, 6.0), 2)
        levels = [global_mean(crop({"mri": [str(s.mri[0])], "pet": [str(s.pet)]})["pet"]) for s in subjects]
        assert prep.pet_level == pytest.approx(float(np.median(levels)), rel=1e-5)
        ratios = np.array(levels) / np.median(levels)
        assert prep.pet_level_moments == pytest.approx((np.mean(ratios**2), np.mean((ratios - 1) ** 2)), rel=1e-4)
        assert prep.pet_level_moments[1] > 0
    result = run_cli("train", pairs, "--out", tmp_path / "bad", *TRAIN_ARGS, "--pet-normalization", "suvr")
    assert result.returncode != 0 and "PET normalisation must be one of global_mean, none" in result.stderr
    assert "Traceback" not in result.stderr


def test_lr_factor_warmup_then_cosine_to_ten_percent():
    assert [lr_factor(s, 4, 0.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(10, 4, None) == 1.0
    assert lr_factor(10, 4, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 4, 0.5) == pytest.approx(0.55)
    assert lr_factor(10, 4, 1.0) == pytest.approx(0.1)
    assert lr_factor(10, 4, 3.0) == pytest.approx(0.1)


def half_second_batches(monkeypatch) -> None:
    """Replace the trainer's clock by one on which every training batch takes exactly 0.5 s."""
    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(medflow.train, "time", SimpleNamespace(monotonic=lambda: clock.now))
    original = Trainer.train_batch

    def half_second_batch(self, step):
        clock.now += 0.5
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_batch", half_second_batch)


def rates_used(monkeypatch, trainer: Trainer) -> list[float]:
    """The learning rates of the updates ``trainer`` will make, filled in as it makes them."""
    used, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", recording_step)
    return used


def test_time_limit_decays_lr_and_counts_across_resume(pairs, tmp_path, monkeypatch):
    """With --time-limit and no step count the cosine follows the elapsed training time, and a
    resumed run only trains for what is left of the budget. The trainer's clock is replaced by
    one on which every training batch takes exactly 0.5 s, so the test does not depend on speed."""
    half_second_batches(monkeypatch)
    run = tmp_path / "timed"

    def train(resume: bool) -> Trainer:
        opts = TrainOptions(data=pairs, out=run, preset="tiny", time_limit=4.0, warmup=1, lr=1e-3,
                            checkpoint_every=1000, val_every=1000, device="cpu", spacing=6.0, resume=resume)
        trainer = Trainer(opts, reporter=lambda m: None)
        trainer.run(Progress(disable=True))
        return trainer

    train(resume=False)
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    lrs = [float(r.split(",")[header.index("lr")]) for r in rows[1:]]
    # Step i starts at 0.5 i s of the 4 s budget; its successor's learning rate follows that fraction.
    assert lrs == pytest.approx([1e-3 * lr_factor(i + 1, 1, 0.5 * i / 4.0) for i in range(8)])
    assert lrs[-1] < 0.3e-3
    state = load_state(step_checkpoints(run)[0])
    assert state["elapsed"] == pytest.approx(4.0) and state["step"] == 8
    assert train(resume=True).step == 8
    assert load_state(step_checkpoints(run)[0])["step"] == 8


def test_unet_injector_trains_on_a_grid_padded_to_its_minimum(pairs, tmp_path):
    """The U-Net injector needs 32 voxels per axis: training pads the automatic grid up to that
    and refuses a smaller --grid with a one-line error."""
    unet = ["--set", "injector_width=4", "--set", "injector_net=unet", "--steps", "1", "--val-fraction", "0"]
    result = run_cli("train", pairs, "--out", tmp_path / "unet", *TRAIN_ARGS, *unet)
    assert result.returncode == 0, result.stderr
    trained = load_trained(tmp_path / "unet", torch.device("cpu"))
    assert min(trained.prep.grid) >= 32 and trained.model.config.injector_net == "unet"
    result = run_cli("train", pairs, "--out", tmp_path / "small_grid", *TRAIN_ARGS, *unet, "--grid", "16,16,16")
    assert result.returncode == 3, result.stderr
    assert "the U-Net injector needs at least 32 voxels per axis" in result.stderr and "Traceback" not in result.stderr


def test_parameter_groups_give_the_injector_its_own_learning_rate():
    model = DualGlow(DualGlowConfig(steps=[1, 1], hidden=8, prior_hidden=8, injector_width=4))
    groups = medflow.train.parameter_groups(model, 1e-3, 3.0)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(3e-3)]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {id(p) for p in model.parameters()}
    assert ids[1] == {id(p) for p in model.injector.parameters()}
    assert len(medflow.train.parameter_groups(model, 1e-3, 1.0)) == 1
    plain = DualGlow(DualGlowConfig(steps=[1, 1], hidden=8, prior_hidden=8))
    assert len(medflow.train.parameter_groups(plain, 1e-3, 3.0)) == 1


def test_a_run_from_before_mri_scaling_resumes_with_the_padded_grid_scaling(pairs, tmp_path):
    """A new run records the foreground-box MRI scaling; a run whose records predate the field
    resumes with the padded grid's scaling it was trained with, and records it by name."""
    run = tmp_path / "run"
    args = ["--preset", "tiny", "--steps", "2", "--checkpoint-every", "1", "--val-fraction", "0", "--device", "cpu",
            "--spacing", "6"]
    assert run_cli("train", pairs, "--out", run, *args).returncode == 0
    config = read_config(run)
    assert config["preprocessing"]["mri_scaling"] == config["settings"]["preprocessing"]["mri_scaling"] == \
        "foreground_box"
    del config["preprocessing"]["mri_scaling"], config["settings"]["preprocessing"]["mri_scaling"]
    write_config(run, config)
    resumed = run_cli("train", pairs, "--out", run, "--steps", "3", "--resume", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr
    config = read_config(run)
    assert config["preprocessing"]["mri_scaling"] == config["settings"]["preprocessing"]["mri_scaling"] == \
        "padded_grid"


def test_injector_lr_scale_is_recorded_and_old_runs_resume_with_one_group(pairs, tmp_path):
    """The preset's injector_lr_scale is recorded in the run and trains the injector at its own
    rate; a run whose settings predate it resumes with one learning rate even where its preset
    now sets one; a bad value is a one-line error before anything is written."""
    preset = tmp_path / "scaled.yaml"
    tiny = preset_path("tiny").read_text()
    args = ["--preset", preset, "--set", "injector_width=4", "--steps", "2", "--checkpoint-every", "1",
            "--val-fraction", "0", "--device", "cpu", "--spacing", "6"]
    preset.write_text(tiny + "  injector_lr_scale: 3.0\n")
    run = tmp_path / "run"
    result = run_cli("train", pairs, "--out", run, *args)
    assert result.returncode == 0, result.stderr
    assert read_config(run)["settings"]["train"]["injector_lr_scale"] == 3.0
    groups = load_state(step_checkpoints(run)[0])["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [1e-3, pytest.approx(3e-3)]

    preset.write_text(tiny)
    old = tmp_path / "old"
    assert run_cli("train", pairs, "--out", old, *args).returncode == 0
    config = read_config(old)
    del config["settings"]["train"]["injector_lr_scale"]
    write_config(old, config)
    preset.write_text(tiny + "  injector_lr_scale: 3.0\n")
    resumed = run_cli("train", pairs, "--out", old, "--steps", "3", "--resume", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr
    assert len(load_state(step_checkpoints(old)[0])["optimizer"]["param_groups"]) == 1

    preset.write_text(tiny + "  injector_lr_scale: -1\n")
    bad = run_cli("train", pairs, "--out", tmp_path / "bad", *args)
    assert bad.returncode == 5 and "Traceback" not in bad.stderr
    assert f"{preset}: injector_lr_scale must be a positive number, got -1" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--steps", "0", "--steps must be at least 1"), ("--steps", "-3", "--steps must be at least 1"),
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--checkpoint-every", "0", "--checkpoint-every must be at least 1"),
    ("--val-fraction", "1.5", "--val-fraction must be at least 0 and below 1"),
    ("--val-fraction", "-0.5", "--val-fraction must be at least 0 and below 1"),
    ("--spacing", "-8", "--spacing must be a positive number"), ("--spacing", "0", "--spacing must be a positive"),
    ("--lr", "nan", "--lr must be a positive number"), ("--time-limit", "0", "--time-limit '0'"),
    ("--seed", "-1", "--seed must be an integer from 0 to 2^63 - 1, got -1"),
    ("--set", "steps=[1,2", "'[1,2' is not a YAML value"), ("--set", "hidden=\x01", "is not a YAML value"),
    ("--val-fraction", "0.95", "--val-fraction 0.95 of 6 subjects leaves none for training"),
    ("--time-limit", "1.2.3", "--time-limit '1.2.3'"), ("--ema", "1.5", "--ema must lie between 0 and 1")])
def test_bad_option_values_are_one_line_errors_before_anything_is_written(pairs, tmp_path, flag, value, message):
    from typer.testing import CliRunner

    from medflow.cli import app

    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(pairs), "--out", str(run), "--preset", "tiny", "--device", "cpu",
                                      "--steps", "2", flag, value])
    assert result.exit_code == 3 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not run.exists()


def test_out_that_is_a_file_is_an_output_error(pairs, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("precious")
    result = run_cli("train", pairs, "--out", out, "--preset", "tiny", "--steps", "2", "--device", "cpu")
    assert result.returncode == 4 and "is a file" in result.stderr and out.read_text() == "precious"
    below = run_cli("train", pairs, "--out", out / "run", "--preset", "tiny", "--steps", "2", "--device", "cpu")
    assert below.returncode == 4 and f"{out / 'run'}: cannot create the folder ({out} is a file)" in " ".join(
        below.stderr.split())
    assert "loading" not in below.stderr and "Traceback" not in below.stderr and out.read_text() == "precious"


@pytest.mark.parametrize("damage", ["missing", "nan"])
def test_bad_pet_in_the_manifest_is_named_in_one_line(pairs, tmp_path, damage):
    """MONAI's dataset wraps a transform's error in its own; the CLI still gives the file and the problem."""
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(pairs.parent, folder)
    rows = list(csv.DictReader(open(folder / pairs.name)))
    pet = (folder / rows[2]["pet"])
    if damage == "missing":
        pet.unlink()
    else:
        import nibabel as nib

        image = nib.load(pet)
        data = np.asarray(image.dataobj, dtype=np.float32)
        data[3, 3, 3] = np.nan
        nib.save(nib.Nifti1Image(data, image.affine), pet)
    result = run_cli("train", folder / pairs.name, "--out", tmp_path / "run", *TRAIN_ARGS)
    assert result.returncode == 3, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and pet.name in lines[0] and "internal error" not in result.stderr


def test_explicit_gpus_are_checked_against_the_machine_and_the_torchrun_job(monkeypatch):
    """cuda:N must exist, and under torchrun each process takes its local rank's GPU (before,
    --device cuda:0 put every rank on GPU 0, and a missing GPU failed later as an internal error)."""
    from medflow.device import resolve_device
    from medflow.errors import ResourceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1, world_size=2) == torch.device("cuda", 1)
    for name, rank, world, problem in (("cuda:2", 0, 1, "cuda:2 is not there; this machine has 2 CUDA GPU"),
                                       ("cuda", 2, 4, "torchrun started more processes per node than that"),
                                       ("cuda:0", 1, 2, "under torchrun every process takes the GPU of its local"),
                                       ("cuda:x", 0, 1, "unknown device 'cuda:x'")):
        with pytest.raises(ResourceError, match=re.escape(problem)):
            resolve_device(name, rank, world)


def test_a_new_lr_on_a_time_limited_resume_follows_the_clock_from_its_first_update(pairs, tmp_path, monkeypatch):
    """Under --time-limit the schedule follows the training clock: the first resumed update runs
    at the new peak times the cosine at the time already trained (before, the clock was still 0
    then, so it ran at the full new peak), and so does a plain --resume after a run that recorded
    the new --lr but died before its first checkpoint."""
    half_second_batches(monkeypatch)

    def train(run, **options) -> list[float]:
        trainer = quiet_trainer(data=pairs, out=run, time_limit=4.0, checkpoint_every=4, **options)
        used = rates_used(monkeypatch, trainer)
        trainer.run(Progress(disable=True))
        return used

    full = train(tmp_path / "full", lr=1e-3, warmup=1)
    run = tmp_path / "run"
    train(run, lr=1e-3, warmup=1)
    for path in [*step_checkpoints(run)[:1], run / "final.pt"]:
        path.unlink()
    assert load_state(step_checkpoints(run)[0])["step"] == 4
    died = tmp_path / "died"
    shutil.copytree(run, died)
    resumed = train(run, resume=True, lr=1e-4)
    assert resumed[0] == pytest.approx(full[4] / 10) and resumed[0] < 0.9e-4
    config = read_config(died)  # a --resume --lr 1e-4 that recorded the rate and died before a checkpoint
    config["settings"]["train"]["lr"] = 1e-4
    write_config(died, config)
    assert train(died, resume=True) == pytest.approx(resumed)


def test_train_flags_not_given_reach_the_trainer_as_not_given(pairs, tmp_path, monkeypatch):
    """None lets a resumed run keep its own value; --no-bf16 and --no-memory-saving say False."""
    from typer.testing import CliRunner

    from medflow.cli import app

    seen = []

    class Captured:
        def __init__(self, opts, reporter):
            seen.append(opts)
            raise InputError("captured")

    monkeypatch.setattr(medflow.train, "Trainer", Captured)
    for flags, expected in (([], (None, None, None, None, None, None)),
                            (["--no-bf16", "--memory-saving", "--checkpoint-every", "100", "--preset", "small",
                              "--mri-columns", "mri"], (False, True, 100, "small", ["mri"], None))):
        result = CliRunner().invoke(app, ["train", str(pairs), "--out", str(tmp_path / "run"), *flags])
        assert result.exit_code == 3, result.output
        o = seen[-1]
        assert (o.bf16, o.recompute, o.checkpoint_every, o.preset, o.mri_columns, o.val_fraction) == expected
