"""Unit tests of the shared building blocks in ``anomalib_diffusion.components``."""

import numpy as np
import pytest
import torch
from anomalib.models.components import GaussianBlur2d
from diffusers.models.upsampling import Upsample2D
from sklearn.ensemble import IsolationForest

from anomalib_diffusion.components import (
    BorderStandardiser,
    SeparableGaussianBlur,
    TensorIsolationForest,
    UNetConfig,
    average_path_length,
    band_moments,
    border_bands,
    build_unet,
    check_image_batch,
    edge_features,
    extract_patches,
    global_l2,
    grid_size,
    make_ddpm_scheduler,
    max_window_l2,
    noise_at_timestep,
    pad_to,
    random_patches,
    seeded_noise,
    sobel_edge_map,
    stitch_patches,
)
from anomalib_diffusion.components.isolation_forest import _float32_floor
from anomalib_diffusion.components.unet import ExportableUpsample2D
from anomalib_diffusion.components.validation import share_problem


class TestTensorIsolationForest:
    @pytest.mark.parametrize(("n_train", "contamination"), [(300, "auto"), (20, "auto"), (500, 0.1)])
    def test_scores_equal_sklearn_decision_function(self, n_train: int, contamination: float | str) -> None:
        rng = np.random.default_rng(n_train)
        train = (rng.normal(size=(n_train, 2)) * [1.0, 5.0]).astype(np.float32)
        queries = np.concatenate([rng.normal(size=(400, 2)).astype(np.float32) * 4, train[:50]])
        forest = TensorIsolationForest(n_estimators=50, contamination=contamination, random_state=3)
        fitted = forest.fit(torch.from_numpy(train))
        expected = -fitted.decision_function(queries)
        actual = forest(torch.from_numpy(queries)).numpy()
        np.testing.assert_allclose(actual, expected, atol=1e-6)

    def test_queries_exactly_on_thresholds_follow_sklearn(self) -> None:
        rng = np.random.default_rng(0)
        train = rng.normal(size=(200, 2)).astype(np.float32)
        forest = TensorIsolationForest(n_estimators=20)
        fitted = forest.fit(train)
        # Every split threshold itself, and its float32 neighbours, as a query value.
        thresholds = np.concatenate([tree.tree_.threshold[tree.tree_.feature >= 0] for tree in fitted.estimators_])
        values = np.concatenate([thresholds, np.nextafter(thresholds, np.inf), np.nextafter(thresholds, -np.inf)])
        queries = np.stack([values, values[::-1]], axis=1).astype(np.float32)
        np.testing.assert_allclose(
            forest(torch.from_numpy(queries)).numpy(), -fitted.decision_function(queries), atol=1e-6
        )

    def test_state_dict_round_trip_into_an_unfitted_forest(self) -> None:
        train = np.random.default_rng(1).normal(size=(100, 2)).astype(np.float32)
        forest = TensorIsolationForest(n_estimators=10)
        forest.fit(train)
        restored = TensorIsolationForest(n_estimators=10)
        assert not restored.is_fitted
        restored.load_state_dict(forest.state_dict())
        assert restored.is_fitted
        assert restored.depth == forest.depth
        queries = torch.randn(30, 2)
        torch.testing.assert_close(restored(queries), forest(queries), rtol=0, atol=0)

    def test_heap_depth_is_read_from_the_buffer_shape(self) -> None:
        forest = TensorIsolationForest(n_estimators=5)
        forest.fit(np.random.default_rng(2).normal(size=(256, 2)).astype(np.float32))
        assert forest.threshold_.shape == (5, 2**forest.depth - 1)
        assert forest.leaf_path_length_.shape == (5, 2**forest.depth)
        assert forest.depth == 8  # sklearn's max_depth = ceil(log2(256))

    def test_fit_rejects_too_few_or_non_finite_samples(self) -> None:
        with pytest.raises(ValueError, match="minimum of 2"):
            TensorIsolationForest().fit(np.zeros((1, 2), dtype=np.float32))
        with pytest.raises(ValueError, match="NaN"):
            TensorIsolationForest().fit(np.array([[0.0, np.nan], [1.0, 2.0]], dtype=np.float32))

    def test_average_path_length_matches_sklearn(self) -> None:
        from sklearn.ensemble._iforest import _average_path_length

        n = np.array([1, 2, 3, 10, 256, 1000])
        np.testing.assert_allclose(average_path_length(n), _average_path_length(n))

    def test_float32_floor_keeps_sklearn_comparisons(self) -> None:
        thresholds = np.array([0.1, -0.3, 1 / 3, 2.0, 1e-8], dtype=np.float64)
        floored = _float32_floor(thresholds)
        assert floored.dtype == np.float32
        assert np.all(floored.astype(np.float64) <= thresholds)
        assert np.all(np.nextafter(floored, np.float32(np.inf)).astype(np.float64) > thresholds)

    def test_sklearn_reference_is_what_we_think(self) -> None:
        forest = IsolationForest(random_state=0).fit(np.random.default_rng(0).normal(size=(50, 2)))
        assert forest.offset_ == -0.5


