"""Unit tests of the offline demo data set in ``anomalib_diffusion.data.demo``."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_diffusion.data import DEMO_CATEGORIES, DEMO_DEFECT_TYPES, demo, make_demo_dataset
from anomalib_diffusion.data.demo import _render_sample, main

SMALL = {"n_train": 4, "n_test_good": 2, "n_test_per_defect": 2, "image_size": 64, "progress": False}


def expected_files(n_train: int, n_test_good: int, n_test_per_defect: int) -> set[str]:
    files = {".demo_dataset.json"}
    files |= {f"train/good/{index:03d}.png" for index in range(n_train)}
    files |= {f"test/good/{index:03d}.png" for index in range(n_test_good)}
    for defect in DEMO_DEFECT_TYPES:
        files |= {f"test/{defect}/{index:03d}.png" for index in range(n_test_per_defect)}
        files |= {f"ground_truth/{defect}/{index:03d}_mask.png" for index in range(n_test_per_defect)}
    return files


def relative_files(directory: Path) -> set[str]:
    return {path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file()}


def file_bytes(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def source_env() -> dict[str, str]:
    """Environment in which a child Python imports this checkout's package, installed or not."""
    source = str(Path(demo.__file__).parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), seed=0, **SMALL)


class TestLayout:
    def test_default_categories_get_exactly_the_mvtec_ad_files(self, small_root: Path) -> None:
        assert sorted(path.name for path in small_root.iterdir()) == sorted(DEMO_CATEGORIES)
        for category in DEMO_CATEGORIES:
            assert relative_files(small_root / category) == expected_files(4, 2, 2)

    def test_at_least_three_defect_types(self) -> None:
        assert len(DEMO_DEFECT_TYPES) >= 3

    def test_returns_absolute_root(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        root = make_demo_dataset("relative", categories="brick", **SMALL)
        assert root == tmp_path / "relative"
        assert (root / "brick" / "train" / "good" / "000.png").is_file()

    def test_zero_test_images_give_train_only(self, tmp_path: Path) -> None:
        counts = {"n_train": 2, "n_test_good": 0, "n_test_per_defect": 0}
        make_demo_dataset(tmp_path, categories=("gravel",), **{**SMALL, **counts})
        assert relative_files(tmp_path / "gravel") == expected_files(2, 0, 0)

    def test_file_names_widen_past_999_images(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        # Rendering is stubbed out: only the naming is under test here.
        blank = np.zeros((32, 32, 3), dtype=np.uint8)
        monkeypatch.setattr(demo, "_render_sample", lambda *_: (blank, blank, np.zeros((32, 32), dtype=bool)))

        def touch(_: np.ndarray, path: Path) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()

        monkeypatch.setattr(demo, "_save_png", touch)
        counts = {"n_train": 1001, "n_test_good": 0, "n_test_per_defect": 0}
        make_demo_dataset(tmp_path, categories="brick", **{**SMALL, **counts})
        names = sorted(path.name for path in (tmp_path / "brick" / "train" / "good").iterdir())
        assert names[0] == "0000.png"
        assert names[-1] == "1000.png"


class TestImagesAndMasks:
    def test_images_are_rgb_with_distinct_channels(self, small_root: Path) -> None:
        for path in small_root.rglob("*.png"):
            if "ground_truth" in path.parts:
                continue
            image = Image.open(path)
            assert image.mode == "RGB"
            pixels = np.asarray(image).astype(int)
            assert pixels.shape == (64, 64, 3)
            assert (pixels[..., 0] != pixels[..., 1]).any()
            assert (pixels[..., 1] != pixels[..., 2]).any()

    def test_masks_are_binary_single_channel_non_empty_and_moderate(self, small_root: Path) -> None:
        for category in DEMO_CATEGORIES:
            for defect in DEMO_DEFECT_TYPES:
                for mask_path in (small_root / category / "ground_truth" / defect).iterdir():
                    mask = Image.open(mask_path)
                    assert mask.mode == "L"
                    values = np.asarray(mask)
                    image = load(small_root / category / "test" / defect / mask_path.name.replace("_mask", ""))
                    assert values.shape == image.shape[:2]
                    assert set(np.unique(values)) == {0, 255}
                    assert 0.003 <= (values == 255).mean() <= 0.05

    @pytest.mark.parametrize("category", list(DEMO_CATEGORIES))
    @pytest.mark.parametrize("defect", DEMO_DEFECT_TYPES)
    def test_mask_is_exactly_where_pixels_changed(self, category: str, defect: str) -> None:
        for index in range(3):
            clean, image, mask = _render_sample(category, "test", defect, index, 64, 0)
            assert clean.dtype == image.dtype == np.uint8
            assert mask.dtype == bool
            assert mask.any()
            np.testing.assert_array_equal(image[~mask], clean[~mask])
            np.testing.assert_array_equal((image != clean).any(axis=-1), mask)

    def test_saved_files_are_the_rendered_samples(self, small_root: Path) -> None:
        for defect in DEMO_DEFECT_TYPES:
            _, image, mask = _render_sample("grass", "test", defect, 1, 64, 0)
            np.testing.assert_array_equal(load(small_root / "grass" / "test" / defect / "001.png"), image)
            saved_mask = load(small_root / "grass" / "ground_truth" / defect / "001_mask.png")
            np.testing.assert_array_equal(saved_mask, mask * 255)

    def test_defects_are_visible(self) -> None:
        # A change of a few gray levels would be an exact but useless mask.
        for category in DEMO_CATEGORIES:
            for defect in DEMO_DEFECT_TYPES:
                clean, image, mask = _render_sample(category, "test", defect, 0, 128, 0)
                change = np.abs(image.astype(int) - clean.astype(int)).max(axis=-1)[mask]
                assert np.median(change) >= 40, (category, defect)

    def test_good_samples_are_clean(self) -> None:
        clean, image, mask = _render_sample("brick", "train", "good", 0, 64, 0)
        np.testing.assert_array_equal(image, clean)
        assert not mask.any()

    def test_train_and_test_are_different_crops(self, small_root: Path) -> None:
        for category in DEMO_CATEGORIES:
            train = [load(path) for path in (small_root / category / "train" / "good").iterdir()]
            test = [load(path) for path in (small_root / category / "test" / "good").iterdir()]
            images = [image.tobytes() for image in train + test]
            assert len(set(images)) == len(images)


class TestDeterminism:
    def test_same_arguments_give_byte_identical_files(self, small_root: Path, tmp_path: Path) -> None:
        again = make_demo_dataset(tmp_path, seed=0, **SMALL)
        assert file_bytes(again) == file_bytes(small_root)

    def test_different_seed_gives_different_images(self, small_root: Path, tmp_path: Path) -> None:
        other = file_bytes(make_demo_dataset(tmp_path, categories=("brick",), seed=1, **SMALL))
        same = file_bytes(small_root)
        images = [name for name in other if name.endswith(".png") and "ground_truth" not in name]
        assert images
        assert all(other[name] != same[name] for name in images)

    def test_a_sample_does_not_depend_on_the_other_counts(self, small_root: Path, tmp_path: Path) -> None:
        make_demo_dataset(tmp_path, categories=("brick",), seed=0, **{**SMALL, "n_train": 1, "n_test_per_defect": 3})
        for name in ("train/good/000.png", "test/good/001.png", "test/stain/001.png", "ground_truth/hole/000_mask.png"):
            assert (tmp_path / "brick" / name).read_bytes() == (small_root / "brick" / name).read_bytes()


class TestValidation:
    @pytest.mark.parametrize(
        ("arguments", "message"),
        [
            ({"categories": ("brick", "carpet")}, r"'carpet'; choose from brick, grass, gravel"),
            ({"categories": ()}, r"categories is empty"),
            ({"image_size": 16}, r"image_size must be an integer from 32 to 512.*got 16"),
            ({"image_size": 1024}, r"image_size must be an integer from 32 to 512.*got 1024"),
            ({"image_size": 64.0}, r"image_size .* got 64.0"),
            ({"n_train": 0}, r"n_train must be an integer >= 1, got 0"),
            ({"n_test_good": -1}, r"n_test_good must be an integer >= 0, got -1"),
            ({"n_test_per_defect": -3}, r"n_test_per_defect must be an integer >= 0, got -3"),
            ({"n_train": True}, r"n_train must be an integer"),
            ({"seed": -1}, r"seed must be an integer >= 0, got -1; pass a non-negative seed"),
            ({"seed": "0"}, r"seed must be an integer >= 0, got '0'"),
        ],
    )
    def test_bad_arguments_raise_before_touching_the_disk(
        self,
        tmp_path: Path,
        arguments: dict,
        message: str,
    ) -> None:
        root = tmp_path / "demo"
        with pytest.raises(ValueError, match=message):
            make_demo_dataset(root, **{**SMALL, **arguments})
        assert not root.exists()

    def test_numpy_integers_are_accepted(self, tmp_path: Path) -> None:
        counts = {"n_train": np.int64(2), "n_test_good": np.int32(1), "n_test_per_defect": np.uint8(1)}
        numpy_arguments = {**counts, "image_size": np.int64(32), "seed": np.int64(5)}
        make_demo_dataset(tmp_path, categories="brick", **{**SMALL, **numpy_arguments})
        assert relative_files(tmp_path / "brick") == expected_files(2, 1, 1)


class TestAtomicityAndReuse:
    def test_failure_midway_leaves_nothing_behind(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        real_save = demo._save_png
        calls = []

        def failing_save(array: np.ndarray, path: Path) -> None:
            calls.append(path)
            if len(calls) == 20:
                msg = "disk full"
                raise OSError(msg)
            real_save(array, path)

        monkeypatch.setattr(demo, "_save_png", failing_save)
        # brick needs 4 + 2 + 2 * 4 * 2 = 22 files, so the failure hits it late in its build.
        with pytest.raises(OSError, match="disk full"):
            make_demo_dataset(tmp_path, categories=("brick", "grass"), **SMALL)
        assert list(tmp_path.iterdir()) == []

    def test_failure_in_a_later_category_keeps_the_finished_ones(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        real_render = demo._render_sample

        def render(category: str, *args: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            if category == "grass":
                raise KeyboardInterrupt
            return real_render(category, *args)

        monkeypatch.setattr(demo, "_render_sample", render)
        with pytest.raises(KeyboardInterrupt):
            make_demo_dataset(tmp_path, categories=("brick", "grass"), **SMALL)
        assert [path.name for path in tmp_path.iterdir()] == ["brick"]
        assert relative_files(tmp_path / "brick") == expected_files(4, 2, 2)

    def test_complete_set_with_same_arguments_is_reused(
        self,
        small_root: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        before = file_bytes(small_root)

        def must_not_render(*_: object) -> None:
            pytest.fail("an existing complete demo set was rebuilt")

        monkeypatch.setattr(demo, "_render_sample", must_not_render)
        assert make_demo_dataset(small_root, seed=0, **SMALL) == small_root
        assert file_bytes(small_root) == before

    def test_foreign_folder_is_refused_then_replaced_with_overwrite(self, tmp_path: Path) -> None:
        (tmp_path / "brick").mkdir()
        (tmp_path / "brick" / "notes.txt").write_text("not demo data")
        message = r"brick already exists and is not a complete demo data set; pass overwrite=True"
        with pytest.raises(FileExistsError, match=message):
            make_demo_dataset(tmp_path, categories=("grass", "brick"), **SMALL)
        # The conflict is found before anything is built.
        assert [path.name for path in tmp_path.iterdir()] == ["brick"]
        make_demo_dataset(tmp_path, categories=("brick",), overwrite=True, **SMALL)
        assert relative_files(tmp_path / "brick") == expected_files(4, 2, 2)
        assert [path.name for path in tmp_path.iterdir()] == ["brick"]

    def test_set_built_with_other_arguments_is_refused_then_rebuilt(self, tmp_path: Path) -> None:
        make_demo_dataset(tmp_path, categories=("brick",), **SMALL)
        with pytest.raises(FileExistsError, match=r"built with other arguments; pass overwrite=True"):
            make_demo_dataset(tmp_path, categories=("brick",), **{**SMALL, "n_train": 5})
        make_demo_dataset(tmp_path, categories=("brick",), overwrite=True, **{**SMALL, "n_train": 5})
        assert relative_files(tmp_path / "brick") == expected_files(5, 2, 2)


def write_texture(path: Path, size: tuple[int, int], seed: int, colour: bool = False) -> Path:
    """A synthetic texture photograph (smoothed noise), grey unless ``colour``: the suite ships no third-party image."""
    rng = np.random.default_rng(seed)
    height, width = size
    coarse = rng.random((height // 8, width // 8, 3 if colour else 1))
    pixels = np.kron(coarse, np.ones((8, 8, 1))) * 0.7 + rng.random((height, width, 1)) * 0.3
    pixels = np.round(pixels * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels if colour else pixels[..., 0]).save(path)
    return path


@pytest.fixture
def texture_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "textures"
    write_texture(folder / "canvas.png", (96, 80), seed=1)  # grey and not square
    write_texture(folder / "tiles.jpg", (80, 80), seed=2, colour=True)
    (folder / "notes.txt").write_text("not an image")
    return folder


class TestTextureFolder:
    def test_every_photograph_becomes_a_category(self, texture_folder: Path, tmp_path: Path) -> None:
        assert list(demo.texture_categories(texture_folder)) == ["canvas", "tiles"]
        root = make_demo_dataset(tmp_path / "data", textures=texture_folder, **SMALL)
        assert sorted(path.name for path in root.iterdir()) == ["canvas", "tiles"]
        for category in ("canvas", "tiles"):
            assert relative_files(root / category) == expected_files(4, 2, 2)
        marker = json.loads((root / "canvas" / ".demo_dataset.json").read_text())
        assert marker["texture"] == "canvas.png"
        assert len(marker["texture_sha256"]) == 64

    def test_grey_photographs_are_tinted_and_colour_ones_kept(self, texture_folder: Path, tmp_path: Path) -> None:
        root = make_demo_dataset(tmp_path / "data", textures=texture_folder, **SMALL)
        grey = load(root / "canvas" / "train" / "good" / "000.png").astype(int)
        assert (grey[..., 0] != grey[..., 2]).mean() > 0.9, "a grey photograph gets a colour ramp"
        source = np.asarray(Image.open(texture_folder / "tiles.jpg").convert("RGB")).astype(int)
        colour = load(root / "tiles" / "train" / "good" / "000.png").astype(int)
        channel_order = lambda pixels: np.argsort(pixels.reshape(-1, 3).mean(axis=0))  # noqa: E731
        np.testing.assert_array_equal(channel_order(colour), channel_order(source))

    def test_defects_and_masks_follow_the_demo_rules(self, texture_folder: Path) -> None:
        source = str(texture_folder / "canvas.png")
        for defect in DEMO_DEFECT_TYPES:
            clean, image, mask = _render_sample(source, "test", defect, 0, 64, 0)
            np.testing.assert_array_equal((image != clean).any(axis=-1), mask)
            assert 0.003 <= mask.mean() <= 0.05

    def test_images_do_not_depend_on_where_the_folder_lies(self, texture_folder: Path, tmp_path: Path) -> None:
        moved = tmp_path / "elsewhere" / "textures"
        shutil.copytree(texture_folder, moved)
        first = make_demo_dataset(tmp_path / "a", textures=texture_folder, categories="canvas", **SMALL)
        second = make_demo_dataset(tmp_path / "b", textures=moved, categories="canvas", **SMALL)
        assert file_bytes(first) == file_bytes(second)

    def test_a_changed_photograph_is_not_taken_for_the_built_set(self, texture_folder: Path, tmp_path: Path) -> None:
        make_demo_dataset(tmp_path / "data", textures=texture_folder, categories="canvas", **SMALL)
        write_texture(texture_folder / "canvas.png", (96, 80), seed=9)
        with pytest.raises(FileExistsError, match="built with other arguments"):
            make_demo_dataset(tmp_path / "data", textures=texture_folder, categories="canvas", **SMALL)

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ("missing", r"textures='.*missing' is not a folder; pass a folder of texture photographs"),
            ("empty", r"empty holds no texture image; put \.png"),
            ("clash", r"canvas\.jpg and canvas\.png would both be category 'canvas'; rename one"),
            ("unknown", r"Unknown texture in .* 'brick'; choose from canvas, tiles"),
            ("too_large", r"image_size must be an integer from 32 to 80, .*smallest photograph in .* is 80 px"),
        ],
    )
    def test_bad_folders_are_named_before_anything_is_written(
        self, texture_folder: Path, tmp_path: Path, change: str, message: str
    ) -> None:
        arguments = {"textures": texture_folder}
        if change == "missing":
            arguments["textures"] = tmp_path / "missing"
        elif change == "empty":
            arguments["textures"] = tmp_path / "empty"
            arguments["textures"].mkdir()
        elif change == "clash":
            write_texture(texture_folder / "canvas.jpg", (64, 64), seed=3)
        elif change == "unknown":
            arguments["categories"] = "brick"
        root = tmp_path / "data"
        with pytest.raises(ValueError, match=message):
            make_demo_dataset(root, **{**SMALL, **arguments, **({"image_size": 96} if change == "too_large" else {})})
        assert not root.exists()

    def test_command_line_takes_a_texture_folder(self, texture_folder: Path, tmp_path: Path) -> None:
        argv = ["--root", str(tmp_path / "data"), "--textures", str(texture_folder), "--categories", "tiles"]
        main(
            [
                *argv,
                "--n-train",
                "2",
                "--n-test-good",
                "1",
                "--n-test-per-defect",
                "1",
                "--image-size",
                "32",
                "--no-progress",
            ]
        )
        assert relative_files(tmp_path / "data" / "tiles") == expected_files(2, 1, 1)


class TestAnomalibReaders:
    def test_mvtecad_datamodule_reads_the_set(self, small_root: Path) -> None:
        from anomalib.data import MVTecAD

        datamodule = MVTecAD(root=small_root, category="brick", train_batch_size=4, eval_batch_size=4, num_workers=0)
        datamodule.setup()
        assert len(datamodule.train_data) == 4
        assert len(datamodule.test_data) == 2 + 2 * len(DEMO_DEFECT_TYPES)
        samples = datamodule.test_data.samples
        assert (samples.label_index == 0).sum() == 2
        assert (samples.label_index == 1).sum() == 2 * len(DEMO_DEFECT_TYPES)
        assert set(samples.label) == {"good", *DEMO_DEFECT_TYPES}
        for item in (datamodule.test_data[index] for index in range(len(datamodule.test_data))):
            assert tuple(item.image.shape) == (3, 64, 64)
            assert bool(item.gt_mask.any()) == bool(item.gt_label)
            if item.gt_label:
                expected = load(Path(item.mask_path)) > 0
                np.testing.assert_array_equal(item.gt_mask.numpy().astype(bool), expected)
        batch = next(iter(datamodule.train_dataloader()))
        assert tuple(batch.image.shape) == (4, 3, 64, 64)

    def test_folder_datamodule_reads_one_defect_type(self, small_root: Path) -> None:
        from anomalib.data import Folder

        datamodule = Folder(
            name="brick_scratch",
            root=small_root / "brick",
            normal_dir="train/good",
            abnormal_dir="test/scratch",
            normal_test_dir="test/good",
            mask_dir="ground_truth/scratch",
            train_batch_size=4,
            eval_batch_size=4,
            num_workers=0,
        )
        datamodule.setup()
        assert len(datamodule.train_data) == 4
        # Folder's default validation split takes half of the test set.
        assert len(datamodule.test_data) + len(datamodule.val_data) == 4


class TestCommandLine:
    def test_main_builds_and_prints_the_path(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        argv = ["--root", str(tmp_path), "--categories", "gravel", "--n-train", "2", "--n-test-good", "1"]
        main([*argv, "--n-test-per-defect", "1", "--image-size", "32", "--seed", "3", "--no-progress"])
        output = capsys.readouterr()
        assert output.out == f"{tmp_path}\n"
        assert output.err == ""
        assert relative_files(tmp_path / "gravel") == expected_files(2, 1, 1)

    def test_module_run_builds_a_set_the_function_then_reuses(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        argv = ["--root", str(tmp_path), "--categories", "brick", "--n-train", "2", "--n-test-good", "1"]
        argv += ["--n-test-per-defect", "1", "--image-size", "32", "--no-progress"]
        command = [sys.executable, "-m", "anomalib_diffusion.data.demo", *argv]
        result = subprocess.run(command, capture_output=True, text=True, env=source_env(), check=True)
        assert result.stdout == f"{tmp_path}\n"
        assert result.stderr == ""
        monkeypatch.setattr(demo, "_render_sample", lambda *_: pytest.fail("a set built from the shell was rebuilt"))
        make_demo_dataset(tmp_path, categories="brick", n_train=2, n_test_good=1, n_test_per_defect=1, image_size=32)

    def test_main_reports_bad_arguments_as_usage_errors(
        self,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        with pytest.raises(SystemExit) as exit_info:
            main(["--root", str(tmp_path / "demo"), "--image-size", "8", "--no-progress"])
        assert exit_info.value.code == 2
        assert "image_size must be an integer from 32 to 512" in capsys.readouterr().err

    def test_progress_bar_goes_to_stderr(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        make_demo_dataset(tmp_path, categories=("brick",), **{**SMALL, "progress": True})
        output = capsys.readouterr()
        assert output.out == ""
        assert "demo data" in output.err


def test_importing_the_package_is_cheap() -> None:
    code = "import sys, anomalib_diffusion.data; print(sorted({'torch', 'cv2', 'anomalib'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=source_env(), check=True)
    assert result.stdout.strip() == "[]"
