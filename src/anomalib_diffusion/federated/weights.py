"""What may leave a D-ADDA site: model weights and per-type feature sums under known names and shapes, and scalars.

Three payloads carry arrays (Flower ``ArrayRecord``), each checked against a reference model built from
the settings the server sent:

- ``"arrays"`` (a training reply): the ``DADDA`` module's ``state_dict`` (generator, detector,
  defect-type head, anomalib's post-processor statistics) under its own key names and shapes;
- ``"generator"`` (a defect site's reply in the dislocated set-up): the generator's part of it only;
- ``"statistics"`` (a defect-type statistics reply): ``count (T,)``, ``total (T, D)`` and
  ``squares (T, D)`` (:class:`~anomalib_diffusion.models.dadda.DefectTypeStatistics`), with ``T``
  the model's type-table size and ``D`` its detector's feature size.

Metrics travel as scalars only. :func:`audit_reply` refuses anything else, so that an image (or any
tensor that is not one of these) cannot leave a site, even by mistake: the sites' ``ClientApp``
runs it on every reply (a Flower mod, :func:`anomalib_diffusion.federated.apps.payload_audit`).
"""

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningModule

STATISTICS_KEYS = ("count", "total", "squares")
GENERATOR_PREFIX = "model.generator."


def shape_of(array: object) -> tuple[int, ...]:
    """An array's shape as it travels: Flower's ``Array`` carries a 0-d array (a scalar buffer) as shape ``(1,)``."""
    return tuple(np.shape(array)) or (1,)


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


def state_dict_arrays(module: LightningModule) -> dict[str, np.ndarray]:
    """:func:`state_arrays` under their state-dict names (what an ``ArrayRecord`` carries)."""
    return dict(zip(weight_names(module), state_arrays(module), strict=True))


def load_state_arrays(module: LightningModule, arrays: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> None:
    """Load arrays made by :func:`state_arrays` (possibly averaged), casting each back to its tensor's dtype.

    ``arrays`` is either the list in state-dict order or a mapping by state-dict name.
    """
    state = module.state_dict()
    if isinstance(arrays, Mapping):
        missing, unexpected = sorted(set(state) - set(arrays)), sorted(set(arrays) - set(state))
        if missing or unexpected:
            msg = (
                f"Received weights that do not match this {type(module).__name__} (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}): the server and this site build the model with different settings or versions."
            )
            raise ValueError(msg)
        arrays = [arrays[name] for name in state]
    if len(arrays) != len(state):
        msg = (
            f"Received {len(arrays)} weight arrays, but this {type(module).__name__} has {len(state)}: the server and "
            "this site build the model with different settings. Use the same model section of the federated config."
        )
        raise ValueError(msg)
    loaded = {}
    for (name, current), array in zip(state.items(), arrays, strict=True):
        if shape_of(array) != shape_of(current):
            msg = (
                f"Weight {name!r} arrived with shape {tuple(np.shape(array))}, but this model's is "
                f"{tuple(current.shape)}: the server and this site build the model with different settings."
            )
            raise ValueError(msg)
        tensor = torch.from_numpy(np.array(array)).reshape(current.shape)
        if current.dtype == torch.bool:
            tensor = tensor > 0.5  # noqa: PLR2004
        elif not current.dtype.is_floating_point:
            tensor = tensor.round()
        loaded[name] = tensor.to(current.dtype)
    module.load_state_dict(loaded)


def allowed_shapes(reference: LightningModule) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per array payload name, the names and shapes that may leave a site with ``reference``'s settings."""
    types, dim = reference.model.type_weight.shape
    weights = {name: shape_of(value) for name, value in reference.state_dict().items()}
    generator = {name: shape for name, shape in weights.items() if name.startswith(GENERATOR_PREFIX)}
    statistics = {"count": (types,), "total": (types, dim), "squares": (types, dim)}
    return {"arrays": weights, "generator": generator, "statistics": statistics}


def audit_reply(
    arrays: Mapping[str, Mapping[str, tuple[int, ...]]],
    metrics: Mapping[str, Mapping[str, object]],
    configs: Sequence[str],
    reference: LightningModule,
    allowed_records: Collection[str] | None = None,
) -> None:
    """Refuse a reply that carries anything but known payloads (names and shapes), scalar metrics and no configs.

    Args:
        arrays: Per array record in the reply, its array names and shapes.
        metrics: Per metric record, its values.
        configs: Names of config records in the reply (none may leave a site: they can carry bytes).
        reference: A model built with the settings the server sent.
        allowed_records: The array records this kind of reply may carry (default: any known one).
    """
    allowed = allowed_shapes(reference)
    if allowed_records is not None:
        allowed = {name: shapes for name, shapes in allowed.items() if name in allowed_records}
    for record, shapes in arrays.items():
        expected = allowed.get(record)
        if expected is None:
            msg = f"Refusing to send array record {record!r}: only {sorted(allowed)} may leave a site here."
            raise RuntimeError(msg)
        sent = {name: tuple(shape) or (1,) for name, shape in shapes.items()}
        if sent != expected:
            unexpected = {name: shape for name, shape in sent.items() if expected.get(name) != shape}
            missing = sorted(set(expected) - set(sent))
            msg = (
                f"Refusing to send {record!r}: it is not this model's {record} (unexpected arrays {list(unexpected.items())[:3]}, "
                f"missing {missing[:3]}). Only weights and defect-type statistics may leave a site."
            )
            raise RuntimeError(msg)
    for record, values in metrics.items():
        bad = [name for name, value in values.items() if not isinstance(value, int | float)]
        if bad:
            msg = f"Refusing to send metrics {bad[:3]} of {record!r}: only single numbers may leave a site as metrics."
            raise RuntimeError(msg)
    if configs:
        msg = f"Refusing to send config records {list(configs)}: a site sends weights, statistics and metrics only."
        raise RuntimeError(msg)
