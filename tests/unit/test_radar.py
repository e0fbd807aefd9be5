"""Unit tests of RADAR's torch model and lightning module, without a training run."""

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch, InferenceBatch

from anomalib_diffusion.components import UNetConfig, sobel_edge_map
from anomalib_diffusion.components.noising import NOISE_TILE
from anomalib_diffusion.models import RADAR
from anomalib_diffusion.models.radar import RADARModel

TINY = {
    "image_size": 64,
    "patch_size": 32,
    "stride": 16,
    "block_out_channels": (8, 16),
    "attention_resolutions": (16,),
    "n_estimators": 10,
    "max_steps": 2,
}


def tiny_model(**overrides: object) -> RADARModel:
    """A tiny RADAR network, its score head fitted on random images (forest included, whatever scores)."""
    config = {"stride": 16, "window_size": 16, "n_estimators": 10} | overrides
    torch.manual_seed(0)
    model = RADARModel(
        unet=UNetConfig(sample_size=32, block_out_channels=(8, 16), attention_resolutions=(16,)), **config
    ).eval()
    with torch.no_grad():
        model.fit_head(model.head_statistics(torch.rand(6, 3, 64, 64)))
    model.forest.fit(np.random.default_rng(0).random((20, 2)).astype(np.float32))
    return model


