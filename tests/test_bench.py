"""Smoke tests of the benchmark's building blocks (no timing assertions)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medflow import bench, measure
from medflow.demo_data import RECIPE_VERSION
from medflow.model import DualGlow
from medflow.peer_flow import PeerDualGlow, Squeeze3d, peer_level

SHAPE = (16, 16, 16)


def test_peer_level_is_invertible_with_opposite_logdet():
    torch.manual_seed(0)
    level = peer_level(2, (8, 8, 8), steps=2, hidden=8, clamp=2.0, cond_channels=3)
    x, cond = torch.randn(2, 2, 8, 8, 8), [torch.randn(2, 3, 4, 4, 4)]
    y, logdet = level(x, c=cond)
    x_back, logdet_back = level(y, c=cond, rev=True)
    assert y.shape == (2, 16, 4, 4, 4)
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logdet + logdet_back, torch.zeros(2), atol=1e-3, rtol=0)


def test_peer_squeeze_rejects_odd_sizes():
    assert Squeeze3d([(1, 4, 6, 4)]).output_dims([(1, 4, 6, 4)]) == [(8, 2, 3, 2)]
    with pytest.raises(ValueError):
        peer_level(1, (4, 5, 4), steps=1, hidden=8, clamp=2.0, cond_channels=0)


def test_peer_has_medflow_latents_and_a_finite_loss():
    torch.manual_seed(0)
    peer, ours = PeerDualGlow.from_preset("tiny", SHAPE), DualGlow.from_preset("tiny")
    mri, pet = measure.example_pair(SHAPE, torch.device("cpu"))
    _, enc_peer = peer.mri_flow.log_prob(mri)
    _, enc_ours = ours.encode_mri(mri)
    assert [z.shape for z in enc_peer.zs] == [z.shape for z in enc_ours.zs]
    loss, terms = peer.loss(pet, mri)
    loss.backward()
    assert torch.isfinite(loss) and terms["pet_bpv"].shape == (1,)


def test_peer_shares_the_injector_and_has_medflow_parameters_but_the_channel_mix():
    """small's peer: same uptake map and injector, subnets and priors; only the flow blocks (per-step channel mix
    and affine) differ, so the parameter counts differ by less than the LU matrices."""
    ours = DualGlow.from_preset("small")
    peer = PeerDualGlow.from_preset("small", (16, 16, 16))
    assert sum(p.numel() for p in peer.injector.parameters()) == sum(p.numel() for p in ours.injector.parameters())
    assert peer.uptake_map.maps.shape == ours.side_scale.maps.shape == (1, 1, 8, 8, 8)
    mix = sum(p.numel() for n, p in ours.named_parameters() if ".invconv." in n)
    assert 0 < measure.trainable_parameters(ours) - measure.trainable_parameters(peer) <= mix
    with pytest.raises(ValueError, match="condition encoder"):
        PeerDualGlow.from_preset("tiny", SHAPE, condition_width=4)


def test_the_peer_runs_in_pytorchs_default_layout_or_channels_last_and_medflow_channels_last_on_a_cpu():
    """A FrEIA user's model has contiguous weights; with channels-last ones PyTorch copies the
    peer's top-level convolution weights at every call, but its large convolutions may be faster:
    the bench times both."""
    cpu = torch.device("cpu")
    peer = measure.build_model(measure.Case("train", "tiny", SHAPE, impl="peer"), cpu)
    ours = measure.build_model(measure.Case("train", "tiny", SHAPE), cpu)
    assert all(m.weight.is_contiguous() for m in peer.modules() if isinstance(m, torch.nn.Conv3d))
    peer = measure.build_model(measure.Case("train", "tiny", SHAPE, impl="peer", channels_last=True), cpu)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in peer.modules()
               if isinstance(m, torch.nn.Conv3d) and m.weight.shape[2:] != (1, 1, 1))
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in ours.modules()
               if isinstance(m, torch.nn.Conv3d) and m.weight.shape[2:] != (1, 1, 1))


def test_worker_process_prints_a_measurement():
    result = bench.run_case(measure.Case("train", "tiny", SHAPE, timed=1), timeout_s=120)
    assert "error" not in result, result
    assert result["params"] == DualGlow.from_preset("tiny").num_parameters()


def test_worker_failure_is_reported_not_raised():
    result = bench.run_case(measure.Case("train", "no-such-preset", SHAPE), timeout_s=120)
    assert "error" in result


def test_speed_markdown_lists_runs_ratios_and_failures():
    configs = bench.speed_configs(quick=True, device="cpu")
    ok = {"params": 1000, "median_s": 2.0, "median_cpu_s": 3.0, "threads": 2, "baseline_mib": 100.0,
          "above_baseline_mib": 50.0}
    slower_peer = {**ok, "median_s": 4.0, "above_baseline_mib": 20.0}
    results = [[ok, {**ok, "median_s": 3.0, "above_baseline_mib": 25.0}, slower_peer, ok],
               [ok, {"error": "timed out"}, ok, {"error": "out of cpu memory"}]]
    text = bench.speed_markdown(configs, results, "cpu", load="0.5")
    assert "| 1.50 | 0.50 | channels-last weights | 1.00 | 1.00 | 0.50 |" in text and "| 75 % |" in text
    assert "| n/a | n/a | PyTorch's default layout | 1.00 | 1.00 | n/a |" in text
    assert "failed: timed out" in text and "failed: out of cpu memory" in text and "--quick" in text
    assert [c.channels_last for c in bench.speed_cases(configs[0], "cpu")] == [False, False, False, True]
    assert [c.impl for c in bench.speed_cases(configs[0], "cuda")] == ["medflow", "medflow", "peer"]


def test_rounds_alternate_order_and_merge_per_case(monkeypatch):
    seen = []

    def fake_run_cases(cases, timeout_s):
        seen.append([c.preset for c in cases])
        return [{"params": 1, "times_s": [len(seen) + i], "median_cpu_s": 1.0, "baseline_mib": 10.0,
                 "peak_mib": 20.0 * len(seen), "above_baseline_mib": 10.0 * len(seen)} for i, _ in enumerate(cases)]

    monkeypatch.setattr(bench, "run_cases", fake_run_cases)
    cases = [measure.Case("train", name, SHAPE) for name in ("a", "b", "c")]
    merged = bench.run_rounds(cases, 2, timeout_s=1)
    assert seen == [["a", "b", "c"], ["c", "b", "a"]]
    assert [m["times_s"] for m in merged] == [[1, 4], [2, 3], [3, 2]]
    assert merged[0]["median_s"] == 2.5 and merged[0]["above_baseline_mib"] == 15.0
    assert bench.merge_rounds([merged[0], {"error": "out of memory"}]) == {"error": "out of memory"}


def test_quality_markdown_and_level_matching():
    metrics = {"psnr": 20.0, "ssim": 0.8, "nmse": 0.05, "mae": 0.1}
    result = {"scores": {"U-Net": [metrics, metrics]},
              "level_matched": {"U-Net": [{**metrics, "psnr": 21.0}, {**metrics, "psnr": 23.0}]},
              "level_redrawn": {"U-Net": [{"psnr": 19.0}, {"psnr": 19.5}]}, "n_levels": 24,
              "coverage": {(bench.CALIBRATION_TRUTHS[0], 0.5, 1.645): [0.8, 0.9]},
              "samples": 8, "calibration": {"temperature": 1.25, "subjects": 2, "z": 1.645, "samples": 16,
                                            "target": 0.86, "coverage": 0.855},
              "budget_s": 60.0,
              "flow_steps": 10, "served_step": 10, "unet_steps": 20, "n_train": 22, "n_val": 2, "n_test": 2, "grid": [48, 56, 48],
              "spacing": [4.0, 4.0, 4.0], "batch_size": 2, "device": "cpu", "seconds": 120.0, "seed": 0}
    text = bench.quality_markdown(result)
    assert "seed 0)" in text and "here those of step 10." in text
    assert "| U-Net | 20.00 ± 0.00 | 0.800 ± 0.000 |" in text and "| U-Net | 22.00 ± 1.41 | 0.800 ± 0.000 |" in text
    assert "| U-Net | 19.25 ± 0.35 | 20.00 ± 0.00 |" in text and "over the 24 training and validation" in text
    assert f"| {bench.CALIBRATION_TRUTHS[0]} | 0.5 | mean ± 1.645 std | 82.5 | 85.0 ± 7.1 |" in text
    assert "The calibrated temperature T = 1.25" in text and "reached 85.5 %" in text
    assert "voxels of the PET's global-mean region" in text
    assert "no validation subjects" in bench.calibration_text(None)
    truth = np.zeros((8, 8, 8))
    truth[2:6, 2:6, 2:6] = 3.0
    truth[3, 3, 3] = 6.0
    brain = truth > 0
    assert np.allclose(bench.level_matched(truth, 0.5 * truth, brain), 0.5 * truth)
    haze = 0.5 * truth + 0.2 * ~brain  # a regression net's faint background outside the head
    assert np.allclose(bench.level_matched(truth, haze, brain), 0.5 * truth)


def test_level_redrawn_psnr_is_the_mean_psnr_over_the_truth_at_each_level():
    """Oracle: ``compute_metrics`` against the truth rescaled to each level by hand."""
    from medflow.metrics import compute_metrics
    from medflow.preprocess import global_mean

    rng = np.random.default_rng(0)
    truth = np.zeros((16, 16, 16))
    truth[3:13, 3:13, 3:13] = 1.0 + rng.random((10, 10, 10))
    brain = np.zeros(truth.shape, dtype=bool)
    brain[5:11, 5:11, 5:11] = True  # inside the global region, so its mean is not the global mean
    pred = 1.1 * truth + 0.1 * rng.standard_normal(truth.shape)
    own = global_mean(torch.from_numpy(truth))
    assert abs(truth[brain].mean() - own) > 0.01
    levels = [0.8, 1.0, 1.3]
    expected = np.mean([compute_metrics(pred, truth * (level / own), brain)["psnr"] for level in levels])
    assert bench.level_redrawn_psnr(pred, truth, brain, levels) == pytest.approx(expected, abs=1e-9)
    assert bench.level_redrawn_psnr(pred, truth, brain, [own]) == pytest.approx(
        compute_metrics(pred, truth, brain)["psnr"], abs=1e-9)
    for bad in ([], [1.0, 0.0]):
        with pytest.raises(ValueError, match="levels must be positive"):
            bench.level_redrawn_psnr(pred, truth, brain, bad)


def test_seed_rows_compare_medflow_with_the_unet_per_seed_and_over_seeds():
    def result(seed, unet_psnr, flow_psnr):
        def scores(shift):
            return {bench.UNET: [{"psnr": unet_psnr + shift, "ssim": 0.8}] * 2,
                    bench.UNET_SAME_STEPS: [{"psnr": unet_psnr - 1.0 + shift, "ssim": 0.7}] * 2,
                    "medflow, mean of 16 samples": [{"psnr": flow_psnr + 2 * shift, "ssim": 0.9}] * 2,
                    "medflow, T=0 (prior mean)": [{"psnr": 0.0, "ssim": 0.0}] * 2}

        truth, matched = bench.CALIBRATION_TRUTHS
        coverage = {(truth, 1.2, 1.645): [0.8, 0.9 + seed / 10], (matched, 1.2, 1.645): [0.9, 0.9],
                    (truth, 1.2, 1.86): [1.0, 1.0], (truth, 0.5, 1.645): [0.0, 0.0]}
        return {"seed": seed, "flow_steps": 10, "unet_steps": 8, "calibration": {"temperature": 1.2}, "samples": 16,
                "temperature": 1.2, "scores": scores(0.0), "level_matched": scores(1.0), "level_redrawn": scores(-1.0),
                "coverage": coverage}

    rows = bench.seed_rows([result(0, 20.0, 20.5), result(1, 21.0, 20.5)])
    assert rows[0] == ["0", "10 / 8", "1.20", "20.00", "20.50", "+0.50", "0.800", "0.900", "+0.100",
                       "21.00", "22.50", "+1.50", "19.00", "18.50", "-0.50"]
    assert rows[1][3:6] == ["21.00", "20.50", "-0.50"]
    assert rows[2][5] == "+0.00 ± 0.71" and rows[2][8] == "+0.100 ± 0.000" and rows[2][11] == "+1.00 ± 0.71"
    assert rows[2][14] == "-1.00 ± 0.71"
    assert len(rows[2]) == len(bench.SEED_HEADERS)
    same_steps = bench.seed_rows([result(0, 20.0, 20.5), result(1, 21.0, 20.5)], bench.UNET_SAME_STEPS)
    assert same_steps[0][:9] == ["0", "10 / 10", "1.20", "19.00", "20.50", "+1.50", "0.700", "0.900", "+0.200"]
    text = bench.seeds_markdown([result(0, 20.0, 20.5), result(1, 21.0, 20.5)])
    assert "seeds 0 to 1" in text and "| 0 | 10 / 8 |" in text and "| 0 | 10 / 10 |" in text
    coverage = bench.seed_coverage_rows([result(0, 20.0, 20.5), result(1, 21.0, 20.5)])
    assert coverage == [["0", "1.20", "85.0", "90.0"], ["1", "1.20", "90.0", "90.0"],
                        ["all", "", "87.5 ± 3.5", "90.0 ± 0.0"]]
    assert "| 1 | 1.20 | 90.0 | 90.0 |" in text


def test_quality_run_end_to_end_on_a_tiny_cohort():
    """Both models train on the flow's own batches; every method is scored on the held-out subject;
    a second seed trains both again on the same data."""
    results = bench.run_quality(3, torch.device("cpu"), seeds=2, subjects=7, heldout=1)
    assert [r["seed"] for r in results] == [0, 1]
    assert "| all |" in bench.seeds_markdown(results)
    result = results[0]
    assert f"(recipe version {RECIPE_VERSION}, 7 subjects at 2 mm, 1 held out)" in bench.quality_markdown(result)
    assert result["flow_steps"] == 3 and result["n_test"] == 1
    assert result["unet_steps"] >= bench.UNET_WARMUP_STEPS + bench.UNET_TIMED_STEPS
    assert result["n_val"] == 1 and 0.05 <= result["calibration"]["temperature"] <= 4.0
    assert len(result["scores"]) == 6 and sum("(calibrated)" in name for name in result["scores"]) == 2
    for key in ("scores", "level_matched"):
        assert len(result[key]) == 6
        assert all(np.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1 for rows in result[key].values() for r in rows)
    assert result["n_levels"] == 6 and result["level_redrawn"].keys() == result["scores"].keys()
    assert all(np.isfinite(r["psnr"]) for rows in result["level_redrawn"].values() for r in rows)
    text = bench.quality_markdown(result)
    assert text.count("| U-Net (MONAI BasicUNet, L1) |") == 3 and text.count("| U-Net, medflow's number of steps |") == 3
    assert result["scores"][bench.UNET_SAME_STEPS] != result["scores"][bench.UNET]
    assert len(result["coverage"]) == 2 * 2 * len(bench.CALIBRATION_TRUTHS)
    assert all(0 <= c <= 1 for values in result["coverage"].values() for c in values)


def test_quality_section_trains_on_the_same_subjects_and_tests_on_the_rest(monkeypatch):
    """``quality_section`` asks for QUALITY_TRAIN_SUBJECTS + N demo subjects with the last N held out."""
    calls = []

    def record(*args):
        calls.append(args)
        raise RuntimeError("recorded")

    monkeypatch.setattr(bench, "run_quality", record)
    for test_subjects in (bench.QUALITY_TEST_SUBJECTS, 5):
        with pytest.raises(RuntimeError, match="recorded"):
            bench.quality_section(7, "cpu", 2, test_subjects)
    assert [call[2:] for call in calls] == [(2, bench.QUALITY_TRAIN_SUBJECTS + bench.QUALITY_TEST_SUBJECTS,
                                             bench.QUALITY_TEST_SUBJECTS), (2, bench.QUALITY_TRAIN_SUBJECTS + 5, 5)]
    assert bench.QUALITY_TRAIN_SUBJECTS == 24


def test_arguments_and_budget(monkeypatch):
    args = bench.parse_args(["--quick"])
    assert args.sections == ["speed", "synthesis"]
    assert bench.parse_args(["--sections", "tuning"]).sections == ["tuning"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda"])  # this machine has no GPU (the tests never need one)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench.parse_args(["--device", "cuda"]).sections == ["speed", "synthesis", "tuning", "batch"]
    monkeypatch.undo()
    assert bench.parse_args(["--sections", "batch,speed"]).sections == ["batch", "speed"]
    assert bench.parse_args(["--device", "cpu"]).sections == ["speed", "synthesis", "quality"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "speed,nonsense"])
    assert bench.parse_args([]).quality_steps == bench.QUALITY_STEPS
    assert bench.parse_args(["--quality-seeds", "3", "--quality-steps", "420"]).quality_seeds == 3
    assert bench.parse_args([]).quality_test_subjects == bench.QUALITY_TEST_SUBJECTS
    assert bench.parse_args(["--quality-test-subjects", "8"]).quality_test_subjects == 8
    for wrong in (["--quality-steps", "0"], ["--quality-seeds", "0"], ["--quality-seeds", "3", "--sections", "speed"],
                  ["--quality-test-subjects", "0"], ["--quick", "--sections", "quality"], ["--sections", ","]):
        with pytest.raises(SystemExit):
            bench.parse_args(wrong)


@pytest.mark.parametrize("out, problem", [("missing/B.md", "no folder"), (".", "is a folder"),
                                          ("notes.md", "is not a medflow bench report")])
def test_a_report_path_that_cannot_take_the_report_is_refused_before_anything_runs(tmp_path, capsys, out, problem):
    """Before, a missing folder failed after the first section had run, and a file of one's own
    was replaced by the report."""
    (tmp_path / "notes.md").write_text("# my notes\n")
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "speed", "--out", str(tmp_path / out)])
    assert problem in capsys.readouterr().err
    assert (tmp_path / "notes.md").read_text() == "# my notes\n"


@pytest.mark.parametrize("device, argv, part", [
    ("cpu", [], "cpu"), ("cpu", ["--sections", "quality,speed,synthesis"], "cpu"),
    ("cpu", ["--quick"], "cpu_quick"), ("cpu", ["--sections", "speed"], "cpu_speed"),
    ("cpu", ["--quick", "--sections", "tuning,batch"], "cpu_quick_tuning_batch"),
    ("cpu", ["--sections", "quality", "--quality-seeds", "3"], "cpu_seeds"),
    ("cuda", [], "cuda"), ("cuda", ["--sections", "speed,tuning,synthesis,batch"], "cuda"),
    ("cuda", ["--sections", "batch"], "cuda_batch"),
    ("cpu", ["--quality-test-subjects", "8"], "cpu_test8"),
    ("cpu", ["--sections", "quality", "--quality-seeds", "3", "--quality-steps", "420"], "cpu_seeds_steps420"),
    ("cpu", ["--sections", "speed", "--quality-steps", "420"], "cpu_speed"),
])
def test_only_a_standard_run_writes_the_device_part(monkeypatch, device, argv, part):
    """``make bench BENCH_ARGS=--quick`` or a run of one section lands beside the standard run's
    numbers, not over them (before, it replaced the whole cpu part, quality section included)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    args = bench.parse_args(["--device", device, *argv])
    assert bench.report_part(args) == part


