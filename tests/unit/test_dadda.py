"""Unit tests of D-ADDA's networks, its configuration checks and the few-defects datamodule."""

import logging
import math
from pathlib import Path

import pytest
import torch
from anomalib.data import InferenceBatch
from lightning import Callback, Trainer
from tqdm.auto import tqdm

from anomalib_diffusion.augmentation import DataAugmentationModule, DefectBank, DefectPaste
from anomalib_diffusion.augmentation.defects import DefectSamples, change_inside
from anomalib_diffusion.components import UNetConfig
from anomalib_diffusion.components.checkpoints import CHECKPOINT_KEY
from anomalib_diffusion.data import MVTecADFewDefects
from anomalib_diffusion.data.few_defects import defect_type_of, split_real_defects
from anomalib_diffusion.models import DADDA
from anomalib_diffusion.models.dadda import DefectTypeStatistics, pooled_type_head
from anomalib_diffusion.models.dadda.torch_model import (
    DADDAModel,
    DefectDetector,
    DefectGenerator,
    crop_at,
    defect_crop_boxes,
    paste_at,
)
from tests.conftest import train_tiny

UNET = UNetConfig(
    sample_size=32, block_out_channels=(8, 16), attention_resolutions=(16,), in_channels=7, num_class_embeds=4
)


def tiny_generator(steps: int = 3) -> DefectGenerator:
    torch.manual_seed(0)
    return DefectGenerator(UNET, num_inference_steps=steps)


