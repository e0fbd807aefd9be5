"""Quality floors: with a fixed seed and the suite's tiny budgets, each model ranks defective demo images first.

The metrics tests elsewhere only check that anomalib reports values in [0, 1], which a constant or
sign-flipped score would pass. These tests fail for such a score (the last test shows it).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TrainedModel
from tests.helpers import assert_image_auroc_at_least, image_tensor

# Image AUROC on the tiny demo brick (64x64, 12 test images of which 4 good; DADDA: 8, its 4 lent defects removed),
# clearly above chance (0.5), and below what the tiny models reached when the floors were set (see their values
# printed by `pytest -k quality -s`).
FLOORS = {"radar": 0.75, "glad": 0.75, "dadda": 0.75}


def test_scores(trained: TrainedModel) -> tuple[np.ndarray, np.ndarray]:
    samples = trained.datamodule.test_data.samples.sort_values("image_path")
    images = image_tensor([Path(path) for path in samples.image_path])
    with torch.no_grad():
        scores = trained.model(images).pred_score.numpy()
    return scores, samples.label_index.to_numpy().astype(int)


test_scores.__test__ = False  # a helper, not a test


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_image_auroc_is_clearly_above_chance(name: str, request: pytest.FixtureRequest) -> None:
    scores, labels = test_scores(request.getfixturevalue(f"trained_{name}"))
    auroc = assert_image_auroc_at_least(scores, labels, FLOORS[name])
    print(f"{name}: image AUROC {auroc:.3f} (floor {FLOORS[name]})")  # noqa: T201


def test_the_floor_fails_a_flipped_or_constant_score(trained_radar: TrainedModel) -> None:
    scores, labels = test_scores(trained_radar)
    assert_image_auroc_at_least(scores, labels, FLOORS["radar"])
    with pytest.raises(AssertionError, match="below the floor"):
        assert_image_auroc_at_least(-scores, labels, FLOORS["radar"])
    with pytest.raises(AssertionError, match="below the floor"):
        assert_image_auroc_at_least(np.full_like(scores, 0.7), labels, FLOORS["radar"])
