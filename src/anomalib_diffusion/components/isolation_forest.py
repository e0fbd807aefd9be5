"""An Isolation Forest that is fitted by scikit-learn and evaluated with tensor gathers.

scikit-learn fits the forest (:class:`sklearn.ensemble.IsolationForest`); the fitted trees are
then rewritten as *complete* binary trees of depth ``D`` in heap layout (children of node
``i`` at ``2i+1`` and ``2i+2``). A leaf that sklearn stops early is extended down to depth
``D`` by nodes with threshold ``+inf`` (always "go left") that carry the leaf's value, so
evaluation is exactly ``D`` rounds of ``gather`` / compare with no data-dependent control
flow. That makes the forest part of the exported ONNX/OpenVINO graph, and ``D`` is read from
a buffer *shape*, which torch.export sees as a constant.

The score follows Liu et al. (2008) as implemented by scikit-learn: the path length of a
sample in a tree is the depth of its leaf plus ``c(n)``, the average path length of an
unsuccessful BST search among the ``n`` training samples left in that leaf; the anomaly score
is ``2 ** (-mean_path_length / c(max_samples))``.
"""

import math

import numpy as np
import torch
from anomalib.models.components.base import DynamicBufferMixin
from sklearn.ensemble import IsolationForest
from sklearn.utils.validation import check_array


def average_path_length(n_samples: np.ndarray) -> np.ndarray:
    """``c(n) = 2 H(n-1) - 2 (n-1) / n``, with ``c(1) = 0`` and ``c(2) = 1`` (Liu et al., eq. 1)."""
    n = np.asarray(n_samples, dtype=np.float64)
    result = np.zeros_like(n)
    result[n == 2] = 1.0  # noqa: PLR2004 - c(2) = 1 in the paper's formula
    large = n > 2  # noqa: PLR2004 - the formula's general case
    result[large] = 2.0 * (np.log(n[large] - 1.0) + np.euler_gamma) - 2.0 * (n[large] - 1.0) / n[large]
    return result


def _float32_floor(values: np.ndarray) -> np.ndarray:
    """Largest float32 <= each float64 value.

    sklearn compares float32 features with float64 thresholds; ``x <= t`` for a float32 ``x``
    holds exactly when ``x <= floor32(t)``, so rounding thresholds down keeps torch (float32)
    decisions identical to sklearn's.
    """
    rounded = values.astype(np.float32)
    too_big = rounded.astype(np.float64) > values
    rounded[too_big] = np.nextafter(rounded[too_big], np.float32(-np.inf))
    return rounded