class TestRADARModel:
    @pytest.mark.parametrize("mode", ["patch", "full"])
    @pytest.mark.parametrize(("height", "width"), [(64, 64), (70, 90), (32, 33)])
    def test_outputs_have_the_input_size(self, mode: str, height: int, width: int) -> None:
        model = tiny_model(inference_mode=mode)
        with torch.no_grad():
            output = model(torch.rand(2, 3, height, width))
        assert isinstance(output, InferenceBatch)
        assert output.anomaly_map.shape == (2, 1, height, width)
        assert output.pred_score.shape == (2,)
        assert torch.isfinite(output.anomaly_map).all()

    @pytest.mark.parametrize("mode", ["patch", "full"])
    def test_inference_is_deterministic(self, mode: str) -> None:
        model = tiny_model(inference_mode=mode)
        images = torch.rand(3, 3, 64, 64)
        with torch.no_grad():
            first = model(images)
            torch.manual_seed(999)  # the global RNG must not matter
            model(torch.rand(1, 3, 300, 300))  # nor which sizes were seen before
            second = model(images)
        torch.testing.assert_close(first.anomaly_map, second.anomaly_map, rtol=0, atol=0)
        torch.testing.assert_close(first.pred_score, second.pred_score, rtol=0, atol=0)

    def test_each_image_is_scored_independently_of_the_batch(self) -> None:
        model = tiny_model()
        images = torch.rand(4, 3, 64, 64)
        with torch.no_grad():
            batched = model(images)
            single = model(images[2:3])
        # Standardised maps (values of order 1): float rounding of batched convolutions, nothing more.
        torch.testing.assert_close(batched.anomaly_map[2:3], single.anomaly_map, rtol=1e-4, atol=1e-4)

    def test_chunked_inference_equals_one_call(self) -> None:
        model = tiny_model()
        images = torch.rand(2, 3, 64, 64)
        with torch.no_grad():
            whole = model.noise_map(images)
            model.inference_chunk_size = 3
            chunked = model.noise_map(images)
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)

    def test_noise_tile_repeats_for_large_images(self) -> None:
        model = tiny_model()
        noise = model.inference_noise[0](NOISE_TILE + 10, 2 * NOISE_TILE)
        assert noise.shape == (1, 3, NOISE_TILE + 10, 2 * NOISE_TILE)
        torch.testing.assert_close(noise[..., :10, NOISE_TILE:], model.inference_noise[0].tile[..., :10, :])

    def test_noise_map_is_the_noise_prediction_residual(self) -> None:
        model = tiny_model(inference_mode="full")
        images = torch.rand(1, 3, 32, 32)
        noise = model.inference_noise[0](32, 32)
        noisy = model.scheduler.add_noise(images * 2 - 1, noise, torch.tensor([model.timestep]))
        with torch.no_grad():
            expected = torch.linalg.vector_norm(model.unet(noisy, model.timestep).sample - noise, dim=1, keepdim=True)
            torch.testing.assert_close(model.noise_map(images), expected)

    @pytest.mark.parametrize("mode", ["patch", "full"])
    def test_several_noise_draws_average_the_noise_maps_of_the_seeds(self, mode: str) -> None:
        images = torch.rand(2, 3, 64, 64)
        with torch.no_grad():
            averaged = tiny_model(inference_mode=mode, noise_draws=2, noise_seed=5).noise_map(images)
            first = tiny_model(inference_mode=mode, noise_seed=5).noise_map(images)
            second = tiny_model(inference_mode=mode, noise_seed=6).noise_map(images)
        torch.testing.assert_close(averaged, (first + second) / 2, rtol=1e-5, atol=1e-6)

    def test_fitted_maps_are_standardised_on_the_images_they_were_fitted_on(self) -> None:
        model = tiny_model(anomaly_map="noise", coarse_scales=())
        images = torch.rand(6, 3, 64, 64)
        with torch.no_grad():
            model.fit_head(model.head_statistics(images))
            maps = model(images).anomaly_map
        assert maps.mean().item() == pytest.approx(0.0, abs=1e-4)
        assert maps.std().item() == pytest.approx(1.0, abs=1e-2)

    def test_statistics_saved_before_the_border_bands_load_into_every_band(self) -> None:
        state = tiny_model(coarse_scales=()).state_dict()
        del state["map_statistics.mean"], state["map_statistics.std"]
        state |= {"map_mean": torch.tensor([0.5, 1.5]), "map_std": torch.tensor([2.0, 3.0])}
        restored = tiny_model(border_bands=4, coarse_scales=())
        restored.load_state_dict(state)
        torch.testing.assert_close(restored.map_statistics.mean, torch.tensor([[0.5] * 4, [1.5] * 4]))
        torch.testing.assert_close(restored.map_statistics.std, torch.tensor([[2.0] * 4, [3.0] * 4]))

    def test_anomaly_maps_and_top_k_score(self) -> None:
        images = torch.rand(2, 3, 64, 64)
        with torch.no_grad():
            noise, sobel, combined = (tiny_model(anomaly_map=name)(images) for name in ("noise", "sobel", "combined"))
        torch.testing.assert_close(combined.anomaly_map, torch.maximum(noise.anomaly_map, sobel.anomaly_map))
        for output in (noise, sobel, combined):
            flat = output.anomaly_map.flatten(1)
            expected = flat.topk(int(0.01 * flat.shape[1]), dim=1).values.mean(dim=1)
            torch.testing.assert_close(output.pred_score, expected)

    def test_coarse_noise_map_is_one_full_pass_over_the_pooled_image_upsampled(self) -> None:
        model = tiny_model(inference_mode="patch", coarse_scales=(4,))
        images = torch.rand(2, 3, 64, 64)
        with torch.no_grad():
            (coarse,) = model.coarse_noise_maps(images)
            small = model.noise_map(torch.nn.functional.avg_pool2d(images, 4), inference_mode="full")
        assert small.shape == (2, 1, 16, 16)
        expected = torch.nn.functional.interpolate(small, size=(64, 64), mode="bilinear", align_corners=False)
        torch.testing.assert_close(coarse, expected)

    @pytest.mark.parametrize(("height", "width"), [(64, 64), (70, 90), (33, 35)])
    def test_coarse_maps_join_the_map_by_a_maximum_at_any_size(self, height: int, width: int) -> None:
        images = torch.rand(2, 3, height, width)
        model = tiny_model(coarse_scales=(2, 8))
        with torch.no_grad():
            coarse = model.coarse_noise_maps(images)
            output = model(images)
            noise_map = model.noise_map(images)
        assert [tuple(each.shape) for each in coarse] == [(2, 1, height, width)] * 2
        fine = model.standardised_map(noise_map, sobel_edge_map(noise_map))
        joined = [model.map_statistics(model.blur(each), channel=2 + index) for index, each in enumerate(coarse)]
        torch.testing.assert_close(output.anomaly_map, torch.maximum(fine, torch.maximum(*joined)))
        assert not torch.equal(output.anomaly_map, fine), "the coarse maps must reach the anomaly map somewhere"

    def test_without_coarse_scales_the_map_is_the_full_resolution_one(self) -> None:
        model = tiny_model(coarse_scales=())
        images = torch.rand(2, 3, 64, 64)
        with torch.no_grad():
            noise_map = model.noise_map(images)
            expected = model.standardised_map(noise_map, sobel_edge_map(noise_map))
            torch.testing.assert_close(model(images).anomaly_map, expected)
        assert model.map_statistics.mean.shape == (2, 16)

    def test_forest_scores_the_sobel_features(self) -> None:
        model = tiny_model(image_score="forest")
        images = torch.rand(2, 3, 64, 64)
        with torch.no_grad():
            expected = model.forest(model.image_features(images))
            torch.testing.assert_close(model(images).pred_score, expected)

    def test_training_forward_returns_prediction_and_target(self) -> None:
        model = tiny_model().train()
        predicted, noise = model(torch.rand(5, 3, 32, 32))
        assert predicted.shape == noise.shape == (5, 3, 32, 32)
        assert predicted.requires_grad


