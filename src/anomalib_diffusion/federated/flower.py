"""D-ADDA across sites with Flower: each site a ``NumPyClient``, the server a FedAvg strategy.

A site keeps its images: it builds the DAM from its own few defects, trains the generator and the
detector locally for one round's steps (anomalib ``Engine.fit``), and returns only the weights
(:mod:`.weights` audits the payload). The server averages them (FedAvg, weighted by each site's
number of training images), sends the global weights back, and after the last round writes the
global model as a ``DADDA`` checkpoint that ``anomalib export`` turns into OpenVINO like any other.

Transport: Flower's gRPC server and client (``flwr.server.start_server`` /
``flwr.client.start_client``). Flower 1.13+ marks these entry points deprecated in favour of its
SuperLink/SuperNode deployment engine, but they remain Flower's own, maintained implementation and
need no app packaging; they run as plain processes on separate machines.

A site that disconnects mid-round is survived: FedAvg aggregates the sites that answered
(``accept_failures``) and later rounds continue while at least ``min_sites`` remain.
"""

import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Flower reports usage to its servers unless told not to; sites behind a factory firewall cannot reach them.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import flwr
import lightning
import numpy as np
import torch
from anomalib.engine import Engine
from flwr.common import Metrics, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg
from lightning import seed_everything

from anomalib_diffusion.components.files import atomic_write
from anomalib_diffusion.data import MVTecADFewDefects
from anomalib_diffusion.models import DADDA

from .weights import audit_payload, load_state_arrays, state_arrays

logger = logging.getLogger(__name__)


def build_model(model_settings: Mapping[str, Any], defect_types: list[str] | None) -> DADDA:
    """The model every party builds: the same settings and the same defect-type list (names only)."""
    settings = dict(model_settings) | ({"defect_types": defect_types} if defect_types else {})
    return DADDA(**settings)


class DADDASite(flwr.client.NumPyClient):
    """A site: its own data folder, local D-ADDA training, weights out.

    Args:
        root: The site's MVTec AD-layout folder.
        category: Category folder name inside ``root``.
        model_settings: ``DADDA`` arguments (the same at every site and the server); one round
            trains ``generator_steps + detector_steps`` locally.
        defects_per_type: Real defective images per type the site lends to training (k).
        work_dir: Where the site's local runs are written.
        batch_size: Training and evaluation batch size.
        seed: Seed of the local training (offset by the round number).
    """

    def __init__(
        self,
        root: Path | str,
        category: str,
        model_settings: Mapping[str, Any],
        defects_per_type: int,
        work_dir: Path | str,
        batch_size: int = 8,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        self.root = Path(root)
        self.category = category
        self.model_settings = dict(model_settings)
        self.defects_per_type = defects_per_type
        self.work_dir = Path(work_dir)
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress
        if not (self.root / category / "train" / "good").is_dir():
            msg = f"Site data {self.root / category / 'train' / 'good'} does not exist; point --root/--category at this site's MVTec AD-layout folder."
            raise FileNotFoundError(msg)

    def datamodule(self) -> MVTecADFewDefects:
        return MVTecADFewDefects(
            root=self.root,
            category=self.category,
            defects_per_type=self.defects_per_type,
            train_batch_size=self.batch_size,
            eval_batch_size=self.batch_size,
            num_workers=0,
            seed=self.seed,
        )

    def _model(self, config: Mapping[str, Scalar]) -> DADDA:
        types = json.loads(str(config["defect_types"])) if config.get("defect_types") else None
        return build_model(self.model_settings, types)

    def _engine(self, name: str) -> Engine:
        return Engine(
            default_root_dir=self.work_dir / name,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=self.progress,
        )

    def get_parameters(self, config: dict[str, Scalar]) -> list[np.ndarray]:
        return state_arrays(self._model(config))

    def fit(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[list[np.ndarray], int, Metrics]:
        """Train locally from the global weights; return the new weights, the training-set size, the losses."""
        server_round = int(config.get("server_round", 0))
        seed_everything(self.seed + server_round, workers=True)
        model = self._model(config)
        load_state_arrays(model, parameters)
        datamodule = self.datamodule()
        engine = self._engine(f"round_{server_round}")
        engine.fit(model=model, datamodule=datamodule)
        arrays = state_arrays(model)
        audit_payload(arrays, self._model(config))
        metrics = {
            name: float(value)
            for name, value in engine.trainer.callback_metrics.items()
            if torch.as_tensor(value).numel() == 1
        }
        return arrays, len(datamodule.train_data), metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[float, int, Metrics]:
        """Score the global weights on the site's own test split (anomalib's metrics + defect-type accuracy)."""
        model = self._model(config)
        load_state_arrays(model, parameters)
        datamodule = self.datamodule()
        results = self._engine("evaluate").test(model=model, datamodule=datamodule, verbose=False)[0]
        metrics = {name: float(value) for name, value in results.items()}
        return 1.0 - metrics.get("image_AUROC", 0.0), len(datamodule.test_data), metrics


def weighted_mean(results: list[tuple[int, Metrics]]) -> Metrics:
    """Metrics averaged over sites, weighted by their number of examples."""
    names = sorted({name for _, metrics in results for name in metrics})
    averaged: dict[str, Scalar] = {}
    for name in names:
        pairs = [(count, float(metrics[name])) for count, metrics in results if name in metrics]
        total = sum(count for count, _ in pairs)
        if total:
            averaged[name] = sum(count * value for count, value in pairs) / total
    return averaged


class DADDAFedAvg(FedAvg):
    """FedAvg over D-ADDA sites that waits for every expected site in round 1 and records what it receives.

    Args:
        initial: The initial global weights (a freshly seeded model, the same at every site).
        expected_sites: Sites that must join before round 1 starts (waits up to ``join_timeout`` s).
        min_sites: Rounds go on while at least this many sites take part.
        defect_types: Defect type names (sent to sites so their type indices agree; no images).
    """

    def __init__(
        self,
        initial: list[np.ndarray],
        expected_sites: int,
        min_sites: int,
        defect_types: list[str] | None = None,
        join_timeout: float = 600.0,
    ) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=1.0,
            min_fit_clients=min_sites,
            min_evaluate_clients=min_sites,
            min_available_clients=min_sites,
            initial_parameters=ndarrays_to_parameters(initial),
            on_fit_config_fn=self.round_config,
            on_evaluate_config_fn=self.round_config,
            fit_metrics_aggregation_fn=weighted_mean,
            evaluate_metrics_aggregation_fn=weighted_mean,
            accept_failures=True,
        )
        self.expected_sites = expected_sites
        self.join_timeout = join_timeout
        self.defect_types = defect_types
        self.received_shapes: list[list[tuple[int, ...]]] = []
        self.dropouts: dict[int, int] = {}
        self.latest: list[np.ndarray] = initial

    def round_config(self, server_round: int) -> dict[str, Scalar]:
        return {"server_round": server_round, "defect_types": json.dumps(self.defect_types or [])}

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:  # noqa: ANN401
        if server_round == 1 and not client_manager.wait_for(self.expected_sites, timeout=self.join_timeout):
            logger.warning(
                "Only %d of %d sites joined within %.0f s; starting with those.",
                client_manager.num_available(),
                self.expected_sites,
                self.join_timeout,
            )
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Any, dict[str, Scalar]]:
        for _, fit_res in results:
            self.received_shapes.append([tuple(array.shape) for array in parameters_to_ndarrays(fit_res.parameters)])
        if not results:
            msg = f"No site answered round {server_round} ({len(failures)} failed); see the sites' logs."
            raise RuntimeError(msg)
        if failures:
            self.dropouts[server_round] = len(failures)
            logger.warning(
                "%d site(s) dropped out of round %d; averaging the %d that answered.",
                len(failures),
                server_round,
                len(results),
            )
        aggregated, metrics = super().aggregate_fit(server_round, results, failures)
        if aggregated is not None:
            self.latest = parameters_to_ndarrays(aggregated)
        return aggregated, metrics


