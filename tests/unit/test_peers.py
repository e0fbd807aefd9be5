"""anomalib's PaDiM, PatchCore and DRAEM set up offline (anomalib_diffusion.models.peers, configs/benchmark.yaml)."""

from pathlib import Path

import pytest
import timm
import torch

from anomalib_diffusion.components.features import EfficientNetLite0Features
from anomalib_diffusion.components.offline_backbones import LITE0_BACKBONE, converted_lite0_weights
from anomalib_diffusion.models import DraemOffline, PadimLite0, PatchcoreLite0, peers


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMALIB_DIFFUSION_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_timm_tag_loads_the_wheel_weights_offline() -> None:
    features = timm.create_model(LITE0_BACKBONE, pretrained=True, features_only=True, out_indices=(1, 2, 4)).eval()
    reference = EfficientNetLite0Features(layers=(1, 2, 4))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        for ours, theirs in zip(features(images), reference(images), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # The full classifier loads too (the converted file has the head), and is a real ImageNet net, not noise.
    classifier = timm.create_model(LITE0_BACKBONE, pretrained=True).eval()
    with torch.no_grad():
        assert classifier(images).softmax(-1).max() > 0.01


def test_converted_weights_are_written_once_and_whole(tmp_path: Path) -> None:
    path = converted_lite0_weights(tmp_path)
    assert path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no *.part left behind
    modified = path.stat().st_mtime_ns
    assert converted_lite0_weights(tmp_path) == path
    assert path.stat().st_mtime_ns == modified


@pytest.mark.parametrize("model_class", [PadimLite0, PatchcoreLite0])
def test_lite0_peers_use_the_offline_backbone_and_its_input_range(model_class: type) -> None:
    model = model_class()
    extractor = model.model.feature_extractor.feature_extractor
    reference = EfficientNetLite0Features().backbone.state_dict()
    for key, value in extractor.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    scaled = model.pre_processor.transform(torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)]))
    assert scaled.shape == (2, 3, 256, 256)
    assert torch.equal(scaled[0], torch.full_like(scaled[0], -1.0))
    assert torch.equal(scaled[1], torch.full_like(scaled[1], 1.0))


def test_lite0_peers_without_the_wheel_name_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "lite0_wheel_installed", lambda: False)
    with pytest.raises(ImportError, match=r"PadimLite0 needs .*pip install 'anomalib-diffusion\[pretrained\]'"):
        PadimLite0()


def test_procedural_textures_are_deterministic_and_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folders = []
    for name in ("first", "second"):
        monkeypatch.setenv("ANOMALIB_DIFFUSION_CACHE", str(tmp_path / name))
        folders.append(peers.procedural_texture_dir(count=3, size=32, seed=5))
    first, second = ([path.read_bytes() for path in sorted(folder.iterdir())] for folder in folders)
    assert len(first) == 3
    assert first == second
    assert [path.name for path in (tmp_path / "first").iterdir()] == [folders[0].name]  # no hidden build folder


def test_draem_offline_bounds_training_and_needs_no_download(tmp_path: Path) -> None:
    (tmp_path / "textures").mkdir()
    model = DraemOffline(texture_dir=tmp_path / "textures", max_epochs=3)
    assert model.trainer_arguments["max_epochs"] == 3
    assert model.trainer_arguments["gradient_clip_val"] == 0  # DRAEM's own arguments are kept
    default = DraemOffline(max_epochs=1)
    assert len(default.augmenter.anomaly_source_paths) == peers.TEXTURE_COUNT


def test_draem_offline_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"texture_dir .* is not a folder"):
        DraemOffline(texture_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="max_epochs must be at least 1"):
        DraemOffline(max_epochs=0)


def test_get_model_resolves_the_peers() -> None:
    """By class path, as ``anomalib benchmark`` asks; tests/unit/test_registration.py runs the CLI with them."""
    from anomalib.models import get_model

    assert type(get_model({"class_path": "PatchcoreLite0", "init_args": {"num_neighbors": 3}})) is PatchcoreLite0
