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
            ({"stroke_fraction": -0.1}, "stroke_fraction=-0.1"),
            ({"stroke_length_range": (0.5, 0.1)}, "stroke_length_range"),
            ({"stroke_width_range": (0.0, 2.0)}, "stroke_width_range"),
        ],
    )
    def test_invalid_settings_are_named(self, settings: dict, named: str) -> None:
        with pytest.raises(ValueError, match=named):
            PerlinAnomalySynthesis(**settings)

    def test_strokes_are_thin_and_long(self) -> None:
        """A stroke's mask is one thin band: its area is about length x width, its extent about its length."""
        torch.manual_seed(6)
        synthesis = PerlinAnomalySynthesis(
            probability=1.0, stroke_fraction=1.0, stroke_length_range=(0.4, 0.4), stroke_width_range=(4.0, 4.0)
        )
        for _ in range(10):
            mask = synthesis.stroke_mask(256, 256)[0]
            area = int(mask.sum())
            if area == 0:  # centred near a corner, wholly clipped: possible, rare
                continue
            rows, cols = mask.nonzero(as_tuple=True)
            extent = max(int(rows.max() - rows.min()), int(cols.max() - cols.min())) + 1
            assert area <= 1.3 * 0.4 * 256 * 4, "no wider than asked"
            assert extent <= 0.4 * 256 + 4
            assert area / extent <= 8, f"thin: {area} px over an extent of {extent}"

    def test_without_strokes_the_random_stream_is_unchanged(self) -> None:
        """stroke_fraction=0 (the default) makes no extra draw: GLAD's and D-ADDA's defaults repeat as before."""
        results = []
        for settings in ({}, {"stroke_fraction": 0.0}):
            torch.manual_seed(7)
            results.append(PerlinAnomalySynthesis(probability=1.0, **settings)(images()))
        assert torch.equal(results[0][0], results[1][0])
        assert torch.equal(results[0][1], results[1][1])

    def test_stroke_share_follows_stroke_fraction(self) -> None:
        """Strokes cover far less of the image than Perlin blobs: half of the samples are thin at 0.5."""
        torch.manual_seed(8)
        _, masks = PerlinAnomalySynthesis(probability=1.0, stroke_fraction=0.5)(torch.rand(60, 3, 64, 64))
        thin = (masks.flatten(1).mean(dim=1) < 0.06).float().mean().item()
        assert 0.3 < thin < 0.75, f"{thin:.2f} of the masks thin"
        torch.manual_seed(8)
        _, blobs = PerlinAnomalySynthesis(probability=1.0)(torch.rand(60, 3, 64, 64))
        assert (blobs.flatten(1).mean(dim=1) < 0.06).float().mean().item() < thin

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
