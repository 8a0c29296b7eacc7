"""Occlusion augmentation (augment.occlusion): hands, caption bars and erased boxes drawn over the face box of
training images, on the device, seeded; off by default without changing a trial's hash or numbers."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image, ImageDraw
from scipy.stats import ks_2samp

from trainers.augment import ERASE, HAND, KINDS, TEXT, draw_occluders, face_box, occlude
from trainers.config import AugmentConfig, ConfigError, config_hash, flat_params, from_dict
from trainers.data.dataset import prepare_data
from trainers.data.synthetic import FACE_HALF_HEIGHT, FaceFrame, draw_occlusion
from trainers.models import build_model
from trainers.run import run_trial
from trainers.train import build_loop, seed_everything, train_one_epoch

# config_hash(from_dict({})) before the augment section existed: trials planned then keep their identity.
DEFAULT_HASH_BEFORE_AUGMENT = "96a85a117792"
# Anti-aliased edges let an occluder's covered area miss its drawn size by a fraction of a pixel per
# corner: within 0.2 points of the face box (0.2% of 576 px = 1.2 px at 32 px).
AREA_SLACK = 0.002


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """A float batch of uniform noise: any occluder changes the pixels it covers."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def outside_face_box(batch: torch.Tensor) -> torch.Tensor:
    """Every pixel outside the face box, flattened per image."""
    top, bottom, left, right = face_box(*batch.shape[2:])
    keep = torch.ones(batch.shape[2:], dtype=torch.bool)
    keep[top:bottom, left:right] = False
    return batch[:, :, keep]


def test_occlusion_changes_the_requested_share_of_images_and_only_inside_the_face_box():
    x = images(2000, 32)
    y = occlude(x, torch.Generator().manual_seed(0), 0.5)
    changed = (y != x).flatten(1).any(1).double().mean().item()
    # Binomial(2000, 0.5): standard deviation sqrt(0.25 / 2000) = 1.1 points; allow four of them.
    assert abs(changed - 0.5) < 4 * math.sqrt(0.25 / 2000)
    assert torch.equal(outside_face_box(y), outside_face_box(x))
    assert y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize("size", [32, 64])
def test_each_occluder_covers_10_to_35_percent_of_the_face_box_and_each_kind_a_third(size):
    occ = draw_occluders(1500, (size, size), torch.Generator().manual_seed(size))
    top, bottom, left, right = face_box(size, size)
    share = occ.alpha.sum(dim=(1, 2, 3)) / ((bottom - top) * (right - left))
    assert share.min() >= 0.10 - AREA_SLACK and share.max() <= 0.35 + AREA_SLACK
    assert share.max() - share.min() > 0.2                   # sizes spread over the range, not one size
    assert torch.bincount(occ.kind, minlength=len(KINDS)).tolist() == [500, 500, 500]
    assert torch.equal(outside_face_box(occ.alpha), torch.zeros_like(outside_face_box(occ.alpha)))


def test_hands_are_skin_toned_and_caption_bars_light_or_dark_with_contrasting_glyphs():
    occ = draw_occluders(300, (64, 64), torch.Generator().manual_seed(1))
    solid = occ.alpha[:, 0] > 0.99
    for i in torch.nonzero(occ.kind == HAND).flatten().tolist():
        r, g, b = occ.paint[i][:, solid[i]]
        assert (r >= g).float().mean() > 0.95 and (g >= b).float().mean() > 0.95     # skin: red > green > blue
    for i in torch.nonzero(occ.kind == TEXT).flatten().tolist():
        grey = occ.paint[i][:, solid[i]].mean(0)
        band = grey.median()
        assert band < 0.2 or band > 0.8                      # a dark or a light band
        assert ((grey - band).abs() > 0.5).any()             # with glyphs in the other shade
    assert (occ.kind == ERASE).any()