def save_global_checkpoint(model: DADDA, arrays: list[np.ndarray], path: Path | str) -> Path:
    """Write the global weights as a ``DADDA`` Lightning checkpoint (for ``anomalib export/test --ckpt_path``)."""
    load_state_arrays(model, arrays)
    checkpoint: dict[str, Any] = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }
    model.on_save_checkpoint(checkpoint)
    path = Path(path)
    with atomic_write(path) as temporary:
        torch.save(checkpoint, temporary)
    return path


def run_server(
    address: str,
    rounds: int,
    model_settings: Mapping[str, Any],
    expected_sites: int,
    min_sites: int,
    output: Path | str,
    defect_types: list[str] | None = None,
    join_timeout: float = 600.0,
    round_timeout: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the FedAvg server for ``rounds`` rounds; write ``output`` (checkpoint) and ``output``.json (history)."""
    if not 1 <= min_sites <= expected_sites:
        msg = f"min_sites={min_sites} must be between 1 and the number of expected sites ({expected_sites})."
        raise ValueError(msg)
    seed_everything(seed, workers=True)
    model = build_model(model_settings, defect_types)
    strategy = DADDAFedAvg(state_arrays(model), expected_sites, min_sites, defect_types, join_timeout)
    history = flwr.server.start_server(
        server_address=address,
        config=flwr.server.ServerConfig(num_rounds=rounds, round_timeout=round_timeout),
        strategy=strategy,
    )
    weight_shapes = [tuple(array.shape) for array in state_arrays(model)]
    checkpoint = save_global_checkpoint(model, strategy.latest, output)
    report = {
        "rounds": rounds,
        "checkpoint": str(checkpoint),
        "defect_types": defect_types or [],
        "dropouts": strategy.dropouts,
        "site_updates": len(strategy.received_shapes),
        "updates_were_weights_only": all(shapes == weight_shapes for shapes in strategy.received_shapes),
        "fit_metrics": dict(history.metrics_distributed_fit),
        "evaluate_metrics": dict(history.metrics_distributed),
    }
    report_path = checkpoint.with_suffix(".json")
    temporary = report_path.with_name(f".{report_path.name}.tmp")
    temporary.write_text(json.dumps(report, indent=2))
    temporary.replace(report_path)
    return report


def wait_for_server(address: str, timeout: float) -> None:
    """Block until ``host:port`` accepts connections (Flower's gRPC client gives up at once if it does not)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
                return
        except OSError as error:
            if time.monotonic() > deadline:
                msg = f"No federation server answers at {address} after {timeout:.0f} s; start the server first or check the address."
                raise ConnectionError(msg) from error
            time.sleep(1.0)


def run_site(address: str, site: DADDASite, connect_timeout: float = 600.0) -> None:
    """Connect a site to the server (waiting up to ``connect_timeout`` s for it) and serve rounds until the end."""
    wait_for_server(address, connect_timeout)
    flwr.client.start_client(server_address=address, client=site.to_client(), insecure=True)