class TestUNet:
    def test_shapes_and_attention_placement(self) -> None:
        unet = build_unet(UNetConfig(sample_size=32, block_out_channels=(8, 16, 16), attention_resolutions=(8,)))
        assert [type(block).__name__ for block in unet.down_blocks] == ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"]
        assert [type(block).__name__ for block in unet.up_blocks] == ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]
        out = unet(torch.randn(2, 3, 32, 48), 10).sample
        assert out.shape == (2, 3, 32, 48)

    def test_the_middle_block_attention_can_be_left_out(self) -> None:
        with_attention = build_unet(UNetConfig(sample_size=16, block_out_channels=(8, 8), attention_resolutions=()))
        without = build_unet(
            UNetConfig(sample_size=16, block_out_channels=(8, 8), attention_resolutions=(), mid_attention=False)
        )
        assert with_attention.mid_block.attentions[0] is not None
        assert without.mid_block.attentions == [None] or list(without.mid_block.attentions) == [None]
        assert not any("attn" in type(module).__name__.lower() for module in without.modules())
        assert without(torch.randn(1, 3, 16, 24), 10).sample.shape == (1, 3, 16, 24)

    def test_upsampling_is_swapped_and_computes_the_same(self) -> None:
        unet = build_unet(UNetConfig(sample_size=16, block_out_channels=(8, 8)))
        swapped = [module for module in unet.modules() if isinstance(module, Upsample2D)]
        assert swapped
        assert all(type(module) is ExportableUpsample2D for module in swapped)
        reference = Upsample2D(8, use_conv=True)
        reference.load_state_dict(swapped[0].state_dict())
        features = torch.randn(70, 8, 4, 4)  # batch >= 64 takes diffusers' other branch
        torch.testing.assert_close(swapped[0](features), reference(features))

    def test_dynamic_batch_export(self) -> None:
        unet = build_unet(UNetConfig(sample_size=16, block_out_channels=(8, 8), attention_resolutions=(8,))).eval()

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.unet = unet

            def forward(self, sample: torch.Tensor) -> torch.Tensor:
                return self.unet(sample, 10).sample

        batch = torch.export.Dim("batch")
        program = torch.export.export(Wrapper(), (torch.randn(3, 3, 16, 16),), dynamic_shapes=({0: batch},))
        sample = torch.randn(70, 3, 16, 16)
        torch.testing.assert_close(program.module()(sample), Wrapper()(sample), rtol=1e-4, atol=1e-5)

    def test_bad_widths_are_rejected_with_a_hint(self) -> None:
        with pytest.raises(ValueError, match="not divisible by norm_num_groups"):
            UNetConfig(block_out_channels=(12, 16))
        with pytest.raises(ValueError, match="empty"):
            UNetConfig(block_out_channels=())