def test_occlusion_is_seeded():
    x = images(64, 32)
    first = occlude(x, torch.Generator().manual_seed(3), 0.5)
    again = occlude(x, torch.Generator().manual_seed(3), 0.5)
    other = occlude(x, torch.Generator().manual_seed(4), 0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_probability_zero_returns_the_batch_and_draws_nothing():
    x, generator = images(16, 32), torch.Generator().manual_seed(5)
    state = generator.get_state()
    assert occlude(x, generator, 0.0) is x
    assert torch.equal(generator.get_state(), state)


def test_the_production_variant_places_its_occluders_differently():
    # The synthetic production set draws hands and text bars at three heights of the face (eyes, mouth,
    # chin) and lets text bars run past the face; the augmentation places the same kinds anywhere in the
    # face box, so a model is not trained on the production generator's own occluders.
    size, n = 64, 300
    top, bottom, left, right = face_box(size, size)
    rows = np.arange(size) + 0.5
    synthetic, crossing = [], 0
    for seed in range(n):
        layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        half_height = size * FACE_HALF_HEIGHT
        draw_occlusion(ImageDraw.Draw(layer), FaceFrame(size / 2, size / 2, 0.8 * half_height, half_height),
                       np.random.default_rng(seed))
        mask = np.asarray(layer)[..., 3] > 0
        synthetic.append(rows[np.nonzero(mask)[0]].mean() / size)
        crossing += mask.sum() > mask[top:bottom, left:right].sum()
    occ = draw_occluders(n, (size, size), torch.Generator().manual_seed(0))
    shared = (occ.kind != ERASE).numpy()                    # the kinds both draw: hands and text bars
    alpha = occ.alpha[:, 0].numpy()[shared]
    ours = (alpha.sum(2) * rows).sum(1) / alpha.sum((1, 2)) / size
    assert ks_2samp(synthetic, ours).pvalue < 1e-6          # vertical centres from different distributions
    assert crossing > n // 10 and not outside_face_box(occ.alpha).any()


# --- the config section ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value, why", [(1.5, "must be a probability in [0, 1]"), (-0.1, "must be a probability"),
                                        ("often", "must be a number")])
def test_augment_occlusion_is_validated_naming_the_field(value, why):
    with pytest.raises(ConfigError) as err:
        from_dict({"augment": {"occlusion": value}}, "trial.yaml")
    assert err.value.field == "augment.occlusion" and why in str(err.value)
    assert str(err.value).startswith("trial.yaml: augment.occlusion")


def test_an_unknown_augment_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'augment.occlusions'.*occlusion"):
        from_dict({"augment": {"occlusions": 0.5}})


def test_the_default_augment_section_keeps_every_hash_and_is_logged_as_a_param():
    assert config_hash(from_dict({})) == DEFAULT_HASH_BEFORE_AUGMENT
    assert config_hash(from_dict({"augment": {"occlusion": 0}})) == DEFAULT_HASH_BEFORE_AUGMENT
    assert config_hash(from_dict({"augment": {"occlusion": 0.5}})) != DEFAULT_HASH_BEFORE_AUGMENT
    assert flat_params(from_dict({"augment": {"occlusion": 0.5}}))["augment.occlusion"] == "0.5"


# --- training -------------------------------------------------------------------------------------------

def one_epoch_loss(cfg, data, occlusion: float) -> float:
    trial = dataclasses.replace(cfg, augment=AugmentConfig(occlusion=occlusion))
    seed_everything(trial.train.seed)
    loop = build_loop(trial, data, build_model(trial.model, len(data.classes)))
    return train_one_epoch(loop, 1)["train_loss"]


def test_an_epoch_with_occlusion_is_seeded_and_differs_from_one_without(tmp_path, tiny_trial):
    cfg = from_dict(tiny_trial(tmp_path, data={"synthetic": {"n_images": 120, "draw_size": 32}}))
    data = prepare_data(cfg.data, cfg.model.image_size)
    occluded = one_epoch_loss(cfg, data, 0.5)
    assert math.isfinite(occluded)
    assert one_epoch_loss(cfg, data, 0.5) == occluded
    assert one_epoch_loss(cfg, data, 0.0) != occluded


def test_a_trial_with_occlusion_trains_and_logs_it(tmp_path, tiny_trial):
    raw = tiny_trial(tmp_path, data={"synthetic": {"n_images": 120, "draw_size": 32}},
                     train={"epochs": 1}, augment={"occlusion": 0.5})
    raw["tracking"]["log_model"] = False
    cfg = from_dict(raw)
    outcome = run_trial(cfg)
    run = MlflowClient(cfg.tracking.uri).get_run(outcome.run_id)
    assert outcome.status == "finished" and run.data.params["augment.occlusion"] == "0.5"
    assert math.isfinite(run.data.metrics["train_loss"]) and 0 <= run.data.metrics["test_macro_f1"] <= 1
