"""The conditioning study runs end to end and reports every variant and the dx contrast; its
T1-twice control starts where the two-contrast variants start; its information estimate is exact
for white Gaussian signal and noise."""

import csv
import math
import re

import numpy as np
import torch

from medflow.conditioning_study import (ASL_VARIANT, CONTROL_VARIANT, FLAIR_VARIANT, VARIANTS, gaussian_channel_bits,
                                       main, metabolic_variation_bits)
from medflow.demo_data import make_demo_dataset
from medflow.train import Trainer, TrainOptions
from tests.paired_data import write_paired_csv


def test_study_writes_every_variant_and_the_dx_contrast(tmp_path):
    out = tmp_path / "CONDITIONING.md"
    main(["--preset", "tiny", "--steps", "2", "--seeds", "0", "--subjects", "10", "--heldout", "2",
          "--data-spacing", "4", "--metabolic-variation", "2", "--device", "cpu", "--out", str(out)])
    text = out.read_text()
    prose = " ".join(text.split())
    assert "metabolic variation 8-16 % (2 times the recipe's)" in prose
    for variant in VARIANTS:
        row = next(line for line in text.splitlines() if line.startswith(f"| {variant} |"))
        assert math.isfinite(float(row.split("|")[3]))
        against_control = row.split("|")[5].strip()
        assert math.isfinite(float(against_control)) if variant in (FLAIR_VARIANT, ASL_VARIANT) else not against_control
    estimate = re.search(r"worth about (\S+) bits per held-out subject, (\S+) bit/voxel", prose)
    bits, per_voxel = map(float, estimate.groups())
    assert bits > 0.0 and per_voxel > 0.0
    for changed in ("every covariate at its default |", "each FLAIR without its lesions |",
                    "each ASL without the metabolic information |"):
        paired = next(line for line in text.splitlines() if changed in line)
        assert math.isfinite(float(paired.split("|")[3])) and math.isfinite(float(paired.split("|")[4]))
    fraction = float(re.search(r"by 3 % or more in (\S+) % of the held-out", prose).group(1))
    assert 0.0 < fraction < 100.0
    contrast = [line for line in text.splitlines() if re.match(r"\| sub-\d{3} \|", line)]
    assert len(contrast) == 2 and all(math.isfinite(float(c.split("|")[3])) for c in contrast)
    assert "failed" not in text
    core, rest, regional = map(float, re.search(
        r"Mean over subjects: (\S+) % in the core against (\S+) % .* regional effect of (\S+) points", text, re.S).groups())
    assert abs(regional - (core - rest)) <= 0.11  # each printed to 0.1


def test_control_starts_with_the_two_contrast_variants_weights(tmp_path):
    data = write_paired_csv(tmp_path / "data", n=3)
    with open(data, newline="") as f:
        rows = [{**r, "t2": r["mri"]} for r in csv.DictReader(f)]
    with open(data, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    weights = []
    for variant in (CONTROL_VARIANT, FLAIR_VARIANT):
        opts = TrainOptions(data=data, out=tmp_path / variant, preset="tiny", mri_columns=VARIANTS[variant][0],
                            steps=1, seed=3, device="cpu")
        weights.append(Trainer(opts, reporter=lambda *_: None).model.state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_gaussian_channel_bits_of_white_noise():
    rng = np.random.default_rng(0)
    shape, ratio = (24, 20, 16), 3.0
    signals = [np.sqrt(ratio) * rng.standard_normal(shape) for _ in range(6)]
    noises = [rng.standard_normal(shape) for _ in range(6)]
    everywhere = [np.ones(shape, bool)] * 6
    exact = 0.5 * np.log2(1.0 + ratio) * np.prod(shape)
    assert abs(gaussian_channel_bits(signals, noises, everywhere) / exact - 1.0) < 0.03
    assert gaussian_channel_bits([0.0 * s for s in signals], noises, everywhere) == 0.0
    # Quieter noise where the signal is: the estimate takes the noise level there.
    half = np.zeros(shape, bool)
    half[:12] = True
    quiet_inside = [np.where(half, 0.5, 1.0) * n for n in noises]
    assert gaussian_channel_bits(signals, quiet_inside, [half] * 6) > gaussian_channel_bits(signals, noises, everywhere)


def test_a_stronger_metabolic_variation_is_worth_more_bits(tmp_path):
    bits = [metabolic_variation_bits(make_demo_dataset(tmp_path / str(k), 2, seed=1, spacing=8.0, heldout=1,
                                                       metabolic_variation=k)) for k in (0.0, 1.0, 3.0)]
    assert bits[0] == 0.0 and bits[2] > 2 * bits[1] > 0.0
