"""INT8 post-training quantisation (NNCF) of exported models, network only, calibrated on normal images.

anomalib's ``INT8_PTQ`` quantises the whole exported graph, calibrated on the validation split
(for MVTec AD, anomalous test images). For the diffusion models here that breaks the output:
the scoring head after the network (noise-map norm, Sobel and Gaussian convolutions, tensor
Isolation Forest, post-processing) gets FakeQuantize ranges that flatten it (an all-zero
anomaly map, one score for every image). So only the network is quantised: the head, from every
node of ``head_start_type`` on (one per network pass), stays in float, and calibration uses normal
training images only.
"""

from collections.abc import Iterable

import numpy as np
import openvino as ov


def head_node_names(model: ov.Model, head_start_type: str) -> list[str]:
    """Names of every node reachable from any node of type ``head_start_type``, inclusive.

    A graph that runs its network more than once (RADAR's coarse passes) has one such node after each run.
    """
    starts = [op for op in model.get_ordered_ops() if op.get_type_name() == head_start_type]
    if not starts:
        msg = (
            f"No {head_start_type} node found in the exported graph, so its scoring head cannot be kept in float; "
            "export without INT8 compression."
        )
        raise ValueError(msg)
    seen: dict[str, ov.Node] = {}
    pending = list(starts)
    while pending:
        node = pending.pop()
        name = node.get_friendly_name()
        if name in seen:
            continue
        seen[name] = node
        pending.extend(target.get_node() for output in node.outputs() for target in output.get_target_inputs())
    return [name for name, node in seen.items() if node.get_type_name() != "Result"]


def quantize_network(
    model: ov.Model,
    calibration_images: Iterable[np.ndarray],
    head_start_type: str,
    subset_size: int = 300,
) -> ov.Model:
    """NNCF PTQ of ``model`` with its scoring head (see :func:`head_node_names`) left in float."""
    import nncf

    ignored = nncf.IgnoredScope(names=head_node_names(model, head_start_type))
    calibration = nncf.Dataset(list(calibration_images))
    return nncf.quantize(model, calibration, subset_size=subset_size, ignored_scope=ignored)
