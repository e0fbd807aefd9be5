"""Unit tests of D-ADDA's Data Augmentation Module: defect bank, the four transforms, the chained module."""

import pytest
import torch

from anomalib_diffusion.augmentation import (
    CutoutAugmentation,
    DataAugmentationModule,
    DefectBank,
    DefectCutout,
    DefectPaste,
    MaskVariation,
    QualityFilter,
)


def flat_images(batch: int = 4, size: int = 64, value: float = 0.3) -> torch.Tensor:
    return torch.full((batch, 3, size, size), value)


def defective_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 64x64 images: the first with two red defects (10x10 and 6x8), the second with one green 12x5 defect."""
    images = flat_images(2)
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, 0, 5:15, 5:15] = 1
    masks[0, 0, 40:46, 30:38] = 1
    masks[1, 0, 20:32, 20:25] = 1
    images[0, 0][masks[0, 0] > 0] = 1.0
    images[1, 1][masks[1, 0] > 0] = 1.0
    return images, masks


def red_bank() -> DefectBank:
    patch = torch.zeros(3, 12, 12)
    patch[0] = 1.0
    return DefectBank([DefectCutout(patch, torch.ones(1, 12, 12), 0)], ["red"])


class TestDefectBank:
    def test_cuts_one_region_per_connected_component_with_its_type(self) -> None:
        images, masks = defective_pair()
        bank = DefectBank.from_images(images, masks, ["scratch", "hole"])
        assert bank.type_names == ["hole", "scratch"]
        assert bank.counts() == {"hole": 1, "scratch": 2}
        shapes = sorted(tuple(cutout.mask.shape) for cutout in bank.cutouts)
        assert shapes == [(1, 6, 8), (1, 10, 10), (1, 12, 5)]
        for cutout in bank.cutouts:
            assert cutout.patch.shape[-2:] == cutout.mask.shape[-2:]
            assert cutout.mask.all()
            colour = 0 if bank.type_names[cutout.defect_type] == "scratch" else 1
            assert torch.equal(cutout.patch[colour], torch.ones_like(cutout.patch[colour]))

    def test_given_type_names_fix_the_indices(self) -> None:
        images, masks = defective_pair()
        bank = DefectBank.from_images(images, masks, ["scratch", "hole"], type_names=["scratch", "crack", "hole"])
        assert bank.type_names == ["scratch", "crack", "hole"]
        assert bank.counts() == {"scratch": 2, "crack": 0, "hole": 1}
        with pytest.raises(ValueError, match=r"Defect types \['hole'\] are not in type_names=\['scratch'\]"):
            DefectBank.from_images(images, masks, ["scratch", "hole"], type_names=["scratch"])

    def test_specks_below_min_area_are_skipped(self) -> None:
        images, masks = defective_pair()
        bank = DefectBank.from_images(images, masks, ["scratch", "hole"], min_area=50)
        assert bank.counts() == {"hole": 1, "scratch": 1}

    def test_masks_of_another_size_are_refused_with_both_shapes(self) -> None:
        images, masks = defective_pair()
        with pytest.raises(ValueError, match=r"\(2, 1, 32, 32\) do not match the images of shape \(2, 3, 64, 64\)"):
            DefectBank.from_images(images, masks[..., :32, :32], ["scratch", "hole"])

    def test_one_type_per_image_is_required(self) -> None:
        images, masks = defective_pair()
        with pytest.raises(ValueError, match="1 defect types for 2 defective images"):
            DefectBank.from_images(images, masks, ["scratch"])

    def test_empty_masks_say_that_masks_are_needed(self) -> None:
        images, masks = defective_pair()
        with pytest.raises(ValueError, match="need ground-truth masks"):
            DefectBank.from_images(images, torch.zeros_like(masks), ["scratch", "hole"])

    def test_an_empty_bank_points_at_procedural_seeding(self) -> None:
        with pytest.raises(ValueError, match=r"DefectBank.procedural"):
            DefectBank([], ["scratch"])

    def test_procedural_seeds_make_one_type(self) -> None:
        torch.manual_seed(0)
        bank = DefectBank.procedural(torch.rand(4, 3, 64, 64), count=10)
        assert len(bank) == 10
        assert bank.type_names == ["procedural"]
        assert all(cutout.mask.sum() >= 16 for cutout in bank.cutouts)

    def test_draw_of_a_type_only_returns_that_type(self) -> None:
        images, masks = defective_pair()
        bank = DefectBank.from_images(images, masks, ["scratch", "hole"])
        torch.manual_seed(0)
        assert {bank.draw(defect_type=1).defect_type for _ in range(10)} == {1}


class TestTransforms:
    def test_cutout_augmentation_keeps_patch_and_mask_aligned(self) -> None:
        torch.manual_seed(0)
        augmentation = CutoutAugmentation()
        cutout = DefectCutout(torch.rand(3, 10, 20), torch.ones(1, 10, 20), 2)
        for _ in range(5):
            augmented = augmentation(cutout)
            assert augmented.patch.shape[-2:] == augmented.mask.shape[-2:]
            assert set(augmented.mask.unique().tolist()) <= {0.0, 1.0}
            assert augmented.mask[0].any(dim=0).all() and augmented.mask[0].any(dim=1).all(), "cropped to the mask"
            assert augmented.defect_type == 2
            assert augmented.patch.min() >= 0 and augmented.patch.max() <= 1

    def test_cutout_augmentation_without_strength_is_the_identity(self) -> None:
        augmentation = CutoutAugmentation(0.0, (1.0, 1.0), False, 0.0, 0.0, 0.0, 0.0)
        cutout = DefectCutout(torch.rand(3, 10, 20), torch.ones(1, 10, 20), 0)
        augmented = augmentation(cutout)
        torch.testing.assert_close(augmented.patch, cutout.patch)
        assert torch.equal(augmented.mask, cutout.mask)

    def test_mask_variation_varies_the_outline_and_keeps_the_core(self) -> None:
        torch.manual_seed(0)
        cutout = DefectCutout(torch.rand(3, 24, 24), torch.ones(1, 24, 24), 0)
        varied = [MaskVariation()(cutout) for _ in range(6)]
        outlines = {(tuple(v.mask.shape), v.mask.sum().item()) for v in varied}
        assert len(outlines) > 1, "six variations gave one outline"
        assert any(v.mask.shape != cutout.mask.shape or not torch.equal(v.mask, cutout.mask) for v in varied)
        for variant in varied:
            assert set(variant.mask.unique().tolist()) <= {0.0, 1.0}
            assert variant.patch.shape[-2:] == variant.mask.shape[-2:]
            assert variant.mask.sum() > 0.3 * cutout.mask.sum()

    def test_alpha_paste_changes_only_the_masked_pixels(self) -> None:
        torch.manual_seed(0)
        background = torch.rand(3, 64, 64)
        image, mask = DefectPaste(blending="alpha")(background, red_bank().cutouts[0])
        assert mask.sum() == 144
        outside = mask.expand_as(image) == 0
        assert torch.equal(image[outside], background[outside])
        assert (image[0][mask[0] > 0] > 0.5).float().mean() > 0.8

    def test_poisson_paste_changes_only_the_masked_pixels(self) -> None:
        torch.manual_seed(0)
        background = torch.rand(3, 64, 64)
        image, mask = DefectPaste(blending="poisson")(background, red_bank().cutouts[0])
        outside = mask.expand_as(image) == 0
        torch.testing.assert_close(image[outside], background[outside], atol=1 / 255, rtol=0)
        assert not torch.allclose(image[~outside], background[~outside], atol=0.02)

    def test_a_cutout_larger_than_the_image_is_shrunk_to_fit(self) -> None:
        big = DefectCutout(torch.rand(3, 100, 50), torch.ones(1, 100, 50), 0)
        image, mask = DefectPaste(blending="alpha")(torch.rand(3, 64, 64), big)
        assert image.shape == (3, 64, 64)
        assert 0 < mask.sum() < 64 * 64

    def test_otsu_foreground_places_defects_on_the_object(self) -> None:
        torch.manual_seed(0)
        background = torch.zeros(3, 64, 64)
        background[:, 16:48, 16:48] = 0.8
        paste = DefectPaste(blending="alpha", foreground="otsu")
        small = DefectCutout(torch.zeros(3, 4, 4), torch.ones(1, 4, 4), 0)
        for _ in range(10):
            _, mask = paste(background, small)
            ys, xs = torch.nonzero(mask[0], as_tuple=True)
            assert 14 <= ys.float().mean() <= 50 and 14 <= xs.float().mean() <= 50

    def test_quality_filter(self) -> None:
        normal = flat_images(1)[0]
        mask = torch.zeros(1, 64, 64)
        mask[:, 10:20, 10:20] = 1
        visible = normal + 0.5 * mask
        keep = QualityFilter(min_area=16, max_area_fraction=0.4, min_contrast=0.03)
        assert keep(normal, visible, mask)
        assert not keep(normal, normal, mask), "an invisible defect is rejected"
        assert not keep(normal, visible, mask[..., :0, :0].new_zeros(1, 64, 64)), "an empty mask is rejected"
        assert not keep(normal, normal + 0.5, torch.ones(1, 64, 64)), "a defect covering the image is rejected"


class TestDataAugmentationModule:
    def test_outputs_and_types(self) -> None:
        images, masks = defective_pair()
        bank = DefectBank.from_images(images, masks, ["scratch", "hole"])
        torch.manual_seed(0)
        samples = DataAugmentationModule(bank, probability=1.0)(torch.rand(6, 3, 64, 64))
        assert samples.images.shape == (6, 3, 64, 64)
        assert samples.masks.shape == (6, 1, 64, 64)
        assert samples.defect_types.dtype == torch.long
        present = samples.masks.flatten(1).any(dim=1)
        assert torch.equal(present, samples.defect_types >= 0)
        assert present.sum() >= 4

    def test_probability_zero_keeps_every_image(self) -> None:
        clean = torch.rand(3, 3, 64, 64)
        samples = DataAugmentationModule(red_bank(), probability=0.0)(clean)
        assert torch.equal(samples.images, clean)
        assert not samples.masks.any()
        assert (samples.defect_types == -1).all()

    @pytest.mark.parametrize("probability", [-0.1, 1.5])
    def test_probability_outside_zero_one_is_named(self, probability: float) -> None:
        with pytest.raises(ValueError, match=rf"probability={probability} must be in \[0, 1\]"):
            DataAugmentationModule(red_bank(), probability=probability)

    def test_requested_types_are_honoured(self) -> None:
        images, masks = defective_pair()
        dam = DataAugmentationModule(DefectBank.from_images(images, masks, ["scratch", "hole"]), probability=1.0)
        torch.manual_seed(0)
        samples = dam(torch.rand(4, 3, 64, 64), defect_types=torch.tensor([0, 1, 0, 1]))
        drawn = samples.defect_types[samples.defect_types >= 0]
        expected = torch.tensor([0, 1, 0, 1])[samples.defect_types >= 0]
        assert torch.equal(drawn, expected)

    def test_seeded_draws_repeat(self) -> None:
        dam = DataAugmentationModule(red_bank(), probability=0.7)
        clean = torch.rand(4, 3, 64, 64)
        torch.manual_seed(3)
        first = dam(clean)
        torch.manual_seed(3)
        second = dam(clean)
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b)

    def test_bad_input_shape_is_named(self) -> None:
        with pytest.raises(ValueError, match=r"got shape \(3, 64, 64\)"):
            DataAugmentationModule(red_bank())(torch.rand(3, 64, 64))