class _TickingClock:
    """Stands in for the ``time`` module: every ``monotonic()`` call is one second later."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        self.now += 1.0
        return self.now


class _FakeTrainer:
    """What ``train_unet`` uses of a Trainer: seeded options, the MRI columns, a device, batches."""

    opts = SimpleNamespace(seed=0)
    settings = {"mri_columns": ["mri"]}
    device = torch.device("cpu")

    def train_batch(self, step):
        g = torch.Generator().manual_seed(step)
        return torch.rand(1, 1, 32, 32, 16, generator=g), torch.rand(1, 1, 32, 32, 16, generator=g), None


def test_unet_turns_the_time_into_steps_after_timing_its_own(monkeypatch):
    """The clock is read at the start, after the warm-up steps and after the timed ones (one second
    apart here): 1 s per 40 steps, 2 s gone, so a 3 s budget leaves 40 more steps; then the clock
    is not read again and the learning rate has decayed by cosine to 10 % at the last step."""
    monkeypatch.setattr(bench, "time", _TickingClock())
    rates = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: rates.append(self.param_groups[0]["lr"]))
    with bench.training_progress() as progress:
        net, steps = bench.train_unet(_FakeTrainer(), progress, budget_s=3.0)
    timed = bench.UNET_WARMUP_STEPS + bench.UNET_TIMED_STEPS
    assert steps == timed + 40 and bench.time.now == 3.0
    assert rates[:timed + 1] == [1e-3] * (timed + 1)
    assert rates[-1] == pytest.approx(1e-4) and rates == sorted(rates, reverse=True)


def test_a_budget_shorter_than_the_unet_timing_gives_just_the_timed_steps(monkeypatch):
    """2 s gone when timing ends, 1 s budget: no step after the timed ones (before, one more ran)."""
    monkeypatch.setattr(bench, "time", _TickingClock())
    with bench.training_progress() as progress:
        net, steps = bench.train_unet(_FakeTrainer(), progress, budget_s=1.0)
    assert steps == bench.UNET_WARMUP_STEPS + bench.UNET_TIMED_STEPS


def test_unet_trains_for_a_number_of_steps_with_the_same_schedule(monkeypatch):
    rates = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: rates.append(self.param_groups[0]["lr"]))
    with bench.training_progress() as progress:
        net, steps = bench.train_unet(_FakeTrainer(), progress, steps=7)
        assert steps == 7 and rates[0] == 1e-3 and rates[-1] == pytest.approx(1e-4)
        assert rates == sorted(rates, reverse=True) and len(set(rates)) == 7
        for wrong in ({}, {"budget_s": 3.0, "steps": 7}):
            with pytest.raises(ValueError, match="exactly one"):
                bench.train_unet(_FakeTrainer(), progress, **wrong)


def test_tuning_and_batch_tables_give_ratios_to_fp32_eager_and_show_failures():
    cases = bench.tuning_cases(quick=True, device="cpu")
    assert [c.variant for c in cases[:2]] == ["plain, fp32", "plain, bf16 subnets"]
    compiled = [c for c in cases if c.compiled]
    assert all(not c.bf16 and c.warmup == 2 for c in compiled) and len(compiled) == 2 and cases[-2:] == compiled
    step = {"median_s": 2.0, "init_s": 1.0, "first_s": 3.0, "above_baseline_mib": 100.0}
    step_results = [step, {**step, "median_s": 1.0}, {"error": "timed out"}, step, step, step]
    text = bench.tuning_markdown(list(zip(cases, step_results)), "cpu", load="0.1")
    assert "| small | 32x32x32 | plain, bf16 subnets | 1.000 | 4.0 | 100 | 0.50 |" in text
    assert "| small | 32x32x32 | plain, fp32, torch.compile | 2.000 | 4.0 | 100 | 1.00 |" in text
    assert "failed: timed out" in text

    references, searches = bench.batch_cases(quick=True, device="cpu")
    assert [c.variant for c in references] == ["plain, fp32"] * 2 and all(c.batch == 1 for c in references)
    assert [c.variant for c in searches[:2]] == ["plain, fp32", "plain, bf16 subnets"]
    assert all(c.task == "max_batch" for c in searches)
    found = [{"max_batch": 4, "limit": "batch 5: out of memory"}, {"error": "batch 1: out of memory"},
             {"max_batch": 2, "limit": "the search's cap 2"}, {"max_batch": 2, "limit": "cap"}]
    timed = bench.at_largest_batch(searches, found)
    assert [c.batch for c in timed] == [4, 2, 2] and all(c.task == "train" for c in timed)
    at_largest = [{**step, "median_s": 4.0}, {"error": "out of cpu memory"}, step]
    results = bench.BatchResults(list(zip(references, [step, step])), list(zip(searches, found)), at_largest)
    text = bench.batch_markdown(results, "cpu", load="0.1")
    assert "| small | 32x32x32 | plain, fp32 | 4 | 4.000 | 1.000 | 0.50 | 100 | batch 5: out of memory |" in text
    assert "failed: batch 1: out of memory" in text and "failed: out of cpu memory (fresh process)" in text


def test_report_keeps_one_part_per_device(tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    bench.write_report(report, "cuda", "# on the GPU\nfirst run\n")
    bench.write_report(report, "cpu", "# on the CPU\n")
    bench.write_report(report, "cuda", "# on the GPU\nsecond run\n")
    text = report.read_text()
    assert text.index("# on the CPU") < text.index("# on the GPU")
    assert "second run" in text and "first run" not in text and text.count("<!-- medflow bench:") == 2
    bench.write_report(report, "cpu_seeds", "# quality over seeds\n")
    bench.write_report(report, "cpu", "# on the CPU, again\n")
    text = report.read_text()
    assert text.index("# on the CPU, again") < text.index("# quality over seeds") < text.index("second run")
    assert text.count("<!-- medflow bench:") == 3


def test_report_keeps_the_text_before_its_first_part(tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\nRead this first.\n\n<!-- medflow bench: cpu -->\n# old\n")
    bench.write_report(report, "cpu", "# new\n")
    assert report.read_text() == "# Benchmarks\n\nRead this first.\n\n<!-- medflow bench: cpu -->\n# new\n"


def test_a_run_over_seeds_writes_its_own_part(tmp_path, monkeypatch):
    """``--quality-seeds`` above 1 lands in a cpu_seeds part (here with its steps and test subjects)
    and leaves the standard run's cpu part."""
    report = tmp_path / "BENCHMARKS.md"
    bench.write_report(report, "cpu", "# medflow benchmarks on CPU\nstandard run\n")
    monkeypatch.setattr(bench, "quality_section",
                        lambda steps, device, seeds, test_subjects: f"quality x{seeds} on {test_subjects}\n")
    bench.main(["--device", "cpu", "--sections", "quality", "--quality-seeds", "2", "--quality-steps", "1",
                "--quality-test-subjects", "5", "--out", str(report)])
    text = report.read_text()
    assert "standard run" in text and "quality x2 on 5" in text
    assert "<!-- medflow bench: cpu_seeds_steps1_test5 -->\n# medflow benchmarks on CPU: quality over 2 seeds" in text
    assert "re-run that command to refresh" in text


def test_medflow_variants_do_not_repeat_the_default_temperature():
    """A model without calibration samples at 0.5 by default: one row at 0.5, not two rows (and
    two coverage lists) under one temperature."""
    from medflow.trained import TrainedModel

    uncalibrated = bench.medflow_variants(TrainedModel(None, None, ["mri"], None, None))
    assert list(uncalibrated.values()) == [(0.5, 16), (0.0, 1), (0.5, 1)]
    calibrated = bench.medflow_variants(TrainedModel(None, None, ["mri"], None, None, calibration={"temperature": 1.4}))
    assert list(calibrated.values()) == [(1.4, 16), (0.5, 16), (0.0, 1), (1.4, 1)]