class TestRADARModule:
    def test_default_pre_processor_resizes_without_imagenet_normalisation(self) -> None:
        model = RADAR(**TINY)
        transformed = model.pre_processor(torch.full((1, 3, 100, 80), 0.5))
        assert transformed.shape == (1, 3, 64, 64)
        torch.testing.assert_close(transformed, torch.full((1, 3, 64, 64), 0.5))

    @pytest.mark.parametrize(
        ("overrides", "message"),
        [
            ({"image_size": 48}, "smaller than patch_size=64"),
            ({"stride": 0}, "stride=0"),
            ({"timestep": 1000}, "timestep=1000"),
            ({"inference_mode": "tiles"}, "'patch' or 'full'"),
            ({"train_timestep_range": (10, 5)}, "train_timestep_range"),
            ({"max_steps": 0}, "max_steps=0"),
            ({"image_size": (1, 2, 3)}, "one integer or \\[height, width\\]"),
            ({"anomaly_map": "edges"}, "anomaly_map='edges' must be one of 'noise', 'sobel', 'combined'"),
            ({"image_score": "max"}, "image_score='max' must be one of 'top_k', 'forest'"),
            ({"top_k_fraction": 0}, "top_k_fraction=0 must be in"),
            ({"noise_draws": 0}, "noise_draws=0 must be an integer of at least 1"),
            ({"border_bands": 0}, "border_bands=0 must be an integer of at least 1"),
            (
                {"coarse_scales": [1]},
                r"coarse_scales=\[1\] must be a list of integer down-sampling factors of at least 2",
            ),
            ({"coarse_scales": [4, 4]}, r"coarse_scales=\[4, 4\] names a factor twice"),
            ({"calibration_fraction": 0.6}, "calibration_fraction=0.6 must be in"),
        ],
    )
    def test_bad_configuration_is_rejected(self, overrides: dict, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            RADAR(**overrides)

    def test_trainer_arguments_bound_training_and_validate_once(self) -> None:
        arguments = RADAR(**TINY).trainer_arguments
        assert arguments["max_steps"] == 2
        assert arguments["val_check_interval"] == 2
        assert arguments["check_val_every_n_epoch"] is None

    def test_training_stops_with_a_message_on_nan_loss(self) -> None:
        model = RADAR(**TINY)
        with torch.no_grad():
            for parameter in model.model.unet.parameters():
                parameter.fill_(float("nan"))
        batch = ImageBatch(image=torch.rand(2, 3, 64, 64))
        with pytest.raises(FloatingPointError, match="training loss became nan at step 0"):
            model.training_step(batch, 0)

    @pytest.mark.parametrize(("channels", "hint"), [(1, "grayscale"), (4, "RGBA")])
    def test_inference_rejects_non_rgb_tensors(self, channels: int, hint: str) -> None:
        with pytest.raises(ValueError, match=hint):
            RADAR(**TINY)(torch.rand(2, channels, 64, 64))

    def test_training_rejects_images_smaller_than_the_patch(self) -> None:
        model = RADAR(**TINY)
        with pytest.raises(ValueError, match="24x24 images, smaller than its patch_size=32"):
            model.training_step(ImageBatch(image=torch.rand(2, 3, 24, 24)), 0)

    @pytest.mark.parametrize("export", ["to_torch", "to_onnx", "to_openvino"])
    def test_export_before_fitting_is_refused(self, export: str, tmp_path: Path) -> None:
        with pytest.raises(RuntimeError, match="cannot export before it is fitted"):
            getattr(RADAR(**TINY), export)(tmp_path)
        assert not any(tmp_path.rglob("*.*")), "nothing may be written on refusal"

    def test_checkpoint_of_another_model_is_refused(self) -> None:
        from anomalib.models import Padim

        checkpoint = {"state_dict": Padim(pre_trained=False).state_dict(), "hyper_parameters": {}}
        with pytest.raises(ValueError, match="not a RADAR checkpoint: it was saved by a model outside"):
            RADAR(**TINY).on_load_checkpoint(checkpoint)

    def test_checkpoint_with_other_settings_is_refused_before_loading_weights(self) -> None:
        checkpoint: dict = {}
        RADAR(**TINY).on_save_checkpoint(checkpoint)
        checkpoint["hyper_parameters"] = dict(RADAR(**TINY).hparams)
        other = RADAR(**(TINY | {"block_out_channels": (8, 8), "timestep": 80}))
        with pytest.raises(ValueError, match=r"trained with block_out_channels=\[8, 16\], timestep=1, but this model"):
            other.on_load_checkpoint(checkpoint)

    def test_training_skips_a_batch_that_is_entirely_held_out(self) -> None:
        model = RADAR(**TINY)
        model._holdout_paths = frozenset({"a.png", "b.png"})
        batch = ImageBatch(image=torch.rand(2, 3, 64, 64), image_path=["a.png", "b.png"])
        assert model.training_step(batch) is None

    def test_training_uses_only_images_that_are_not_held_out(self, monkeypatch: pytest.MonkeyPatch) -> None:
        model = RADAR(**TINY)
        model._holdout_paths = frozenset({"held.png"})
        seen = []
        original = model.model.forward

        def spy(patches: torch.Tensor) -> object:
            seen.append(patches)
            return original(patches)

        monkeypatch.setattr(model.model, "forward", spy)
        monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)
        batch = ImageBatch(image=torch.cat([torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64)]))
        batch.image_path = ["held.png", "kept.png"]
        model.training_step(batch)
        assert torch.equal(seen[0], torch.ones_like(seen[0]))

    def test_checkpoint_saved_before_coarse_scales_scores_without_them(self, caplog: pytest.LogCaptureFixture) -> None:
        old = RADAR(**(TINY | {"coarse_scales": []}))
        checkpoint: dict = {"state_dict": old.state_dict()}
        old.on_save_checkpoint(checkpoint)
        checkpoint["hyper_parameters"] = {k: v for k, v in old.hparams.items() if k != "coarse_scales"}
        model = RADAR(**(TINY | {"coarse_scales": [4]}))
        assert model.model.coarse_scales == (4,)
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"])  # the statistics of two maps now fit
        assert model.model.coarse_scales == ()
        assert model.hparams["coarse_scales"] == []
        assert "saved before coarse_scales existed" in caplog.text

    def test_checkpoint_hooks_tag_the_owner(self) -> None:
        checkpoint: dict = {}
        model = RADAR(**TINY)
        model.on_save_checkpoint(checkpoint)
        assert checkpoint["anomalib_diffusion"]["model"] == "RADAR"
        model.on_load_checkpoint(checkpoint)


class TestEmptyTrainingSet:
    def test_folder_with_no_normal_images_fails_before_training(self, tmp_path: Path) -> None:
        from anomalib.data import Folder
        from anomalib.engine import Engine

        (tmp_path / "good").mkdir()
        datamodule = Folder(name="empty", root=tmp_path, normal_dir="good", num_workers=0)
        engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path)
        with pytest.raises(RuntimeError, match=r"Found 0 .*NORMAL images"):
            engine.fit(model=RADAR(**TINY), datamodule=datamodule)

    def test_forest_fitting_names_an_empty_training_split(self) -> None:
        from types import SimpleNamespace

        from anomalib_diffusion.components import training_images_loader

        datamodule = SimpleNamespace(train_data=[], eval_batch_size=2)
        module = SimpleNamespace(trainer=SimpleNamespace(datamodule=datamodule))
        with pytest.raises(ValueError, match="found no training images: the datamodule's training split is empty"):
            training_images_loader(module)