class TestPatches:
    @pytest.mark.parametrize(("height", "width"), [(64, 64), (70, 90), (33, 65)])
    def test_extract_then_stitch_is_identity(self, height: int, width: int) -> None:
        images = torch.randn(2, 3, height, width)
        size = (grid_size(height, 32, 16), grid_size(width, 32, 16))
        padded = pad_to(images, *size)
        patches = extract_patches(padded, 32, 16)
        assert patches.shape == (2 * ((size[0] - 32) // 16 + 1) * ((size[1] - 32) // 16 + 1), 3, 32, 32)
        torch.testing.assert_close(stitch_patches(patches, 2, size, 16), padded)
        torch.testing.assert_close(padded[..., :height, :width], images)

    def test_patches_are_ordered_image_by_image(self) -> None:
        images = torch.stack([torch.zeros(1, 64, 64), torch.ones(1, 64, 64)])
        patches = extract_patches(images, 32, 32)
        assert patches[:4].eq(0).all()
        assert patches[4:].eq(1).all()

    def test_grid_size(self) -> None:
        assert grid_size(256, 64, 32) == 256
        assert grid_size(250, 64, 32) == 256
        assert grid_size(64, 64, 32) == 64
        assert grid_size(65, 64, 32) == 96

    def test_random_patches_are_crops_of_the_batch(self) -> None:
        images = torch.arange(2 * 3 * 20 * 30, dtype=torch.float32).reshape(2, 3, 20, 30)
        generator = torch.Generator().manual_seed(0)
        patches = random_patches(images, 8, 50, generator=generator)
        assert patches.shape == (50, 3, 8, 8)
        for patch in patches:
            value = int(patch[0, 0, 0])
            index, rest = divmod(value, 3 * 20 * 30)
            top, left = divmod(rest, 30)
            torch.testing.assert_close(patch, images[index, :, top : top + 8, left : left + 8])


class TestEdgesAndNoise:
    def test_sobel_is_zero_on_constant_maps_and_positive_on_edges(self) -> None:
        constant = torch.full((1, 1, 16, 16), 3.0)
        assert sobel_edge_map(constant).abs().max() == 0
        step = torch.zeros(1, 1, 16, 16)
        step[..., 8:] = 1.0
        edges = sobel_edge_map(step)
        assert edges.shape == step.shape
        assert edges[..., 7:9].min() > 0
        assert edges[..., :6].max() == 0

    def test_global_and_window_l2(self) -> None:
        edge_map = torch.zeros(2, 1, 64, 64)
        edge_map[1, :, 8:16, 8:16] = 2.0
        torch.testing.assert_close(global_l2(edge_map), torch.tensor([0.0, (64 * 4 / 4096) ** 0.5]))
        torch.testing.assert_close(max_window_l2(edge_map, 8), torch.tensor([0.0, 2.0]))
        assert edge_features(edge_map, 8).shape == (2, 2)

    def test_seeded_noise_depends_only_on_seed_and_shape(self) -> None:
        torch.manual_seed(123)
        first = seeded_noise((1, 3, 8, 8), seed=5)
        torch.manual_seed(456)
        torch.testing.assert_close(seeded_noise((1, 3, 8, 8), seed=5), first)
        assert not torch.equal(seeded_noise((1, 3, 8, 8), seed=6), first)

    def test_noise_at_timestep_is_the_ddpm_forward_process(self) -> None:
        scheduler = make_ddpm_scheduler()
        samples, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        alpha_bar = scheduler.alphas_cumprod[100]
        expected = alpha_bar.sqrt() * samples + (1 - alpha_bar).sqrt() * noise
        torch.testing.assert_close(noise_at_timestep(scheduler, samples, noise, 100), expected)
        assert scheduler.betas[0] == pytest.approx(1e-4)
        assert scheduler.betas[-1] == pytest.approx(0.02)


class TestImageChecks:
    @pytest.mark.parametrize(
        ("images", "message"),
        [
            (torch.rand(1, 1, 64, 64), "got 1 channels \\(grayscale"),
            (torch.rand(1, 4, 64, 64), "got 4 channels \\(RGBA"),
            (torch.rand(3, 64, 64), "add a batch dimension"),
            (torch.rand(1, 3, 40, 64), "smaller than its patch_size=64"),
            (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "float images scaled to \\[0, 1\\]"),
        ],
    )
    def test_bad_batches_get_a_clear_error(self, images: torch.Tensor, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            check_image_batch(images, "RADAR", 64)

    def test_non_tensor_is_a_type_error(self) -> None:
        with pytest.raises(TypeError, match=r"torch.Tensor"):
            check_image_batch(np.zeros((1, 3, 64, 64)), "RADAR", 64)

    def test_good_batch_passes(self) -> None:
        check_image_batch(torch.rand(2, 3, 64, 80), "RADAR", 64)

    @pytest.mark.parametrize(
        ("value", "problem"), [(0.0, "x=0.0 must be in (0, 1]"), (1.01, "x=1.01 must be in (0, 1]")]
    )
    def test_share_outside_zero_one_is_named(self, value: float, problem: str) -> None:
        assert share_problem("x", value) == problem

    @pytest.mark.parametrize("value", [1e-6, 0.5, 1.0])
    def test_share_inside_zero_one_passes(self, value: float) -> None:
        assert share_problem("x", value) is None


class TestSeparableGaussianBlur:
    def test_matches_anomalibs_full_kernel_blur(self) -> None:
        maps = torch.rand(2, 1, 70, 90, generator=torch.Generator().manual_seed(0))
        full = GaussianBlur2d(sigma=4.0, channels=1, kernel_size=25)
        torch.testing.assert_close(SeparableGaussianBlur(4.0)(maps), full(maps), atol=1e-5, rtol=0)

    def test_channels_are_blurred_each_on_its_own(self) -> None:
        maps = torch.rand(2, 3, 40, 50, generator=torch.Generator().manual_seed(0))
        full = GaussianBlur2d(sigma=2.0, channels=3, kernel_size=13)  # anomalib's depthwise blur of all channels
        blurred = SeparableGaussianBlur(2.0)(maps)
        torch.testing.assert_close(blurred, full(maps), atol=1e-5, rtol=0)
        torch.testing.assert_close(blurred[:, 1:2], SeparableGaussianBlur(2.0)(maps[:, 1:2]), rtol=0, atol=0)

    def test_loads_a_state_dict_that_holds_anomalibs_kernel(self) -> None:
        """RADAR / GLAD checkpoints written with anomalib's blur carry its kernel buffer."""
        old = torch.nn.Sequential(GaussianBlur2d(sigma=2.0, channels=1, kernel_size=13))
        new = torch.nn.Sequential(SeparableGaussianBlur(2.0))
        assert list(old.state_dict()) == ["0.kernel"]
        new.load_state_dict(old.state_dict())  # strict: would fail on an unexpected key
        assert list(new.state_dict()) == []


class TestBorderStandardiser:
    def test_bands_are_the_distance_to_the_nearest_edge_clipped(self) -> None:
        expected = torch.tensor(
            [
                [0, 0, 0, 0, 0, 0],
                [0, 1, 1, 1, 1, 0],
                [0, 1, 2, 2, 1, 0],
                [0, 1, 1, 1, 1, 0],
                [0, 0, 0, 0, 0, 0],
            ]
        )
        torch.testing.assert_close(border_bands(5, 6, 3), expected, rtol=0, atol=0)
        torch.testing.assert_close(border_bands(5, 6, 2), expected.clamp(max=1), rtol=0, atol=0)
        assert border_bands(5, 6, 1).eq(0).all()

    def test_band_moments_are_the_mean_and_mean_square_of_each_band(self) -> None:
        maps = torch.rand(3, 2, 9, 7)
        moments = band_moments(maps, 3)
        bands = border_bands(9, 7, 3)
        assert moments.shape == (3, 2, 3, 2)
        for band in range(3):
            inside = maps[..., bands == band].double()
            torch.testing.assert_close(moments[:, :, band, 0], inside.mean(dim=-1))
            torch.testing.assert_close(moments[:, :, band, 1], inside.pow(2).mean(dim=-1))

    def test_one_band_is_the_plain_standardisation(self) -> None:
        maps = torch.rand(4, 2, 16, 16) * torch.tensor([1.0, 5.0])[:, None, None]
        standardiser = BorderStandardiser(2, 1)
        standardiser.fit(band_moments(maps, 1))
        flat = maps.transpose(0, 1).flatten(1).double()
        expected = (maps - flat.mean(dim=1).float()[:, None, None]) / flat.std(dim=1, correction=0).float()[
            :, None, None
        ]
        torch.testing.assert_close(standardiser(maps), expected, rtol=1e-4, atol=1e-5)

    def test_a_raised_border_of_normal_maps_is_standardised_away(self) -> None:
        generator = torch.Generator().manual_seed(0)
        raised = torch.ones(32, 32)
        raised[2:-2, 2:-2] = 0  # two rings of pixels sit 6 std above the inside on every map
        normal = torch.randn(8, 1, 32, 32, generator=generator) + 6 * raised
        defect = torch.randn(1, 1, 32, 32, generator=generator) + 6 * raised
        defect[..., 14:18, 14:18] += 5  # a defect inside, weaker than the border
        for bands, border_wins in ((1, True), (3, False)):
            standardiser = BorderStandardiser(1, bands)
            standardiser.fit(band_moments(normal, bands))
            scored = standardiser(defect)[0, 0]
            assert bool(scored.max() == scored[raised.bool()].max()) is border_wins
        per_band = band_moments(standardiser(normal), 3).mean(dim=0)[0]
        torch.testing.assert_close(per_band[:, 0], torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(per_band[:, 1], torch.ones(3, dtype=torch.float64), atol=1e-4, rtol=0)

    def test_bands_missing_from_small_maps_take_the_innermost_fitted_band(self) -> None:
        small = torch.rand(4, 2, 6, 6)  # bands 0-2 only
        standardiser = BorderStandardiser(2, 8)
        standardiser.fit(band_moments(small, 8))
        torch.testing.assert_close(standardiser.mean[:, 3:], standardiser.mean[:, 2:3].expand(-1, 5))
        torch.testing.assert_close(standardiser.std[:, 3:], standardiser.std[:, 2:3].expand(-1, 5))
        assert torch.isfinite(standardiser(torch.rand(1, 2, 40, 40))).all()

    def test_statistics_of_one_value_per_channel_load_into_every_band(self) -> None:
        standardiser = BorderStandardiser(2, 4)
        standardiser.load_state_dict({"mean": torch.tensor([1.0, 2.0]), "std": torch.tensor([3.0, 4.0])})
        torch.testing.assert_close(standardiser.mean, torch.tensor([[1.0] * 4, [2.0] * 4]))
        torch.testing.assert_close(standardiser.std, torch.tensor([[3.0] * 4, [4.0] * 4]))

    @pytest.mark.parametrize("bands", [0, -1, 2.5, True])
    def test_bad_band_counts_are_refused(self, bands: object) -> None:
        with pytest.raises(ValueError, match=r"border_bands=.* must be an integer of at least 1"):
            BorderStandardiser(2, bands)  # type: ignore[arg-type]

    def test_moments_of_another_shape_are_refused(self) -> None:
        with pytest.raises(ValueError, match=r"Expected band moments of shape \(N, 2, 4, 2\)"):
            BorderStandardiser(2, 4).fit(torch.zeros(3, 2, 1, 2))