class TensorIsolationForest(DynamicBufferMixin):
    """Isolation Forest whose fitted state lives in buffers (checkpointed, exported).

    Args:
        n_estimators: Number of trees.
        contamination: Passed to sklearn; it only moves ``offset_``, i.e. where
            ``decision_function`` crosses zero.
        max_samples: Samples drawn to grow each tree (sklearn's ``"auto"`` is 256).
        random_state: Seed for sklearn, so that fitting is reproducible.

    The forward pass returns ``offset_ - score_samples(x)`` (sklearn's ``-decision_function``):
    higher is more anomalous, and zero is the contamination boundary.
    """

    def __init__(
        self,
        n_estimators: int = 100,
        contamination: float | str = "auto",
        max_samples: int | str = "auto",
        random_state: int = 0,
    ) -> None:
        super().__init__()
        self.n_estimators = n_estimators
        self.contamination = contamination
        self.max_samples = max_samples
        self.random_state = random_state
        self.register_buffer("feature_", torch.zeros(0, 0, dtype=torch.long))
        self.register_buffer("threshold_", torch.zeros(0, 0))
        self.register_buffer("leaf_path_length_", torch.zeros(0, 0))
        self.register_buffer("normaliser_", torch.ones(()))
        self.register_buffer("offset_", torch.zeros(()))
        self.feature_: torch.Tensor
        self.threshold_: torch.Tensor
        self.leaf_path_length_: torch.Tensor
        self.normaliser_: torch.Tensor
        self.offset_: torch.Tensor

    @property
    def is_fitted(self) -> bool:
        return self.leaf_path_length_.numel() > 0

    @property
    def depth(self) -> int:
        return int(math.log2(self.leaf_path_length_.shape[1]))

    def fit(self, features: torch.Tensor | np.ndarray) -> IsolationForest:
        """Fit on ``(n_samples, n_features)`` normal features; returns the sklearn forest."""
        array = check_array(
            features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features,
            dtype=np.float32,
            ensure_min_samples=2,
            input_name="features",
        )
        forest = IsolationForest(
            n_estimators=self.n_estimators,
            contamination=self.contamination,
            max_samples=self.max_samples,
            random_state=self.random_state,
        ).fit(array)
        self.load_sklearn(forest)
        return forest

    def load_sklearn(self, forest: IsolationForest) -> None:
        """Turn a fitted sklearn ``IsolationForest`` into this module's buffers."""
        depth = max(tree.tree_.max_depth for tree in forest.estimators_)
        heaps = [
            self._to_heap(tree.tree_, np.asarray(features), depth)
            for tree, features in zip(forest.estimators_, forest.estimators_features_, strict=True)
        ]
        device = self.threshold_.device
        self.feature_ = torch.from_numpy(np.stack([heap[0] for heap in heaps])).to(device)
        self.threshold_ = torch.from_numpy(np.stack([heap[1] for heap in heaps])).to(device)
        self.leaf_path_length_ = torch.from_numpy(np.stack([heap[2] for heap in heaps])).to(device)
        self.normaliser_ = torch.tensor(float(average_path_length(np.array([forest.max_samples_]))[0]), device=device)
        self.offset_ = torch.tensor(float(forest.offset_), device=device)

    @staticmethod
    def _to_heap(tree: object, features: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        internal = 2**depth - 1
        feature = np.zeros(internal, dtype=np.int64)
        threshold = np.full(internal, np.inf, dtype=np.float32)
        leaf_path_length = np.zeros(2**depth, dtype=np.float32)
        leaf_values = average_path_length(tree.n_node_samples)
        # (sklearn node, heap position, depth); leaves below `depth` are pushed down the left spine.
        stack = [(0, 0, 0)]
        while stack:
            node, position, level = stack.pop()
            left, right = tree.children_left[node], tree.children_right[node]
            if left == right:  # sklearn marks leaves with -1 children
                leaf_depth = level
                while level < depth:
                    position, level = 2 * position + 1, level + 1
                leaf_path_length[position - internal] = leaf_depth + leaf_values[node]
                continue
            feature[position] = features[tree.feature[node]]
            threshold[position] = _float32_floor(np.array([tree.threshold[node]]))[0]
            stack.append((left, 2 * position + 1, level + 1))
            stack.append((right, 2 * position + 2, level + 1))
        return feature, threshold, leaf_path_length

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, n_features)`` -> ``(B,)`` anomaly scores (sklearn's ``-decision_function``)."""
        n_trees, n_internal = self.threshold_.shape
        tree_offset = (torch.arange(n_trees, device=features.device) * n_internal)[None, :]
        position = torch.zeros(features.shape[0], n_trees, dtype=torch.long, device=features.device)
        flat_feature, flat_threshold = self.feature_.reshape(-1), self.threshold_.reshape(-1)
        for _ in range(self.depth):
            node = position + tree_offset
            value = torch.gather(features, 1, flat_feature[node])
            go_right = (value > flat_threshold[node]).long()
            position = 2 * position + 1 + go_right
        leaf = position - n_internal + (torch.arange(n_trees, device=features.device) * (n_internal + 1))[None, :]
        path_length = self.leaf_path_length_.reshape(-1)[leaf].mean(dim=1)
        score_samples = -torch.pow(2.0, -path_length / self.normaliser_)
        return self.offset_ - score_samples
