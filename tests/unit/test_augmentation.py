"""Unit tests of the synthetic-anomaly transform (GLAD's ATP, reusable by other models)."""

import pytest
import torch

from anomalib_diffusion.augmentation import PerlinAnomalySynthesis, otsu_foreground, shuffle_blocks


def images(batch: int = 6, size: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(batch, 3, size, size)


class TestPerlinAnomalySynthesis:
    def test_shapes_and_binary_masks(self) -> None:
        torch.manual_seed(1)
        output, masks = PerlinAnomalySynthesis(probability=1.0)(images())
        assert output.shape == (6, 3, 64, 64)
        assert masks.shape == (6, 1, 64, 64)
        assert set(masks.unique().tolist()) <= {0.0, 1.0}
        assert output.min() >= 0
        assert output.max() <= 1

    def test_pixels_outside_the_mask_are_untouched_and_inside_are_changed(self) -> None:
        clean = images()
        torch.manual_seed(2)
        output, masks = PerlinAnomalySynthesis(probability=1.0, blend_range=(0.0, 0.0))(clean)
        outside = masks.expand_as(clean) == 0
        assert torch.equal(output[outside], clean[outside])
        assert masks.flatten(1).sum(1).gt(0).all(), "every sample asked to be anomalous got a non-empty mask"
        inside = ~outside
        assert (output[inside] - clean[inside]).abs().mean() > 0.05

    def test_probability_zero_keeps_every_sample_clean(self) -> None:
        clean = images()
        output, masks = PerlinAnomalySynthesis(probability=0.0)(clean)
        assert torch.equal(output, clean)
        assert not masks.any()

    def test_about_half_the_samples_stay_clean_by_default(self) -> None:
        torch.manual_seed(3)
        _, masks = PerlinAnomalySynthesis()(torch.rand(200, 3, 32, 32))
        anomalous = masks.flatten(1).any(dim=1).float().mean().item()
        assert 0.35 < anomalous < 0.65

    def test_masks_stay_inside_the_otsu_foreground(self) -> None:
        # A bright square object on a dark background.
        batch = torch.full((4, 3, 64, 64), 0.1)
        batch[:, :, 16:48, 16:48] = 0.9
        torch.manual_seed(4)
        _, masks = PerlinAnomalySynthesis(probability=1.0, foreground="otsu")(batch)
        outside_object = torch.ones(64, 64, dtype=torch.bool)
        outside_object[16:48, 16:48] = False
        assert masks.any()
        assert not masks[:, 0, outside_object].any()

    def test_seeded_runs_repeat(self) -> None:
        def run() -> tuple[torch.Tensor, torch.Tensor]:
            torch.manual_seed(5)
            return PerlinAnomalySynthesis(probability=1.0, generator=torch.Generator().manual_seed(5))(images())

        first, second = run(), run()
        assert torch.equal(first[0], second[0])
        assert torch.equal(first[1], second[1])

    @pytest.mark.parametrize(
        ("settings", "named"),
        [
            ({"probability": 1.5}, "probability=1.5"),
            ({"blend_range": (0.5, 0.2)}, "blend_range"),
            ({"fill_modes": ("paint",)}, "fill_modes"),
            ({"foreground": "grabcut"}, "foreground='grabcut'"),
            ({"threshold": 2.0}, "threshold=2.0"),
        ],
    )
    def test_invalid_settings_are_named(self, settings: dict, named: str) -> None:
        with pytest.raises(ValueError, match=named):
            PerlinAnomalySynthesis(**settings)

    def test_rejects_unbatched_images(self) -> None:
        with pytest.raises(ValueError, match="batch, channels, height, width"):
            PerlinAnomalySynthesis()(torch.rand(3, 32, 32))


def test_shuffle_blocks_permutes_whole_blocks() -> None:
    image = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8)
    shuffled = shuffle_blocks(image, grid=4, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(shuffled, image)
    blocks = {tuple(image[:, r : r + 2, c : c + 2].flatten().tolist()) for r in range(0, 8, 2) for c in range(0, 8, 2)}
    moved = {
        tuple(shuffled[:, r : r + 2, c : c + 2].flatten().tolist()) for r in range(0, 8, 2) for c in range(0, 8, 2)
    }
    assert blocks == moved


def test_shuffle_blocks_rejects_a_grid_finer_than_the_image() -> None:
    with pytest.raises(ValueError, match="lower shuffle_grid"):
        shuffle_blocks(torch.rand(3, 4, 4), grid=8)


def test_otsu_foreground_is_the_side_away_from_the_border() -> None:
    dark_object = torch.full((3, 32, 32), 0.9)
    dark_object[:, 8:24, 8:24] = 0.2
    mask = otsu_foreground(dark_object)[0]
    assert mask[8:24, 8:24].all()
    assert mask.sum() == 16 * 16
