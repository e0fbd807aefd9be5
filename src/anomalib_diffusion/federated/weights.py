"""What travels between a D-ADDA site and the server: the model's weights, as NumPy arrays, and nothing else.

The payload is the ``DADDA`` module's ``state_dict`` (generator, detector, defect-type head and
anomalib's post-processor statistics), in the module's own key order. Before a site sends it,
:func:`audit_payload` checks every array against the shapes of that state dict, so an image (or
any tensor that is not a weight) cannot leave a site even by mistake.
"""

from collections.abc import Sequence

import numpy as np
import torch
from lightning.pytorch import LightningModule


def weight_names(module: LightningModule) -> list[str]:
    """The state-dict keys that travel, in order."""
    return list(module.state_dict().keys())


def state_arrays(module: LightningModule) -> list[np.ndarray]:
    """The module's weights as NumPy arrays (booleans as 0/1 floats, so they can be averaged)."""
    arrays = []
    for value in module.state_dict().values():
        tensor = value.detach().cpu()
        arrays.append((tensor.float() if tensor.dtype == torch.bool else tensor).numpy().copy())
    return arrays


def load_state_arrays(module: LightningModule, arrays: Sequence[np.ndarray]) -> None:
    """Load arrays made by :func:`state_arrays` (possibly averaged), casting each back to its tensor's dtype."""
    state = module.state_dict()
    if len(arrays) != len(state):
        msg = (
            f"Received {len(arrays)} weight arrays, but this {type(module).__name__} has {len(state)}: the server and "
            "this site build the model with different settings. Use the same model section of the federated config."
        )
        raise ValueError(msg)
    loaded = {}
    for (name, current), array in zip(state.items(), arrays, strict=True):
        if tuple(array.shape) != tuple(current.shape):
            msg = (
                f"Weight {name!r} arrived with shape {tuple(array.shape)}, but this model's is {tuple(current.shape)}: "
                "the server and this site build the model with different settings."
            )
            raise ValueError(msg)
        tensor = torch.from_numpy(np.asarray(array))
        if current.dtype == torch.bool:
            tensor = tensor > 0.5  # noqa: PLR2004
        elif not current.dtype.is_floating_point:
            tensor = tensor.round()
        loaded[name] = tensor.to(current.dtype)
    module.load_state_dict(loaded)


def audit_payload(arrays: Sequence[np.ndarray], reference: LightningModule) -> None:
    """Refuse to send anything but the reference model's weights (same count, same shapes, in order)."""
    shapes = [tuple(value.shape) for value in reference.state_dict().values()]
    sent = [tuple(np.shape(array)) for array in arrays]
    if sent != shapes:
        extra = [shape for shape in sent if shape not in shapes]
        msg = (
            f"Refusing to send a payload that is not this model's weights ({len(sent)} arrays, expected "
            f"{len(shapes)}; unexpected shapes: {extra[:3]}). Only weights may leave a site."
        )
        raise RuntimeError(msg)
