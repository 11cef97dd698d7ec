"""Side information: encoding, gradient reversal, training and synthesis with covariates."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medflow import DualGlow
from medflow.model import DualGlowConfig
from medflow.presets import load_preset
from medflow.adversary import BOUND, SideDiscriminator, grad_reverse
from medflow.cli import app
from medflow.errors import InputError, ModelError
from medflow.flows import CovariateScale
from medflow.preprocess import Preprocessing, pet_to_units
from medflow.side import SideSpec, parse_side
from tests.paired_data import write_paired_csv

ROWS = [{"age": "60", "sex": "F", "dx": "CN"}, {"age": "80", "sex": "M", "dx": "AD"}, {"age": "70", "sex": "F", "dx": "AD"}]


def test_spec_standardises_numbers_one_hots_categories_and_fills_defaults():
    spec = SideSpec.fit(["age", "sex", "dx"], ROWS, "train.csv")
    assert spec.width == 1 + 2 + 2
    assert spec.defaults == {"age": "70", "sex": "F", "dx": "AD"}
    vec = spec.encode({"age": "80", "sex": "M", "dx": "CN"}, "x")
    assert torch.allclose(vec, torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]))
    assert torch.allclose(spec.encode({}, "x"), torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0]))
    assert spec.categorical_channels() == [2, 4]  # reference coding: no map for the defaults F and AD
    assert SideSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(InputError, match="not one of"):
        spec.encode({"dx": "FTD"}, "x")
    with pytest.raises(InputError, match="unknown side information height"):
        spec.encode({"height": "180"}, "x")
    with pytest.raises(InputError, match="not a number"):
        spec.encode({"age": "old"}, "x")
    assert parse_side("age=74, sex=F,dx=AD") == {"age": "74", "sex": "F", "dx": "AD"}
    with pytest.raises(InputError):
        parse_side("age74")


def test_missing_value_markers_take_the_default_and_infinities_are_refused():
    """NA, N/A, NaN, null and blanks are missing values (left out of the fit, the default at
    encoding), so they neither make a numeric column categorical nor reach the model as NaN."""
    rows = ROWS + [{"age": "NA", "sex": "", "dx": "nan"}, {"age": " n/a ", "sex": "null", "dx": "CN"}]
    spec = SideSpec.fit(["age", "sex", "dx"], rows, "train.csv")
    assert spec.numeric["age"][0] == pytest.approx(70.0) and spec.categorical == {"sex": ["F", "M"], "dx": ["AD", "CN"]}
    for marker in ("NaN", "nan", "NA", "#N/A", "<NA>", " "):
        assert torch.equal(spec.encode({"age": marker, "sex": marker, "dx": marker}, "x"), spec.encode({}, "x"))
    for bad in ("inf", "-Infinity"):
        with pytest.raises(InputError, match=f"age={bad!r} is not a finite number"):
            spec.encode({"age": bad}, "x")
        with pytest.raises(InputError, match="not a finite number"):
            SideSpec.fit(["age"], ROWS + [{"age": bad}], "train.csv")


def test_a_side_column_given_twice_is_refused_and_vectors_have_the_specs_width():
    """--side-columns age,sex,age made vectors one longer than the model's side channels (an
    internal error once training started)."""
    with pytest.raises(InputError, match="train.csv: side-information column\\(s\\) age given twice"):
        SideSpec.fit(["age", "sex", "age"], ROWS, "train.csv")
    spec = SideSpec.fit(["age", "sex", "dx"], ROWS, "train.csv")
    assert len(spec.encode({}, "x")) == spec.width == 1 + 2 + 2


def test_gradient_reversal_flips_the_sign():
    x = torch.randn(3, requires_grad=True)
    grad_reverse(x, 2.0).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -2.0))


def test_inflating_a_latent_cannot_defeat_the_discriminator():
    """The flow must not win the adversarial game by scaling its latents (that diverged training)."""
    torch.manual_seed(0)
    disc = SideDiscriminator(4, 3)
    for p in disc.parameters():
        torch.nn.init.normal_(p, std=3.0)
    z = torch.randn(2, 4, 4, 4, 4)
    assert torch.allclose(disc(z), disc(1e4 * z), atol=1e-5)
    assert disc(torch.randn(2, 4, 4, 4, 4) * 1e6).abs().max() <= BOUND


def test_side_enters_the_top_prior_and_the_discriminators_train():
    torch.manual_seed(0)
    model = DualGlow.from_preset("tiny", side_channels=3)
    mri, pet, side = torch.randn(2, 1, 8, 8, 8), torch.randn(2, 1, 8, 8, 8), torch.randn(2, 3)
    loss, terms = model.loss(pet, mri, side)
    assert terms["side_adversary"] > 0
    loss.backward()
    assert all(p.grad is not None for p in model.discriminators.parameters())
    with pytest.raises(ValueError, match="side vector"):
        model.loss(pet, mri)


def test_side_stays_out_of_the_injector():
    """Side information in the full-resolution injector let 22 training subjects' covariates
    encode their (random) PET level: held-out bits per voxel +0.21 (CONDITIONING.md)."""
    model = DualGlow.from_preset("tiny", side_channels=3, injector_width=8)
    mri = torch.randn(2, 1, 8, 8, 8)
    _, enc = model.encode_mri(mri)
    assert model._pet_conditions(mri, enc, torch.zeros(2, 3))[2].shape == (2, 1, 8, 8, 8)


def test_covariate_maps_scale_the_pet_before_the_injector_and_are_undone_last_in_sampling():
    torch.manual_seed(0)
    model = DualGlow.from_preset("tiny", side_channels=3, side_map_cells=4, injector_width=8)
    mri, pet, side = torch.randn(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8), torch.randn(2, 3)
    model.loss(pet, mri, side)
    model.eval()
    with torch.no_grad():
        model.side_scale.maps.normal_(0.0, 0.3)
    _, enc = model.encode_mri(mri)
    coupling, prior, cond = model._pet_conditions(mri, enc, side)
    scaled, scale_logdet = model.side_scale(pet, side)
    assert not torch.allclose(scaled, pet)
    flow_in, injector_logdet = model.injector(scaled, cond)
    lp, _ = model.pet_flow.log_prob(flow_in, coupling, prior)
    torch.testing.assert_close(model.log_prob(pet, mri, side)["pet"], lp + scale_logdet + injector_logdet)
    mode = model.pet_flow.sample(2, (8, 8, 8), 0.0, coupling, prior)
    expected = model.side_scale.inverse(model.injector.inverse(mode, cond), side)
    torch.testing.assert_close(model.sample(mri, 0.0, side=side)[0], expected)


def test_side_model_from_before_effect_maps_loads_and_runs_without_them():
    """Side-information models trained before ``side_map_cells`` existed have no such key."""
    values = dict(load_preset("tiny")["model"], side_channels=3)
    for key in ("side_map_cells", "uptake_map", "side_map_origin"):
        del values[key]
    model = DualGlow(DualGlowConfig.from_dict(values))
    assert model.side_scale is None and "side_scale.maps" not in model.state_dict()
    model.loss(torch.rand(2, 1, 8, 8, 8), torch.randn(2, 1, 8, 8, 8), torch.randn(2, 3))


def test_effect_maps_about_zero_uptake_remove_a_fraction_of_uptake():
    """Presets scale about model-space -0.5, zero uptake: e = -log(1 - f) takes a fraction f
    of the uptake away in the PET's own units, whatever the voxel's level."""
    prep = Preprocessing((4.0, 4.0, 4.0), (8, 8, 8), pet_scale=2.5, pet_normalization="global_mean", pet_level=1.7)
    for preset in ("tiny", "small", "dualglow3d"):
        assert pet_to_units(torch.tensor(load_preset(preset)["model"]["side_map_origin"]), prep) == 0.0, preset
    assert DualGlow.from_preset("small", side_channels=2).side_scale.origin == -0.5
    scale = CovariateScale(1, 1, 2, clamp=2.0, origin=-0.5)
    unclamped = 2.0 * np.tan(-np.log(1.0 - 0.25) * np.pi / (2.0 * 2.0))  # soft_clamp's inverse
    with torch.no_grad():
        scale.maps.fill_(unclamped / scale.GAIN)
    pet = torch.rand(1, 1, 8, 8, 8) - 0.5
    lowered, logdet = scale(pet, torch.ones(1, 1))
    torch.testing.assert_close(pet_to_units(lowered, prep), 0.75 * pet_to_units(pet, prep))
    torch.testing.assert_close(logdet, torch.full((1,), 8**3 * np.log(0.75)))


def test_side_model_from_before_the_origin_option_keeps_scaling_about_zero():
    """Runs trained before ``side_map_origin`` existed scaled about model-space 0 and must load unchanged."""
    values = dict(load_preset("tiny")["model"], side_channels=3)
    for key in ("uptake_map", "side_map_origin"):
        del values[key]
    model = DualGlow(DualGlowConfig.from_dict(values))
    scale = model.side_scale
    assert scale.origin == 0.0
    with torch.no_grad():
        scale.maps.fill_(0.1)
    assert torch.equal(scale(torch.zeros(1, 1, 8, 8, 8), torch.ones(1, 3))[0], torch.zeros(1, 1, 8, 8, 8))


def test_effect_maps_follow_only_their_channels():
    """A map per mapped side channel; a change in an unmapped (numeric) channel leaves the scale alone."""
    torch.manual_seed(0)
    scale = CovariateScale(1, 3, 4, mapped=[1, 2])
    assert scale.maps.shape == (2, 1, 4, 4, 4)
    with torch.no_grad():
        scale.maps.normal_(0.0, 0.1)
    pet, side = torch.rand(1, 1, 8, 8, 8), torch.tensor([[0.5, 1.0, 0.0]])
    age_changed, dx_changed = side.clone(), side.clone()
    age_changed[0, 0], dx_changed[0, 1:] = -1.5, torch.tensor([0.0, 1.0])
    assert torch.equal(scale(pet, side)[0], scale(pet, age_changed)[0])
    assert not torch.allclose(scale(pet, side)[0], scale(pet, dx_changed)[0])
    with pytest.raises(ModelError, match="side_map_channels"):
        DualGlow.from_preset("tiny", side_channels=3, side_map_channels=[1, 3])
    assert DualGlow.from_preset("tiny", side_channels=1, side_map_channels=[]).side_scale.maps.shape[0] == 1  # static
    assert DualGlow.from_preset("tiny", side_channels=1, side_map_channels=[], uptake_map=False).side_scale is None


def test_default_covariates_leave_only_the_static_uptake_map():
    """Reference coding: the default categories have no map, so at the defaults the scale is the
    static map alone, and another category adds its own map to it."""
    spec = SideSpec.fit(["age", "sex", "dx"], ROWS, "train.csv")
    torch.manual_seed(0)
    scale = CovariateScale(1, spec.width, 4, mapped=spec.categorical_channels(), origin=-0.5, static=True)
    static = CovariateScale(1, 0, 4, origin=-0.5, static=True)
    with torch.no_grad():
        scale.maps.normal_(0.0, 0.1)
        static.maps.copy_(scale.maps[-1:])
    pet = torch.rand(2, 1, 8, 8, 8) - 0.5
    torch.testing.assert_close(scale(pet, spec.encode({}, "x").expand(2, -1)), static(pet))
    assert not torch.allclose(scale(pet, spec.encode({"dx": "CN"}, "x").expand(2, -1))[0], static(pet)[0])


@pytest.fixture(scope="module")
def side_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("side")
    pairs = write_paired_csv(folder / "pairs", n=6)
    rows = list(csv.DictReader(open(pairs)))
    for i, row in enumerate(rows):
        row.update(age=str(60 + 3 * i), dx="AD" if i % 2 else "CN", site="A")  # site: not a side column
    with open(pairs, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    run = folder / "run"
    result = CliRunner().invoke(app, ["train", str(pairs), "--out", str(run), "--preset", "tiny", "--steps", "6",
                                      "--device", "cpu", "--spacing", "6", "--side-columns", "age,dx"])
    assert result.exit_code == 0, result.stderr
    return run, pairs.parent


def test_synthesis_follows_the_side_information(side_run, tmp_path):
    run, pairs = side_run
    outs = {}
    for dx in ("AD", "CN"):
        out = tmp_path / f"{dx}.nii.gz"
        result = CliRunner().invoke(app, ["synthesize", str(pairs / "sub-00_t1.nii.gz"), str(out), "--model", str(run),
                                          "--side", f"dx={dx},age=70", "--temperature", "0"])
        assert result.exit_code == 0, result.stderr
        outs[dx] = nib.load(out).get_fdata()
    assert not np.array_equal(outs["AD"], outs["CN"])
    config = json.loads((run / "config.json").read_text())["model"]
    assert config["side_map_channels"] == [1]  # AD (CN, the default, is the reference); age acts through the top prior only
    bad = CliRunner().invoke(app, ["synthesize", str(pairs / "sub-00_t1.nii.gz"), str(tmp_path / "x.nii.gz"),
                                   "--model", str(run), "--side", "dx=FTD"])
    assert bad.exit_code == 3 and "not one of" in bad.stderr and not (tmp_path / "x.nii.gz").exists()