class TestDefectGenerator:
    def test_loss_is_finite_and_reaches_every_weight(self) -> None:
        generator = tiny_generator()
        masks = torch.zeros(2, 1, 32, 32)
        masks[:, :, 8:20, 8:20] = 1
        loss = generator.loss(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32), masks, torch.tensor([0, 3]))
        loss.backward()
        assert torch.isfinite(loss)
        assert generator.unet.class_embedding.weight.grad is not None
        assert generator.unet.conv_in.weight.grad.abs().sum() > 0

    def test_generation_keeps_the_background_outside_the_mask(self) -> None:
        generator = tiny_generator().eval()
        background = torch.rand(2, 3, 32, 32)
        masks = torch.zeros(2, 1, 32, 32)
        masks[:, :, 10:20, 5:25] = 1
        output = generator.generate(background, masks, torch.tensor([1, 2]), torch.Generator().manual_seed(0))
        assert output.shape == (2, 3, 32, 32)
        outside = masks.expand_as(output) == 0
        torch.testing.assert_close(output[outside], background[outside], atol=1e-6, rtol=0)
        assert output.min() >= 0 and output.max() <= 1

    def test_a_low_strength_redraws_from_the_given_defect_and_keeps_its_look(self) -> None:
        generator = tiny_generator(steps=10).eval()
        background, init = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
        masks = torch.zeros(2, 1, 32, 32)
        masks[:, :, 8:24, 8:24] = 1
        seed = torch.Generator().manual_seed(0)
        low = generator.generate(background, masks, torch.tensor([0, 1]), seed, init=init, strength=0.05)
        inside = masks.expand_as(low) == 1
        assert (low[inside] - init[inside]).abs().mean() < 0.05, "one DDIM step from barely noised init"
        outside = ~inside
        torch.testing.assert_close(low[outside], background[outside], atol=1e-6, rtol=0)
        seed = torch.Generator().manual_seed(0)
        full = generator.generate(background, masks, torch.tensor([0, 1]), seed, init=init, strength=1.0)
        seed = torch.Generator().manual_seed(0)
        torch.testing.assert_close(full, generator.generate(background, masks, torch.tensor([0, 1]), seed))
        assert (full[inside] - init[inside]).abs().mean() > 0.1, "strength 1 ignores init"
        with pytest.raises(ValueError, match=r"strength=0.0 must be in \(0, 1\]"):
            generator.generate(background, masks, torch.tensor([0, 1]), init=init, strength=0.0)

    def test_generation_is_repeatable_with_a_seeded_generator(self) -> None:
        generator = tiny_generator().eval()
        background, masks = torch.rand(1, 3, 32, 32), torch.ones(1, 1, 32, 32)
        first = generator.generate(background, masks, torch.tensor([0]), torch.Generator().manual_seed(5))
        second = generator.generate(background, masks, torch.tensor([0]), torch.Generator().manual_seed(5))
        assert torch.equal(first, second)

    def test_the_type_changes_the_prediction(self) -> None:
        generator = tiny_generator()
        torch.nn.init.normal_(generator.unet.class_embedding.weight)
        noisy, background, masks = torch.randn(1, 3, 32, 32), torch.rand(1, 3, 32, 32), torch.ones(1, 1, 32, 32)
        with torch.no_grad():
            first = generator(noisy, 500, background, masks, torch.tensor([0]))
            second = generator(noisy, 500, background, masks, torch.tensor([1]))
        assert not torch.allclose(first, second)

    @pytest.mark.parametrize("guidance", [1.0, 3.0])
    def test_type_channels_put_the_mask_in_its_type_s_plane(self, guidance: float) -> None:
        torch.manual_seed(0)
        generator = DefectGenerator(UNET, guidance_scale=guidance, type_channels=True)
        assert generator.unet.conv_in.in_channels == 7 + 4
        seen = []
        generator.unet.conv_in.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
        masks = torch.zeros(3, 1, 32, 32)
        masks[:, :, 4:12, 6:20] = 1
        types = torch.tensor([2, 0, 4 if guidance > 1 else 3])  # 4: the null type of guidance
        with torch.no_grad():
            generator(torch.randn(3, 3, 32, 32), 500, torch.rand(3, 3, 32, 32), masks, types)
        planes = seen[0][:, 7:]
        expected = torch.zeros(3, 4, 32, 32)
        expected[0, 2], expected[1, 0] = masks[0, 0], masks[1, 0]
        if guidance == 1:
            expected[2, 3] = masks[2, 0]
        assert torch.equal(planes, expected)
        # Trained and sampled like the generator without them.
        loss = generator.loss(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32), masks[:2], torch.tensor([0, 3]))
        assert torch.isfinite(loss)
        output = generator.eval().generate(torch.rand(1, 3, 32, 32), masks[:1], torch.tensor([1]))
        assert output.shape == (1, 3, 32, 32)

    def test_an_unconditioned_unet_is_refused(self) -> None:
        with pytest.raises(ValueError, match="num_class_embeds"):
            DefectGenerator(UNetConfig(sample_size=32, block_out_channels=(8, 16), in_channels=7))

    @pytest.mark.parametrize("target", ["epsilon", "sample", "v_prediction"])
    def test_the_loss_is_zero_exactly_when_the_unet_predicts_its_target(self, target: str) -> None:
        """A U-Net that returns the target (noise, clean crop or velocity) has zero loss; another target does not."""
        generator = DefectGenerator(UNET, num_inference_steps=3, prediction_type=target)
        defective, background = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
        masks = torch.zeros(2, 1, 32, 32)
        masks[:, :, 4:12, 4:12] = 1
        captured = {}

        def add_noise(clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            captured.update(clean=clean, noise=noise, timesteps=timesteps)
            return clean  # never read: the oracle U-Net below ignores its input

        def oracle(*args: object, **kwargs: object) -> torch.Tensor:
            del args, kwargs
            clean, noise, timesteps = captured["clean"], captured["noise"], captured["timesteps"]
            if target == "sample":
                return clean
            if target == "v_prediction":
                return generator.train_scheduler.get_velocity(clean, noise, timesteps)
            return noise

        generator.train_scheduler.add_noise = add_noise
        generator.forward = oracle
        assert generator.loss(defective, background, masks, torch.tensor([0, 1])) == 0
        torch.testing.assert_close(captured["clean"], defective * 2 - 1)
        generator.prediction_type = "epsilon" if target != "epsilon" else "sample"
        assert generator.loss(defective, background, masks, torch.tensor([0, 1])) > 0.01

    @pytest.mark.parametrize("target", ["sample", "v_prediction"])
    def test_sampling_follows_the_prediction_target(self, target: str) -> None:
        """DDIM reads the U-Net's output as the target it was trained on: a U-Net that always predicts one
        clean crop (in its target's terms) draws that crop inside the mask."""
        generator = DefectGenerator(UNET, num_inference_steps=5, prediction_type=target).eval()
        assert generator.scheduler.config.prediction_type == target
        wanted = torch.rand(1, 3, 32, 32) * 2 - 1

        def oracle(sample: torch.Tensor, timestep: int, *args: object) -> torch.Tensor:
            del args  # the condition: this oracle draws the same crop whatever it is
            if target == "sample":
                return wanted
            alpha = generator.scheduler.alphas_cumprod[timestep]
            noise = (sample - alpha.sqrt() * wanted) / (1 - alpha).sqrt()
            return alpha.sqrt() * noise - (1 - alpha).sqrt() * wanted

        generator.forward = oracle
        masks = torch.ones(1, 1, 32, 32)
        output = generator.generate(
            torch.rand(1, 3, 32, 32), masks, torch.tensor([0]), torch.Generator().manual_seed(0)
        )
        torch.testing.assert_close(output, (wanted + 1) / 2, atol=1e-4, rtol=0)

    def test_a_residual_generator_diffuses_the_change_from_the_background(self) -> None:
        """With ``residual`` the clean sample is ``defective - background``: the loss's target is the change, and a
        U-Net that predicts a change draws it on the given background (none: the background itself)."""
        generator = DefectGenerator(UNET, num_inference_steps=5, prediction_type="sample", residual=True)
        defective, background = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
        masks = torch.zeros(2, 1, 32, 32)
        masks[:, :, 4:20, 6:22] = 1
        captured = {}

        def add_noise(clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            del noise, timesteps
            captured["clean"] = clean
            return clean

        generator.train_scheduler.add_noise = add_noise
        generator.forward = lambda *args, **kwargs: captured["clean"]
        assert generator.loss(defective, background, masks, torch.tensor([0, 1])) == 0
        torch.testing.assert_close(captured["clean"], defective - background)

        generator = DefectGenerator(UNET, num_inference_steps=5, prediction_type="sample", residual=True).eval()
        change = torch.full((2, 3, 32, 32), -0.2)
        for predicted, expected in ((change, (background + masks * change).clamp(0, 1)), (change * 0, background)):
            generator.forward = lambda sample, *args, predicted=predicted: predicted.expand_as(sample)
            output = generator.generate(background, masks, torch.tensor([0, 1]), torch.Generator().manual_seed(0))
            torch.testing.assert_close(output, expected, atol=1e-5, rtol=0)

    def test_repaint_keeps_the_unet_s_surroundings_on_the_background_s_noising_path(self) -> None:
        """With ``repaint`` every U-Net call sees, outside the mask, the background noised to its step (RePaint)."""
        seen = []

        def recorder(sample: torch.Tensor, timestep: int, *args: object) -> torch.Tensor:
            del args
            seen.append((timestep, sample.clone()))
            return torch.zeros_like(sample)

        background = torch.rand(2, 3, 32, 32)
        masks = torch.zeros(2, 1, 32, 32)
        masks[:, :, 8:20, 8:20] = 1
        outside = masks.expand(2, 3, 32, 32) == 0
        noise = torch.randn(background.shape, generator=torch.Generator().manual_seed(0))
        for repaint in (True, False):
            torch.manual_seed(0)
            generator = DefectGenerator(UNET, num_inference_steps=5, repaint=repaint).eval()
            generator.forward = recorder
            seen.clear()
            generator.generate(background, masks, torch.tensor([0, 1]), torch.Generator().manual_seed(0))
            assert [timestep for timestep, _ in seen] == generator.scheduler.timesteps.tolist()
            on_path = []
            for timestep, sample in seen:
                alpha = generator.train_scheduler.alphas_cumprod[timestep]
                path = alpha.sqrt() * (background * 2 - 1) + (1 - alpha).sqrt() * noise
                on_path.append(torch.allclose(sample[outside], path[outside], atol=1e-5))
                if repaint:
                    assert (sample[~outside] - path[~outside]).abs().mean() > 0.01 or timestep == seen[0][0]
            assert all(on_path) if repaint else not any(on_path[1:])

    def test_guidance_learns_a_null_type_and_extrapolates_from_it(self) -> None:
        torch.manual_seed(0)
        generator = DefectGenerator(UNET, num_inference_steps=3, guidance_scale=3.0)
        assert tiny_generator().unet.config.num_class_embeds == 4
        assert generator.unet.config.num_class_embeds == 5
        assert generator.null_type == 4
        labels = []
        original = generator.forward

        def recorder(*args: torch.Tensor) -> torch.Tensor:
            labels.append(args[-1].clone())
            return original(*args)

        generator.forward = recorder
        masks = torch.ones(400, 1, 32, 32)
        generator.loss(
            torch.rand(400, 3, 32, 32), torch.rand(400, 3, 32, 32), masks, torch.zeros(400, dtype=torch.long)
        )
        dropped = (labels[0] == 4).float().mean()
        assert 0.05 < dropped < 0.15, f"about 10 % of the types dropped, got {dropped:.3f}"
        assert set(labels[0].tolist()) == {0, 4}

        def by_type(
            noisy: torch.Tensor, timestep: int, background: torch.Tensor, masks: torch.Tensor, types: torch.Tensor
        ) -> torch.Tensor:
            del timestep, background, masks
            return torch.where(types.view(-1, 1, 1, 1) == 4, 0.1, 0.2).expand_as(noisy)

        generator.forward = by_type
        guided = generator.guided(
            torch.zeros(2, 3, 32, 32), 10, torch.zeros(2, 3, 32, 32), masks[:2], torch.tensor([0, 1])
        )
        torch.testing.assert_close(guided, torch.full_like(guided, 0.1 + 3.0 * (0.2 - 0.1)))
        with pytest.raises(ValueError, match=r"guidance_scale=0\.5 must be at least 1"):
            DefectGenerator(UNET, guidance_scale=0.5)


class TestDetector:
    @pytest.mark.parametrize("size", [(64, 64), (50, 70)])
    def test_logits_have_the_image_size(self, size: tuple[int, int]) -> None:
        detector = DefectDetector(base_width=8).eval()
        assert detector(torch.rand(2, 3, *size)).shape == (2, 2, *size)

    def test_mask_features_depend_on_the_mask(self) -> None:
        torch.manual_seed(0)
        detector = DefectDetector(base_width=8).eval()
        images = torch.rand(1, 3, 64, 64)
        left, right = torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64)
        left[..., :, :20] = 1
        right[..., :, 44:] = 1
        with torch.no_grad():
            a, b = detector.mask_features(images, left), detector.mask_features(images, right)
        assert a.shape == (1, detector.feature_dim)
        assert not torch.allclose(a, b)

    def test_eval_forward_is_an_inference_batch(self) -> None:
        model = DADDAModel(UNET, detector_width=8, max_defect_types=4).eval()
        with torch.no_grad():
            output = model(torch.rand(3, 3, 64, 64))
        assert isinstance(output, InferenceBatch)
        assert output.anomaly_map.shape == (3, 1, 64, 64)
        assert output.pred_score.shape == (3,)
        assert ((output.anomaly_map >= 0) & (output.anomaly_map <= 1)).all()

    @pytest.mark.parametrize(("fraction", "expected"), [(None, 64 / 65), (0.01, 64 / 655)])
    def test_a_small_defect_sets_the_default_image_score(self, fraction: float | None, expected: float) -> None:
        """An 8x8 defect on a 256x256 map fills the default top 0.1 % (65 px) but a 10th of the top 1 % (655 px)."""

        class SpotDetector(torch.nn.Module):
            def forward(self, images: torch.Tensor) -> torch.Tensor:
                logits = torch.zeros(len(images), 2, *images.shape[-2:])
                logits[:, 0] = 30.0
                logits[:, :, 100:108, 40:48] = torch.tensor([-30.0, 30.0]).view(2, 1, 1)
                return logits

        settings = {} if fraction is None else {"top_k_fraction": fraction}
        model = DADDAModel(UNET, detector_width=8, max_defect_types=4, **settings).eval()
        model.detector = SpotDetector()
        score = model(torch.rand(1, 3, 256, 256)).pred_score  # normal pixels: softmax ~1e-26
        assert score.item() == pytest.approx(expected, rel=1e-4)

    def test_the_type_head_only_predicts_known_types(self) -> None:
        model = DADDAModel(UNET, detector_width=8, max_defect_types=4).eval()
        model.type_count.fill_(2)
        model.type_bias.copy_(torch.tensor([0.0, 1.0, 50.0, 50.0]))
        predicted = model.classify_defects(torch.rand(2, 3, 64, 64), torch.ones(2, 1, 64, 64))
        assert predicted.tolist() == [1, 1]


class TestCrops:
    def test_crop_boxes_centre_on_the_mask_and_stay_inside(self) -> None:
        masks = torch.zeros(3, 1, 64, 64)
        masks[0, 0, 30:34, 30:34] = 1
        masks[1, 0, 0:3, 60:64] = 1
        corners = defect_crop_boxes(masks, 16)
        assert corners[0].tolist() == [24, 24]
        assert corners[1].tolist() == [0, 48]
        assert corners[2].tolist() == [24, 24], "an empty mask crops the centre"
        images = torch.rand(3, 3, 64, 64)
        crops = crop_at(images, corners, 16)
        assert crops.shape == (3, 3, 16, 16)
        assert torch.equal(paste_at(images, crops, corners), images)


class TestDADDAConfig:
    @pytest.mark.parametrize(
        ("settings", "named"),
        [
            ({"detector_steps": 0}, "detector_steps=0"),
            ({"generator_steps": 0}, "generated_fraction must be 0"),
            ({"generator_steps": 0, "generated_fraction": 0.0}, "type_head_source must be 'dam'"),
            ({"defect_probability": 0.0}, "defect_probability=0.0"),
            ({"top_k_fraction": 0.0}, r"top_k_fraction=0.0 must be in \(0, 1\]"),
            ({"top_k_fraction": 1.5}, r"top_k_fraction=1.5 must be in \(0, 1\]"),
            ({"generated_fraction": 1.5}, "generated_fraction=1.5"),
            ({"defect_types": ["hole", "hole"]}, "lists a type twice"),
            ({"defect_types": ["a", "b", "c"], "max_defect_types": 2}, "more than max_defect_types=2"),
            ({"image_size": 32, "patch_size": 64}, "smaller than patch_size"),
            ({"generated_pool": -1}, "generated_pool=-1 must be 0 or more"),
            ({"generation_strength": 0.0}, r"generation_strength=0.0 must be in \(0, 1\]"),
            ({"detector_crop": 32}, "detector_crop=32 must be at least patch_size=64"),
            ({"generator_target": "noise"}, "generator_target='noise' must be one of 'epsilon', 'sample'"),
            ({"generator_guidance": 0.0}, "generator_guidance=0.0 must be at least 1"),
            ({"procedural_stroke_fraction": 1.5}, r"procedural_stroke_fraction=1.5 must be in \[0, 1\]"),
            ({"generated_fraction": -0.5}, r"generated_fraction=-0.5 must be in \[0, 1\]"),
            ({"detector_schedule": "linear"}, "detector_schedule='linear' must be one of 'constant', 'cosine'"),
            ({"type_head_classifier": "svm"}, "type_head_classifier='svm' must be one of 'lda', 'logistic'"),
            ({"generated_min_change": 1.5}, r"generated_min_change=1.5 must be in \[0, 1\]"),
        ],
    )
    def test_bad_settings_are_named(self, settings: dict, named: str) -> None:
        with pytest.raises(ValueError, match=named):
            DADDA(**settings)

    def test_defaults_build_and_export_only_the_detector(self) -> None:
        model = DADDA()
        assert model.max_steps == 2000
        assert not model.is_fitted()
        assert model.model.generator.unet.config.num_class_embeds == 16

    @pytest.mark.parametrize(
        ("built", "saved", "residual"), [(True, None, False), (True, True, True), (False, None, False)]
    )
    def test_a_checkpoint_from_before_generator_residual_keeps_its_generator_s_space(
        self, built: bool, saved: bool | None, residual: bool
    ) -> None:
        model = DADDA(generator_residual=built)
        hyper_parameters = {name: value for name, value in model.hparams.items() if name != "generator_residual"}
        if saved is not None:
            hyper_parameters["generator_residual"] = saved
        model.on_load_checkpoint({CHECKPOINT_KEY: {"model": "DADDA"}, "hyper_parameters": hyper_parameters})
        assert model.model.generator.residual is model.hparams["generator_residual"] is residual

    def test_unfitted_model_refuses_to_export(self, tmp_path: Path) -> None:
        with pytest.raises(RuntimeError, match="DADDA cannot export before it is fitted"):
            DADDA().to_onnx(tmp_path / "out")
        assert not (tmp_path / "out").exists()


def two_type_defects(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Grey textured images with ``count`` bright red blobs ("blob") and ``count`` dark scratches ("scratch")."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.5 + 0.05 * torch.randn(2 * count, 3, 64, 64, generator=generator)
    masks = torch.zeros(2 * count, 1, 64, 64)
    for index in range(2 * count):
        top, left = (int(v) for v in torch.randint(8, 40, (2,), generator=generator))
        if index < count:
            masks[index, :, top : top + 12, left : left + 12] = 1
            images[index, :, top : top + 12, left : left + 12] = torch.tensor([0.95, 0.1, 0.1])[:, None, None]
        else:
            masks[index, :, top : top + 3, left : left + 20] = 1
            images[index, :, top : top + 3, left : left + 20] = 0.05
    return images.clamp(0, 1), masks, ["blob"] * count + ["scratch"] * count


def tiny_head_dadda(**settings: object) -> DADDA:
    """A tiny DADDA (64 px, 2 generation steps, detector width 8) seeded with 0, for the type-head tests."""
    torch.manual_seed(0)
    base = {"image_size": 64, "patch_size": 32, "block_out_channels": (8, 16), "generation_steps": 2}
    return DADDA(**(base | {"detector_width": 8, "visualizer": False} | settings))


def record_generated_types(model: DADDA) -> list[torch.Tensor]:
    """Wrap the model's generator so that the defect types of every ``generate`` call are recorded (returned list)."""
    requested: list[torch.Tensor] = []
    generate = model.model.generator.generate

    def recording_generate(
        images: torch.Tensor, masks: torch.Tensor, types: torch.Tensor, **settings: object
    ) -> torch.Tensor:
        requested.append(types.cpu())
        return generate(images, masks, types, **settings)

    model.model.generator.generate = recording_generate  # type: ignore[method-assign]
    return requested


def dadda_with_bank(type_head_source: str, defect_types: list[str] | None = None) -> DADDA:
    """A tiny DADDA whose DAM holds "blob" and "scratch" regions (what ``on_fit_start`` builds from lent defects)."""
    model = tiny_head_dadda(type_samples_per_type=16, type_head_source=type_head_source, defect_types=defect_types)
    images, masks, names = two_type_defects(4, seed=0)
    bank = DefectBank.from_images(images, masks, names)
    model._set_type_names(bank)
    model.dam = DataAugmentationModule(bank, paste=DefectPaste(blending="alpha"))
    model._normal_images = (0.5 + 0.05 * torch.randn(16, 3, 64, 64)).clamp(0, 1)
    return model


def smallest_change(images: torch.Tensor, masks: torch.Tensor, normal_images: torch.Tensor) -> torch.Tensor:
    """``(B,)``: each image's mean absolute change inside its mask from the normal image closest to it there."""
    changes = [change_inside(images, normal.expand_as(images), masks) for normal in normal_images]
    return torch.stack(changes).amin(dim=0)


def pool_patches(model: DADDA) -> torch.Tensor:
    """Every generated-pool cutout's patch, flattened end to end."""
    return torch.cat([cutout.patch.flatten() for cutout in model.generated_dam.bank.cutouts])


def two_type_accuracy(model: DADDA) -> float:
    """The fitted head's accuracy on 20 held-out blobs and scratches, read inside their true masks."""
    images, masks, names = two_type_defects(10, seed=1)
    predicted = model.eval().model.classify_defects(images, masks)
    truth = torch.tensor([model.type_names.index(name) for name in names])
    return float((predicted == truth).float().mean())


class TestDefectTypeHead:
    @pytest.mark.parametrize("classifier", ["lda", "logistic"])
    def test_the_head_beats_chance_on_held_out_pasted_defects(self, classifier: str) -> None:
        """Fitted on DAM pastes of the lent defects; scored on other defects of the same two types."""
        model = dadda_with_bank("dam")
        model.type_head_classifier = classifier
        model.fit_defect_type_head()
        accuracy = two_type_accuracy(model)
        assert accuracy >= 0.9, f"accuracy {accuracy:.2f} on two types (chance 0.5)"

    def test_an_image_where_the_model_marks_no_region_counts_as_a_wrong_type(self) -> None:
        """``defect_type_accuracy_own_region``: the type read from the model's own region; none marked is wrong."""
        model = dadda_with_bank("dam")
        model.fit_defect_type_head()
        images, masks, names = two_type_defects(10, seed=1)
        truth = torch.tensor([model.type_names.index(name) for name in names])
        model.eval()
        in_true_regions = model.correct_defect_types(images, masks, truth)
        assert in_true_regions >= 18, "the head reads the true regions right (>= 0.9)"
        assert model.correct_defect_types(images, torch.zeros_like(masks), truth) == 0
        half = masks.clone()
        half[::2] = 0  # the model marks nothing on every other image
        expected = int((model.model.classify_defects(images[1::2], masks[1::2]) == truth[1::2]).sum())
        assert model.correct_defect_types(images, half, truth) == expected

    def test_requested_types_get_regions_of_that_type_where_the_bank_holds_them(self) -> None:
        model = dadda_with_bank("both", defect_types=["blob", "crack", "scratch"])
        assert model.held_defect_types() == {0, 2}, "no crack region is held"
        drawn: list[torch.Tensor] = []
        forward = model.dam.forward

        def recording_forward(images: torch.Tensor, defect_types: torch.Tensor | None = None) -> DefectSamples:
            samples = forward(images, defect_types)
            drawn.append(samples.defect_types)
            return samples

        model.dam.forward = recording_forward  # type: ignore[method-assign]
        normals = model._normal_images[:6]
        _, masks = model.defective_batch(normals, 1.0, 0.0, torch.tensor([2, 2, 0, 0, 1, 1]))
        assert drawn[0][:4].tolist() == [2, 2, 0, 0]
        assert set(drawn[0][4:].tolist()) <= {0, 2}, "an unheld type takes its mask from any held region"
        assert masks.flatten(1).any(dim=1).all()

    def test_a_generated_defect_is_labelled_only_inside_the_crop_it_was_drawn_in(self) -> None:
        """A pasted scratch longer than patch_size (32): the generator redraws a 32-px crop of it, nothing else."""
        model = dadda_with_bank("dam")
        normals = model._normal_images[:2]
        long_masks = torch.zeros(2, 1, 64, 64)
        long_masks[:, :, 30:33, 4:60] = 1  # 56 px long
        scratched = torch.where(long_masks.bool(), torch.zeros_like(normals), normals)
        model.dam.forward = lambda images, defect_types=None: DefectSamples(  # type: ignore[method-assign]
            scratched, long_masks, torch.zeros(2, dtype=torch.long)
        )
        images, masks = model.defective_batch(normals, 1.0, 1.0)
        [columns] = {tuple(column) for column in masks[:, 0].any(dim=1).nonzero()[:, 1].view(2, -1).tolist()}
        assert len(columns) == 32, "the label is the mask within the generator's 32-px crop"
        assert set(columns) < set(range(4, 60))
        outside = torch.ones(64, dtype=torch.bool)
        outside[list(columns)] = False
        torch.testing.assert_close(images[..., outside], normals[..., outside])  # no defect drawn, none labelled

    def test_the_generated_source_fits_every_type_and_dam_only_the_held_ones(self) -> None:
        model = dadda_with_bank("generated", defect_types=["blob", "crack", "scratch"])
        model.fit_defect_type_head()
        assert model.model.type_weight[:3].abs().sum(dim=1).gt(0).all()
        model.type_head_source = "dam"
        model.fit_defect_type_head()
        assert model.model.type_bias[1] == -torch.inf, "crack has no region to paste: never predicted"
        images, masks, _ = two_type_defects(4, seed=1)
        assert set(model.eval().model.classify_defects(images, masks).tolist()) == {0, 2}

    def test_an_unknown_source_is_refused(self) -> None:
        with pytest.raises(ValueError, match="type_head_source='real' must be"):
            DADDA(type_head_source="real")


def site_with_one_type(name: str) -> DADDA:
    """A site of a two-type federation ("blob", "scratch") whose DAM holds regions of ``name`` only."""
    model = dadda_with_bank("dam", defect_types=["blob", "scratch"])
    images, masks, names = two_type_defects(4, seed=0)
    keep = [index for index, held in enumerate(names) if held == name]
    bank = DefectBank.from_images(images[keep], masks[keep], [name] * len(keep))
    model._set_type_names(bank)
    model.dam = DataAugmentationModule(bank, paste=DefectPaste(blending="alpha"))
    return model


class TestPooledTypeHead:
    """The federated head: sites send per-type feature sums of the global detector; the server fits one head."""

    def test_the_discriminant_matches_its_closed_form(self) -> None:
        generator = torch.Generator().manual_seed(0)
        features = [
            torch.randn(n, 5, generator=generator, dtype=torch.float64) + shift for n, shift in ((7, 1), (9, -2))
        ]
        statistics = DefectTypeStatistics.empty(4, 5)
        for row, values in zip((0, 2), features, strict=True):
            statistics.count[row] = len(values)
            statistics.total[row] = values.sum(dim=0)
            statistics.squares[row] = values.square().sum(dim=0)
        rows, weight, bias = pooled_type_head(statistics)
        means = torch.stack([values.mean(dim=0) for values in features])
        within = sum(((values - values.mean(dim=0)) ** 2).sum(dim=0) for values in features) / (16 - 2)
        variance = within + 1e-3 * within.mean()
        assert rows.tolist() == [0, 2], "types no site holds get no row"
        torch.testing.assert_close(weight, means / variance)
        torch.testing.assert_close(bias, -0.5 * (means**2 / variance).sum(dim=1))

    def test_two_sites_statistics_name_both_types_with_the_shared_detector(self) -> None:
        """Each site holds one type; the pooled head names both, on the one detector both sites scored with."""
        blob_site, scratch_site = site_with_one_type("blob"), site_with_one_type("scratch")
        scratch_site.model.detector.load_state_dict(blob_site.model.detector.state_dict())  # the global detector
        blob_statistics, scratch_statistics = blob_site.defect_type_statistics(), scratch_site.defect_type_statistics()
        assert blob_statistics.count.tolist()[:3] == [16, 0, 0], "a site sends statistics of its own type only"
        assert scratch_statistics.count.tolist()[:3] == [0, 16, 0]
        server = site_with_one_type("blob")
        server.model.detector.load_state_dict(blob_site.model.detector.state_dict())
        server.set_type_head_from_statistics(blob_statistics + scratch_statistics)
        accuracy = two_type_accuracy(server)
        assert accuracy >= 0.9, f"accuracy {accuracy:.2f} on two types (chance 0.5)"

    def test_one_sites_statistics_leave_the_head_empty(self) -> None:
        site = site_with_one_type("blob")
        site.set_type_head_from_statistics(site.defect_type_statistics())
        assert site.model.type_weight.abs().sum() == 0

    def test_statistics_of_another_model_shape_are_refused(self) -> None:
        with pytest.raises(ValueError, match="different settings"):
            DefectTypeStatistics.empty(4, 5) + DefectTypeStatistics.empty(4, 6)

    def test_a_bank_built_outside_a_fit_is_the_one_a_fit_builds(self, demo_root: Path) -> None:
        """``prepare_defect_bank``: what a site does before scoring the global model (no Trainer)."""
        data = MVTecADFewDefects(root=demo_root, category="brick", defects_per_type=1, num_workers=0, seed=0)
        model = DADDA(image_size=64, patch_size=32, block_out_channels=(8, 16), detector_width=8, visualizer=False)
        model.prepare_defect_bank(data)
        assert model.type_names == ["contamination", "hole", "scratch", "stain"]
        assert model.held_defect_types() == {0, 1, 2, 3}
        assert model._normal_images is not None and model._normal_images.shape[1:] == (3, 64, 64)
        assert len(model._normal_images) == len(data.train_data)


class TestMasksOnly:
    """A site with normal images and no real defects, given the type names: the generator draws every type."""

    def model(self) -> DADDA:
        model = tiny_head_dadda(type_samples_per_type=4, procedural_seeds=4, defect_types=["blob", "crack", "scratch"])
        normals = (0.5 + 0.05 * torch.randn(8, 3, 64, 64)).clamp(0, 1)
        model._build_defect_bank(normals, None)
        return model

    def test_a_procedural_bank_keeps_the_given_type_names_and_holds_none_of_them(self) -> None:
        model = self.model()
        assert model.type_names == ["blob", "crack", "scratch"]
        assert model.held_defect_types() == set()
        assert int(model.model.type_count) == 3

    def test_the_detector_gets_generated_defects_of_every_type(self) -> None:
        model = self.model()
        requested = record_generated_types(model)
        model.generated_fraction, model.defect_probability = 1.0, 1.0
        torch.manual_seed(1)
        for _ in range(4):
            model._detector_loss(model._normal_images)
        assert set(torch.cat(requested).tolist()) == {0, 1, 2}

    def test_a_head_on_generated_defects_covers_every_type(self) -> None:
        model = self.model()
        model.type_head_source = "generated"
        model.fit_defect_type_head()
        assert model.model.type_weight[:3].abs().sum(dim=1).gt(0).all()
        assert torch.isfinite(model.model.type_bias[:3]).all()


class TestGeneratedPool:
    """The generator's defects are made once when the detector phase starts; the detector draws from them."""

    def test_the_pool_holds_generated_defects_of_every_held_type_and_the_detector_draws_from_it(self) -> None:
        model = dadda_with_bank("both")
        model.generated_pool, model.generated_min_change = 5, 0.0
        requested = record_generated_types(model)
        model.build_generated_pool()
        assert torch.cat(requested).tolist() == [0] * 5 + [1] * 5, "five of each held type, in its own masks"
        bank = model.generated_dam.bank
        assert bank.type_names == ["blob", "scratch"]
        assert set(bank.counts()) == {"blob", "scratch"}
        assert all(count >= 1 for count in bank.counts().values())
        requested.clear()
        model.generated_fraction, model.defect_probability = 1.0, 1.0
        images, masks = model.defective_batch(model._normal_images[:6], 1.0, 1.0, torch.tensor([0, 0, 0, 1, 1, 1]))
        assert not requested, "no DDIM sampling inside a detector step once the pool exists"
        assert masks.flatten(1).any(dim=1).all()
        changed = (images - model._normal_images[:6]).abs().sum(dim=1, keepdim=True) > 0
        assert (changed & (masks == 0)).sum() == 0, "nothing is drawn outside the labelled mask"

    def test_faint_generated_defects_are_drawn_again_and_the_most_visible_kept(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """generated_min_change: a faint draw is replaced by another; a type that stays faint keeps its most visible."""
        model = dadda_with_bank("generated")
        model.generated_pool, model.generated_min_change = 4, 0.5
        requested: list[list[int]] = []

        def every_other_scratch_invisible(images, masks, types, generator=None, init=None, strength=1.0):
            del masks, generator, strength
            requested.append(types.tolist())
            faint = (types == 1) & (torch.arange(len(types)) % 2 == 1)
            return torch.where(faint.view(-1, 1, 1, 1), images, init)  # a faint draw changes nothing; others as pasted

        model.model.generator.generate = every_other_scratch_invisible  # type: ignore[method-assign]
        model.build_generated_pool()
        # Blobs pass at once. Scratches: 4 drawn, 2 pass; 2 drawn, 1 passes; 1 drawn, it passes.
        assert [kind for call in requested for kind in call] == [0] * 4 + [1] * 7
        kept = model._visible_generated(model._normal_images, 1, tqdm(disable=True))
        assert len(kept[0]) == 4
        assert (smallest_change(*kept, model._normal_images) > 0.1).all(), "no faint scratch in the pool"

        model.model.generator.generate = lambda images, *args, **kwargs: images  # every draw faint
        with caplog.at_level(logging.WARNING):
            images, _ = model._visible_generated(model._normal_images, 1, tqdm(disable=True))
        assert len(images) == 4, "a type that stays faint still gets its pool: the most visible of 12 draws"
        assert "0 of 12 generated defects of type 'scratch'" in caplog.text
        model.generated_min_change = 0.0
        requested.clear()
        model.model.generator.generate = every_other_scratch_invisible  # type: ignore[method-assign]
        model.build_generated_pool()
        assert [kind for call in requested for kind in call] == [0] * 4 + [1] * 4, "without the bar: the first draws"

    def test_strength_starts_from_the_paste_only_for_held_types(self) -> None:
        model = dadda_with_bank("both", defect_types=["blob", "crack", "scratch"])
        model.generation_strength = 0.5
        calls: list[tuple[list[int], bool, float]] = []
        generate = model.model.generator.generate

        def recording_generate(images, masks, types, generator=None, init=None, strength=1.0):
            calls.append((types.tolist(), init is not None and strength < 1, strength))
            return generate(images, masks, types, generator, init, strength)

        model.model.generator.generate = recording_generate  # type: ignore[method-assign]
        model.defective_batch(model._normal_images[:4], 1.0, 1.0, torch.tensor([0, 2, 1, 0]))
        assert calls == [([0, 2, 0], True, 0.5), ([1], False, 1.0)], "crack is held by no region: pure noise"

    def test_the_pool_depends_on_its_seed_alone_and_leaves_the_random_stream_as_it_was(self) -> None:
        """What a run resumed in the detector phase needs: the same pool, and training's random draws unchanged."""
        pools = []
        for stream_seed in (1, 2):
            model = dadda_with_bank("both")
            model.generated_pool, model._pool_seed = 3, 7
            torch.manual_seed(stream_seed)
            before = torch.get_rng_state()
            model.build_generated_pool()
            assert torch.equal(torch.get_rng_state(), before)
            pools.append(pool_patches(model))
        torch.testing.assert_close(pools[0], pools[1], rtol=0, atol=0)
        masks = [cutout.mask for cutout in model.generated_dam.bank.cutouts]
        with torch.no_grad():  # a last-bit change in the generator's weights draws the same masks on the same images
            next(model.model.generator.parameters()).mul_(1 + 1e-7)
        model.build_generated_pool()
        redrawn = [cutout.mask for cutout in model.generated_dam.bank.cutouts]
        assert len(redrawn) == len(masks)
        assert all(torch.equal(a, b) for a, b in zip(redrawn, masks, strict=True))
        model._pool_seed = 8
        model.build_generated_pool()
        other = pool_patches(model)
        assert other.shape != pools[0].shape or not torch.equal(other, pools[0]), "another seed, another pool"

    def test_the_pool_seed_is_drawn_at_fit_start_and_kept_in_checkpoints(self) -> None:
        model = dadda_with_bank("both")
        model._pool_seed = 1234
        checkpoint: dict = {}
        model.on_save_checkpoint(checkpoint)
        restored = dadda_with_bank("both")
        restored.on_load_checkpoint(checkpoint)
        assert restored._resumed_pool_seed == 1234
        outside_a_fit = dadda_with_bank("both")
        outside_a_fit.generated_pool = 3
        torch.manual_seed(5)
        outside_a_fit.build_generated_pool()
        first = pool_patches(outside_a_fit)
        torch.manual_seed(5)
        outside_a_fit.build_generated_pool()
        second = pool_patches(outside_a_fit)
        torch.testing.assert_close(first, second, rtol=0, atol=0, msg="outside a fit the seed comes from the stream")

    def test_a_pool_of_zero_samples_inside_every_step_as_before(self) -> None:
        model = dadda_with_bank("both")
        model.generated_pool = 0
        model.build_generated_pool()
        assert model.generated_dam is None
        requested = record_generated_types(model)
        model.defective_batch(model._normal_images[:4], 1.0, 1.0, torch.tensor([0, 1, 0, 1]))
        assert torch.cat(requested).tolist() == [0, 1, 0, 1]

    def test_masks_only_pools_every_named_type(self) -> None:
        model = tiny_head_dadda(procedural_seeds=4, defect_types=["blob", "crack", "scratch"], generated_pool=2)
        model._build_defect_bank((0.5 + 0.05 * torch.randn(8, 3, 64, 64)).clamp(0, 1), None)
        model.build_generated_pool()
        assert set(model.generated_dam.bank.counts()) == {"blob", "crack", "scratch"}
        assert min(model.generated_dam.bank.counts().values()) >= 1

    def test_procedural_stroke_fraction_seeds_thin_strokes(self) -> None:
        """One-class: with procedural_stroke_fraction=1 every procedural seed is a thin stroke, not a blob."""
        normal = (0.5 + 0.05 * torch.randn(8, 3, 64, 64)).clamp(0, 1)
        shares = {}
        for fraction in (0.0, 1.0):
            model = tiny_head_dadda(procedural_seeds=12, procedural_stroke_fraction=fraction)
            torch.manual_seed(1)
            model._build_defect_bank(normal, None)
            cutouts = model.dam.bank.cutouts
            assert len(cutouts) == 12
            # Area over the longer side of the bounding box: a stroke's width (a pixel or two at 64 px); a blob's is larger.
            widths = [float(c.mask.sum()) / max(c.mask.shape[-2:]) for c in cutouts]
            shares[fraction] = max(widths) if fraction else min(widths)
        assert shares[1.0] <= 3.0, f"every stroke thin: widest {shares[1.0]:.1f} px"
        assert shares[0.0] > shares[1.0], f"blobs wider: narrowest {shares[0.0]:.1f} px"

    def test_a_new_fit_rebuilds_the_pool_from_its_own_generator(self) -> None:
        model = dadda_with_bank("both")
        model.generated_pool = 2
        model.build_generated_pool()
        assert model.generated_dam is not None
        model._build_defect_bank(model._normal_images, two_type_defects(2, seed=3))
        assert model.generated_dam is None


class TestDetectorSchedule:
    @pytest.mark.parametrize("schedule", ["constant", "cosine"])
    def test_the_detector_learning_rate_follows_the_schedule(
        self, demo_root: Path, tmp_path: Path, schedule: str
    ) -> None:
        """The detector's optimiser steps at ``learning_rate`` (constant) or along a half cosine to 0 over its steps."""
        learning_rates: list[tuple[float, float]] = []

        class Recorder(Callback):
            def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
                del args
                generator, detector = (optimizer.param_groups[0]["lr"] for optimizer in trainer.optimizers)
                learning_rates.append((generator, detector))

        model = tiny_head_dadda(
            generator_steps=2, detector_steps=4, learning_rate=0.01, detector_schedule=schedule, procedural_seeds=4
        )
        train_tiny(model, demo_root, tmp_path, callbacks=[Recorder()])
        expected = (
            [0.01] * 4 if schedule == "constant" else [0.01 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
        )
        assert [generator for generator, _ in learning_rates] == [0.01] * 6, "the generator's rate never changes"
        assert [detector for _, detector in learning_rates[2:]] == pytest.approx(expected, abs=1e-12)


class TestDetectorCrop:
    def test_the_detector_trains_on_crops_and_scores_whole_images(self) -> None:
        model = dadda_with_bank("both")
        model.detector_crop = 32
        seen: list[tuple[int, ...]] = []
        forward = model.model.detector.forward

        def recording_forward(images: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(images.shape))
            return forward(images)

        model.model.detector.forward = recording_forward  # type: ignore[method-assign]
        model.model.train()
        loss = model._detector_loss(model._normal_images[:4])
        assert torch.isfinite(loss)
        model.model.eval()
        output = model.model(model._normal_images[:2])
        assert seen == [(4, 3, 32, 32), (2, 3, 64, 64)]
        assert output.anomaly_map.shape == (2, 1, 64, 64)
        model.detector_crop = 128
        model.model.train()
        model._detector_loss(model._normal_images[:4])
        assert seen[-1] == (4, 3, 64, 64), "a crop as large as the image is the whole image"


class TestFewDefectsDatamodule:
    def test_k_defects_per_type_move_out_of_the_test_split(self, demo_root: Path) -> None:
        data = MVTecADFewDefects(root=demo_root, category="brick", defects_per_type=1, num_workers=0, seed=0)
        data.setup()
        lent = list(data.defect_data.samples.image_path)
        assert sorted(defect_type_of(path) for path in lent) == ["contamination", "hole", "scratch", "stain"]
        tested = set(data.test_data.samples.image_path) | set(data.val_data.samples.image_path)
        assert not tested & set(lent), "no lent defect is scored"
        assert len(data.test_data) == 4 + 4 * 1
        assert (data.defect_data.samples.label_index == 1).all()

    def test_zero_is_one_class(self, demo_root: Path) -> None:
        data = MVTecADFewDefects(root=demo_root, category="brick", defects_per_type=0, num_workers=0)
        data.setup()
        assert len(data.defect_data) == 0
        assert len(data.test_data) == 4 + 4 * 2

    def test_the_draw_is_seeded(self, demo_root: Path) -> None:
        draws = []
        for _ in range(2):
            data = MVTecADFewDefects(root=demo_root, category="brick", defects_per_type=1, defect_seed=3, num_workers=0)
            data.setup()
            draws.append(sorted(data.defect_data.samples.image_path))
        assert draws[0] == draws[1]

    def test_taking_every_defect_of_a_type_is_refused(self, demo_root: Path) -> None:
        data = MVTecADFewDefects(root=demo_root, category="brick", defects_per_type=2, num_workers=0)
        with pytest.raises(ValueError, match="would leave none to test on; lower defects_per_type below 2"):
            data.setup()

    def test_defective_images_without_masks_are_refused(self, demo_root: Path) -> None:
        data = MVTecADFewDefects(root=demo_root, category="brick", defects_per_type=0, num_workers=0)
        data.setup()
        samples = data.test_data.samples.copy()
        samples.loc[samples.label_index == 1, "mask_path"] = ""
        data.test_data.samples = samples
        with pytest.raises(ValueError, match="have no ground-truth mask; D-ADDA cuts defects out along their masks"):
            split_real_defects(data.test_data, defects_per_type=1)

    def test_a_test_split_without_defects_is_refused_unless_one_class(self, demo_root: Path) -> None:
        data = MVTecADFewDefects(root=demo_root, category="brick", defects_per_type=0, num_workers=0)
        data.setup()
        samples = data.test_data.samples.reset_index(drop=True)
        normal_only = data.test_data.subsample(list(samples.index[samples.label_index == 0]))
        assert len(split_real_defects(normal_only, defects_per_type=0)[0]) == 0
        with pytest.raises(ValueError, match="needs defective images in the test split, but it has none"):
            split_real_defects(normal_only, defects_per_type=1)
