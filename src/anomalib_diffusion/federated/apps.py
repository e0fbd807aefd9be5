"""D-ADDA across sites as a Flower App: a ``ServerApp`` (FedAvg, then one defect-type head) and a ``ClientApp`` (a site).

Flower runs these two objects however it is deployed (see docs/dadda.md): the deployment engine
(``flower-superlink`` on the server machine, one ``flower-supernode`` per site, the run submitted
with ``flwr run``) or the simulation engine (``flwr run`` against a local simulation, every site a
Ray worker on one machine). The Flower App folder that ``flwr run`` takes is shipped in this package
(``anomalib-diffusion-federated app-path`` prints it); its two modules only import the objects below.

A round: the server sends the global weights; each site trains D-ADDA on its own images for one
round's steps (DAM from its own few defects, generator, then detector; anomalib ``Engine.fit``) and
returns its weights; FedAvg averages them (weighted by each site's number of training images) and
every site scores the average on its own test split. After the last round the defect-type head is
fitted *once, against the global detector*: every site sends per-type count, sum and sum of squares
of the global detector's features of its own types' defects (never an image), the server pools them
(:func:`~anomalib_diffusion.models.dadda.pooled_type_head`), and the global model, head included,
is written as a ``DADDA`` checkpoint that ``anomalib export`` / ``anomalib test --ckpt_path`` take.

With ``mode = "dislocated"`` the sites have roles instead (node config ``role``): the defect sites
train only the generator on their own real defects and send only its weights (FedAvg'd by the server);
then the detector site, which holds normal images only, receives the global generator, trains the
detector and the type head on the generator's defects of every type, and returns the model.

Every reply leaves a site through :func:`payload_audit`, which refuses anything but those weights,
those statistics and scalar metrics.

Run config (``[tool.flwr.app.config]`` of the app's pyproject.toml; ``flwr run --run-config`` overrides):
``mode`` (``together`` or ``dislocated``), ``num-server-rounds``, ``min-sites`` (rounds go on while this many answer), ``expected-sites``
(round 1 waits for them up to ``join-timeout`` s), ``round-timeout`` (0: none), ``seed``,
``defect-types`` (every site's type names, comma-separated), ``model`` (``DADDA`` arguments as
JSON, the same at every site: the server sends them), ``output`` (the global checkpoint, written on
the server machine), and site defaults ``defects-per-type``, ``batch-size``.

Node config (each ``flower-supernode --node-config``; a site's own settings): ``data-root`` and
``category`` (its MVTec AD-layout folder), optional ``role`` (``defects`` or ``detector``),
``defects-per-type``, ``batch-size``, ``threads``, ``work-dir``. Under the simulation engine site ``i`` reads ``<sites-root>/site_<i>`` (run config
``sites-root`` and ``category``).
"""

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

# Flower reports usage to its servers unless told not to; sites behind a factory firewall cannot reach them.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import lightning
import numpy as np
import torch
from anomalib.engine import Engine
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, aggregate_metricrecords
from lightning import seed_everything

from anomalib_diffusion.components.files import atomic_write
from anomalib_diffusion.data import MVTecADFewDefects
from anomalib_diffusion.models import DADDA
from anomalib_diffusion.models.dadda import DefectTypeStatistics

from .sites import defect_types_in
from .weights import (
    GENERATOR_PREFIX,
    STATISTICS_KEYS,
    allowed_shapes,
    audit_reply,
    load_state_arrays,
    state_dict_arrays,
)

STATISTICS_QUERY = "query.type_statistics"
ROLE_QUERY = "query.role"
TRAIN_GENERATOR = "train.generator"
TRAIN_DETECTOR = "train.detector"
# "together": every site trains generator and detector on its own data; "dislocated": defect sites train the
# generator only, one detector site trains the detector on generated defects (docs/dadda.md).
MODES = ("together", "dislocated")
# A site's role in the dislocated set-up: "defects" (real defects, DAM + generator) or "detector" (normal images only).
ROLES = ("defects", "detector")
# What each kind of reply may carry besides scalar metrics (array record names; see weights.audit_reply).
REPLY_RECORDS = {
    MessageType.TRAIN: {"arrays"},
    TRAIN_GENERATOR: {"generator"},
    TRAIN_DETECTOR: {"arrays"},
    STATISTICS_QUERY: {"statistics"},
}


def build_model(model_settings: Mapping[str, Any], defect_types: list[str] | None) -> DADDA:
    """The model every party builds: the same settings and the same defect-type list (names only)."""
    settings = dict(model_settings) | ({"defect_types": defect_types} if defect_types else {})
    return DADDA(**settings)


def model_from_config(config: ConfigRecord) -> DADDA:
    """The model the server's message describes (its ``model`` settings and ``defect-types``)."""
    types = json.loads(str(config["defect-types"])) or None
    return build_model(json.loads(str(config["model"])), types)


def array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(array)) for name, array in arrays.items()})


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _reply_shapes(reply: Message) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per array record of a reply, its arrays' shapes (a scalar as ``(1,)``, as :func:`weights.shape_of`)."""
    return {
        name: {key: tuple(array.shape) or (1,) for key, array in record.items()}
        for name, record in reply.content.array_records.items()
    }


# -- the site ---------------------------------------------------------------------------------


@dataclass
class SiteSettings:
    """A site's own settings: its data folder and local training set-up (node config over run config)."""

    data_root: Path
    category: str
    defects_per_type: int
    batch_size: int
    work_dir: Path
    threads: int | None = None
    role: str = "defects"

    @classmethod
    def from_context(cls, context: Context) -> "SiteSettings":
        node, run = dict(context.node_config), dict(context.run_config)
        if "data-root" in node:
            root = Path(str(node["data-root"]))
        elif str(run.get("sites-root", "")) and "partition-id" in node:  # the simulation engine
            root = Path(str(run["sites-root"])) / f"site_{int(node['partition-id'])}"
        else:
            msg = (
                "This site does not know its data: start flower-supernode with "
                '--node-config \'data-root="/path/to/mvtec-layout" category="brick"\'.'
            )
            raise ValueError(msg)
        category = str(node.get("category", run.get("category", "")))
        if not category:
            msg = 'This site does not know its category: add category="<name>" to flower-supernode --node-config.'
            raise ValueError(msg)
        if not (root / category / "train" / "good").is_dir():
            msg = (
                f"Site data {root / category / 'train' / 'good'} does not exist; point data-root/category at this "
                "site's MVTec AD-layout folder."
            )
            raise FileNotFoundError(msg)
        threads = int(node.get("threads", run.get("threads", 0)))
        role = str(node.get("role", "defects"))
        if "partition-id" in node and int(node["partition-id"]) == int(run.get("detector-site", -1)):
            role = "detector"  # the simulation engine's dislocated set-up: the last partition
        if role not in ROLES:
            msg = f"role={role!r} in --node-config must be one of {list(ROLES)}."
            raise ValueError(msg)
        return cls(
            data_root=root,
            category=category,
            defects_per_type=int(node.get("defects-per-type", run.get("defects-per-type", 3))),
            batch_size=int(node.get("batch-size", run.get("batch-size", 8))),
            work_dir=Path(str(node.get("work-dir", default_work_dir(run, node, context.node_id)))),
            threads=threads or None,
            role=role,
        )

    def datamodule(self, seed: int, **overrides: Any) -> MVTecADFewDefects:  # noqa: ANN401
        settings: dict[str, Any] = {
            "root": self.data_root,
            "category": self.category,
            "defects_per_type": self.defects_per_type,
            "train_batch_size": self.batch_size,
            "eval_batch_size": self.batch_size,
            "num_workers": 0,
            "seed": seed,
        }
        return MVTecADFewDefects(**(settings | overrides))

    def use_threads(self) -> None:
        """Give torch this site's CPU threads (node config ``threads``), if set."""
        if self.threads:
            torch.set_num_threads(self.threads)

    def engine(self, name: str) -> Engine:
        self.use_threads()
        return Engine(
            default_root_dir=self.work_dir / name,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )


def default_work_dir(run: Mapping[str, Any], node: Mapping[str, Any], node_id: int) -> Path:
    """Where a site writes its local runs unless its node config says: beside the simulation's data, or ./runs."""
    if str(run.get("sites-root", "")) and "partition-id" in node:
        return Path(str(run["sites-root"])).parent / "runs" / f"site_{int(node['partition-id'])}"
    return Path("runs/federated") / f"site_{node_id}"


def _global_model(message: Message) -> DADDA:
    model = model_from_config(message.content["config"])
    load_state_arrays(model, record_arrays(message.content["arrays"]))
    return model


def payload_audit(message: Message, context: Context, call_next: Any) -> Message:  # noqa: ANN401
    """Flower mod around every handler of the site's ``ClientApp``: what leaves the site is audited first.

    A reply may carry, by message type, the model's weights (``"arrays"``: training, and the detector
    site's detector training), the generator's weights only (``"generator"``: a defect site's training in
    the dislocated set-up), defect-type statistics (``"statistics"``) and scalar metrics; anything else
    (an image, a feature map, another record, a config record) is refused and the server gets an error
    reply instead (:func:`~anomalib_diffusion.federated.weights.audit_reply`).
    """
    reply = call_next(message, context)
    if reply.has_error():
        return reply
    content = reply.content
    audit_reply(
        _reply_shapes(reply),
        {name: dict(record) for name, record in content.metric_records.items()},
        list(content.config_records),
        model_from_config(message.content["config"]),
        allowed_records=REPLY_RECORDS.get(message.metadata.message_type, set()),
    )
    return reply


client_app = ClientApp(mods=[payload_audit])


def _train_locally(
    message: Message, context: Context, what: str, prepare: Callable[[DADDA, SiteSettings], MVTecADFewDefects]
) -> tuple[DADDA, MVTecADFewDefects, dict[str, float | int]]:
    """Load the global weights, let ``prepare`` set the model up and give the datamodule, fit; the metrics to send."""
    site = SiteSettings.from_context(context)
    require_type_names(message, site)
    config = message.content["config"]
    server_round = int(config.get("server-round", 0))
    seed_everything(int(config.get("seed", 0)) + server_round, workers=True)
    model = _global_model(message)
    datamodule = prepare(model, site)
    engine = site.engine(f"{what.replace(' ', '_')}_round_{server_round}")
    log(INFO, "Site %s/%s: round %d, %s.", site.data_root, site.category, server_round, what)
    engine.fit(model=model, datamodule=datamodule)
    metrics: dict[str, float | int] = {
        name: float(value)
        for name, value in engine.trainer.callback_metrics.items()
        if torch.as_tensor(value).numel() == 1
    }
    metrics["num-examples"] = len(datamodule.train_data)
    return model, datamodule, metrics


def require_type_names(message: Message, site: SiteSettings) -> None:
    """A site that lends real defects needs the federation's type names, or its type indices would be its own."""
    names = json.loads(str(message.content["config"].get("defect-types", "[]")))
    held = defect_types_in(site.data_root / site.category) if site.defects_per_type > 0 else []
    if held and not names:
        msg = (
            f"This site holds defect types {held}, but the run names none: submit the run with --defect-types "
            "listing every site's types (run config defect-types), so that all sites index them alike."
        )
        raise ValueError(msg)


def _seed(message: Message) -> int:
    return int(message.content["config"].get("seed", 0))


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """Train locally from the global weights for one round; reply with the new weights and the losses."""

    def prepare(model: DADDA, site: SiteSettings) -> MVTecADFewDefects:
        model.fit_type_head_at_end = False  # the server fits the one head against the global detector
        return site.datamodule(_seed(message))

    model, _, metrics = _train_locally(message, context, "training locally", prepare)
    return Message(
        RecordDict({"arrays": array_record(state_dict_arrays(model)), "metrics": MetricRecord(metrics)}),
        reply_to=message,
    )


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Score the global weights on the site's own test split (anomalib's metrics + defect-type accuracy)."""
    site = SiteSettings.from_context(context)
    model = _global_model(message)
    datamodule = site.datamodule(int(message.content["config"].get("seed", 0)))
    results = site.engine("evaluate").test(model=model, datamodule=datamodule, verbose=False)[0]
    metrics: dict[str, float | int] = {name: float(value) for name, value in results.items()}
    if not model.model.type_weight.any():  # before the last round the server has not fitted the head yet
        metrics = {name: value for name, value in metrics.items() if not name.startswith("defect_type_accuracy")}
    metrics["num-examples"] = len(datamodule.test_data)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


@client_app.query("type_statistics")
def type_statistics(message: Message, context: Context) -> Message:
    """Per-type feature sums of the global detector on this site's own defect types (no image leaves)."""
    site = SiteSettings.from_context(context)
    seed = int(message.content["config"].get("seed", 0))
    seed_everything(seed, workers=True)
    model = _global_model(message)
    site.use_threads()
    datamodule = site.datamodule(seed)
    model.prepare_defect_bank(datamodule)
    statistics = model.defect_type_statistics()
    arrays = dict(zip(STATISTICS_KEYS, statistics.arrays(), strict=True))
    metrics = MetricRecord({"num-examples": len(datamodule.train_data)})
    return Message(RecordDict({"statistics": array_record(arrays), "metrics": metrics}), reply_to=message)


@client_app.query("role")
def role(message: Message, context: Context) -> Message:
    """The site's role in the dislocated set-up (a number: 1 trains the detector, 0 holds defects)."""
    site = SiteSettings.from_context(context)
    metrics = MetricRecord({"detector": int(site.role == "detector"), "num-examples": 1})
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


@client_app.train("generator")
def train_generator(message: Message, context: Context) -> Message:
    """Dislocated set-up, a defect site: DAM + generator on its own real defects; only generator weights leave."""

    def prepare(model: DADDA, site: SiteSettings) -> MVTecADFewDefects:
        model.detector_steps, model.max_steps = 0, model.generator_steps  # this site trains no detector
        model.fit_type_head_at_end = False
        return site.datamodule(_seed(message))

    model, _, metrics = _train_locally(message, context, "training the generator locally", prepare)
    generator = {name: array for name, array in state_dict_arrays(model).items() if name.startswith(GENERATOR_PREFIX)}
    metrics = {name: value for name, value in metrics.items() if name in {"num-examples", "generator_loss"}}
    return Message(
        RecordDict({"generator": array_record(generator), "metrics": MetricRecord(metrics)}), reply_to=message
    )


@client_app.train("detector")
def train_detector(message: Message, context: Context) -> Message:
    """Dislocated set-up, the detector site: normal images only; the global generator draws every defect type.

    The DAM gives masks (procedural seeds: this site holds no real defect); the detector trains on the
    generator's defects in them, and the defect-type head is fitted on generated defects only.
    """

    def prepare(model: DADDA, site: SiteSettings) -> MVTecADFewDefects:
        model.generator_steps, model.max_steps = 0, model.detector_steps  # the generator arrives trained
        model.generated_fraction, model.type_head_source = 1.0, "generated"
        # No defective image here: the thresholds come from synthetic anomalies on held-back normal images.
        return site.datamodule(_seed(message), defects_per_type=0, val_split_mode="synthetic")

    model, _, metrics = _train_locally(message, context, "training the detector on generated defects", prepare)
    return Message(
        RecordDict({"arrays": array_record(state_dict_arrays(model)), "metrics": MetricRecord(metrics)}),
        reply_to=message,
    )


# -- the server -------------------------------------------------------------------------------


@dataclass
class FederationSettings:
    """The run config the ``ServerApp`` reads (see the module docstring)."""

    rounds: int
    min_sites: int
    expected_sites: int
    join_timeout: float
    round_timeout: float | None
    seed: int
    defect_types: list[str]
    model: dict[str, Any]
    output: Path
    evaluate_each_round: bool = True
    mode: str = "together"

    @classmethod
    def from_run_config(cls, run: Mapping[str, Any]) -> "FederationSettings":
        model = json.loads(str(run.get("model", "{}")) or "{}")
        if not isinstance(model, dict):
            msg = f"Run config 'model' must be a JSON object of DADDA arguments, got {run.get('model')!r}."
            raise ValueError(msg)
        min_sites = int(run.get("min-sites", 2))
        expected = int(run.get("expected-sites", 0)) or min_sites
        if not 1 <= min_sites <= expected:
            msg = f"min-sites={min_sites} must be between 1 and expected-sites ({expected})."
            raise ValueError(msg)
        round_timeout = float(run.get("round-timeout", 0.0))
        mode = str(run.get("mode", "together"))
        if mode not in MODES:
            msg = f"Run config mode={mode!r} must be one of {list(MODES)}."
            raise ValueError(msg)
        types = [name.strip() for name in str(run.get("defect-types", "")).split(",") if name.strip()]
        return cls(
            rounds=int(run.get("num-server-rounds", 3)),
            min_sites=min_sites,
            expected_sites=expected,
            join_timeout=float(run.get("join-timeout", 600.0)),
            round_timeout=round_timeout or None,
            seed=int(run.get("seed", 0)),
            defect_types=types,
            model=model,
            output=Path(str(run.get("output", "runs/federated/global.ckpt"))),
            evaluate_each_round=bool(run.get("evaluate-each-round", True)),
            mode=mode,
        )

    def config_record(self) -> ConfigRecord:
        """What every message to a site carries besides arrays: the model settings and type names, the seed."""
        return ConfigRecord(
            {"model": json.dumps(self.model), "defect-types": json.dumps(self.defect_types), "seed": self.seed}
        )


class DADDAFedAvg(FedAvg):
    """Flower's FedAvg over D-ADDA sites: waits for the expected sites once, records dropouts and what arrived.

    Args:
        reference: A model built with the federation's settings (shapes every site's reply is checked against).
        min_sites: Rounds go on while at least this many sites answer.
        expected_sites: Sites round 1 waits for (up to ``join_timeout`` s; then it starts with those present).
        join_timeout: Seconds round 1 waits for ``expected_sites``.
        evaluate_each_round: Every site scores the average on its test split after each round (the final model,
            head included, is scored in any case: :func:`run_federation`).
    """

    def __init__(
        self,
        reference: DADDA,
        min_sites: int,
        expected_sites: int,
        join_timeout: float,
        evaluate_each_round: bool = True,
    ) -> None:
        super().__init__(
            fraction_evaluate=1.0 if evaluate_each_round else 0.0,
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites,
            min_available_nodes=min_sites,
        )
        self.allowed = allowed_shapes(reference)
        self.expected_sites = expected_sites
        self.join_timeout = join_timeout
        self.dropouts: dict[int, int] = {}
        self.sent: dict[int, int] = {}
        self.site_updates = 0
        self.updates_were_weights_only = True

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if server_round == 1:
            wait_for_sites(grid, self.expected_sites, self.join_timeout)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sent[server_round] = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        answered = [reply for reply in replies if not reply.has_error()]
        for reply in answered:
            self.site_updates += 1
            self.updates_were_weights_only &= _reply_shapes(reply) == {"arrays": self.allowed["arrays"]}
        # A site that fails, or whose node stops reporting, answers with an error (or not at all within round-timeout).
        missing = self.sent.get(server_round, len(replies)) - len(answered)
        if missing:
            self.dropouts[server_round] = missing
            log(
                WARNING,
                "%d site(s) dropped out of round %d; averaging the %d that answered.",
                missing,
                server_round,
                len(answered),
            )
        if not answered:
            msg = f"No site answered round {server_round}; see the sites' (SuperNodes') logs."
            raise RuntimeError(msg)
        return super().aggregate_train(server_round, answered)


def wait_for_sites(grid: Grid, expected: int, timeout: float) -> None:
    """Wait up to ``timeout`` s for ``expected`` sites to connect (then start with those present)."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < expected:
        if time.monotonic() > deadline:
            log(WARNING, "Only %d of %d sites joined within %.0f s; starting with those.", connected, expected, timeout)
            return
        time.sleep(1.0)


def collect_type_statistics(
    grid: Grid, arrays: ArrayRecord, config: ConfigRecord, reference: DADDA, timeout: float | None
) -> tuple[DefectTypeStatistics, int]:
    """Ask every connected site for its defect-type statistics of the global model; ``(pooled, sites that answered)``."""
    record = RecordDict({"arrays": arrays, "config": config})
    messages = [
        Message(content=record, message_type=STATISTICS_QUERY, dst_node_id=node) for node in grid.get_node_ids()
    ]
    types, dim = reference.model.type_weight.shape
    pooled, answered = DefectTypeStatistics.empty(types, dim), 0
    expected = allowed_shapes(reference)["statistics"]
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log(WARNING, "A site did not send defect-type statistics: %s", reply.error.reason)
            continue
        shapes = _reply_shapes(reply)
        if shapes != {"statistics": expected}:
            log(WARNING, "Ignoring defect-type statistics of unexpected shapes %s.", shapes)
            continue
        statistics = reply.content["statistics"]
        pooled = pooled + DefectTypeStatistics.from_arrays([statistics[key].numpy() for key in STATISTICS_KEYS])
        answered += 1
    return pooled, answered


def save_global_checkpoint(model: DADDA, path: Path | str) -> Path:
    """Write ``model`` as a ``DADDA`` Lightning checkpoint (for ``anomalib export/test --ckpt_path``)."""
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


def _metrics(history: Mapping[int, MetricRecord]) -> dict[str, dict[str, float]]:
    return {str(key): {name: float(value) for name, value in record.items()} for key, record in history.items()}


def run_federation(grid: Grid, settings: FederationSettings) -> dict[str, Any]:
    """Train as ``settings.mode`` says, write the checkpoint and its ``.json`` report; returns the report."""
    seed_everything(settings.seed, workers=True)
    model = build_model(settings.model, settings.defect_types)
    if settings.mode == "dislocated":
        details = run_dislocated(grid, settings, model)
    else:
        details = run_together(grid, settings, model)
    checkpoint = save_global_checkpoint(model, settings.output)
    report = {
        "mode": settings.mode,
        "rounds": settings.rounds,
        "checkpoint": str(checkpoint),
        "defect_types": model.type_names,
        **details,
    }
    report_path = checkpoint.with_suffix(".json")
    with atomic_write(report_path) as temporary:
        temporary.write_text(json.dumps(report, indent=2))
    log(INFO, "Global D-ADDA written to %s (report %s).", checkpoint, report_path)
    return report


def run_together(grid: Grid, settings: FederationSettings, model: DADDA) -> dict[str, Any]:
    """FedAvg rounds of whole models, then one defect-type head from every site's per-type feature sums."""
    strategy = DADDAFedAvg(
        model, settings.min_sites, settings.expected_sites, settings.join_timeout, settings.evaluate_each_round
    )
    config = settings.config_record()
    result = strategy.start(
        grid=grid,
        initial_arrays=array_record(state_dict_arrays(model)),
        num_rounds=settings.rounds,
        train_config=config,
        evaluate_config=config,
        timeout=settings.round_timeout,
    )
    load_state_arrays(model, record_arrays(result.arrays))
    statistics, statistics_sites = collect_type_statistics(
        grid, result.arrays, settings.config_record(), model, settings.round_timeout
    )
    model.set_type_head_from_statistics(statistics)
    return {
        "dropouts": {str(key): value for key, value in strategy.dropouts.items()},
        "site_updates": strategy.site_updates,
        "updates_were_weights_only": strategy.updates_were_weights_only,
        "type_head": {
            "sites": statistics_sites,
            "defects_per_type": {
                name: int(count) for name, count in zip(model.type_names, statistics.count.tolist(), strict=False)
            },
        },
        "train_metrics": _metrics(result.train_metrics_clientapp),
        "evaluate_metrics": _metrics(result.evaluate_metrics_clientapp),
        "final_evaluate_metrics": evaluate_everywhere(grid, model, settings),
    }


def site_roles(grid: Grid, settings: FederationSettings) -> dict[int, str]:
    """Ask every connected site for its role (dislocated set-up); sites that do not answer are left out."""
    record = RecordDict({"config": settings.config_record()})
    messages = [Message(content=record, message_type=ROLE_QUERY, dst_node_id=node) for node in grid.get_node_ids()]
    roles = {}
    for reply in grid.send_and_receive(messages, timeout=settings.round_timeout):
        if not reply.has_error():
            roles[reply.metadata.src_node_id] = ROLES[int(reply.content["metrics"]["detector"])]
    return roles


def generator_rounds(grid: Grid, settings: FederationSettings, model: DADDA, defect_sites: list[int]) -> dict[str, Any]:
    """FedAvg of the generator alone over the defect sites, ``settings.rounds`` times; loads it into ``model``."""
    allowed = allowed_shapes(model)
    received: set[str] = set()
    dropouts, updates, weights_only = {}, 0, True
    for server_round in range(1, settings.rounds + 1):
        log(INFO, "[GENERATOR ROUND %d/%d] %d defect site(s)", server_round, settings.rounds, len(defect_sites))
        config = settings.config_record()
        config["server-round"] = server_round
        record = RecordDict({"arrays": array_record(state_dict_arrays(model)), "config": config})
        messages = [Message(content=record, message_type=TRAIN_GENERATOR, dst_node_id=node) for node in defect_sites]
        answered = []
        for reply in grid.send_and_receive(messages, timeout=settings.round_timeout):
            if reply.has_error():
                continue
            shapes = _reply_shapes(reply)
            received |= set(shapes)
            if shapes == {"generator": allowed["generator"]}:
                answered.append(reply)
            else:
                weights_only = False
                log(WARNING, "Ignoring a defect site's reply that is not generator weights: %s", sorted(shapes))
        if len(answered) < len(messages):
            dropouts[server_round] = len(messages) - len(answered)
        if not answered:
            msg = f"No defect site answered generator round {server_round}; see the sites' (SuperNodes') logs."
            raise RuntimeError(msg)
        updates += len(answered)
        averaged = record_arrays(aggregate_arrayrecords([reply.content for reply in answered], "num-examples"))
        load_state_arrays(model, state_dict_arrays(model) | averaged)
    return {
        "dropouts": {str(key): value for key, value in dropouts.items()},
        "site_updates": updates,
        "updates_were_weights_only": weights_only,
        "received": received,
    }


def run_dislocated(grid: Grid, settings: FederationSettings, model: DADDA) -> dict[str, Any]:
    """Generator rounds at the defect sites (generator weights only), then the detector at the detector site."""
    wait_for_sites(grid, settings.expected_sites, settings.join_timeout)
    roles = site_roles(grid, settings)
    defect_sites = sorted(node for node, role in roles.items() if role == "defects")
    detector_sites = sorted(node for node, role in roles.items() if role == "detector")
    if not detector_sites:
        msg = "The dislocated set-up needs a site started with --node-config 'role=\"detector\" ...'; none answered."
        raise RuntimeError(msg)
    if len(defect_sites) < settings.min_sites:
        msg = f"{len(defect_sites)} defect site(s) answered; min-sites={settings.min_sites}."
        raise RuntimeError(msg)
    allowed = allowed_shapes(model)
    rounds = generator_rounds(grid, settings, model, defect_sites)
    received = {"defects": rounds.pop("received"), "detector": set()}
    log(INFO, "[DETECTOR] training at the detector site on defects the global generator draws")
    record = RecordDict({"arrays": array_record(state_dict_arrays(model)), "config": settings.config_record()})
    message = Message(content=record, message_type=TRAIN_DETECTOR, dst_node_id=detector_sites[0])
    [reply] = list(grid.send_and_receive([message], timeout=settings.round_timeout))
    if reply.has_error():
        msg = f"The detector site failed: {reply.error.reason}"
        raise RuntimeError(msg)
    shapes = _reply_shapes(reply)
    received["detector"] |= set(shapes)
    if shapes != {"arrays": allowed["arrays"]}:
        msg = f"The detector site sent {sorted(shapes)} instead of the model's weights."
        raise RuntimeError(msg)
    load_state_arrays(model, record_arrays(reply.content["arrays"]))
    final = evaluate_everywhere(grid, model, settings, defect_sites)
    return {
        "sites": {"defects": len(defect_sites), "detector": len(detector_sites)},
        **rounds,
        "received_from": {role: sorted(names) for role, names in received.items()},
        "final_evaluate_metrics": final,
    }


def evaluate_everywhere(
    grid: Grid, model: DADDA, settings: FederationSettings, nodes: list[int] | None = None
) -> dict[str, float]:
    """Every (or the given) site scores ``model`` on its own test split; the metrics averaged by test-set size."""
    record = RecordDict({"arrays": array_record(state_dict_arrays(model)), "config": settings.config_record()})
    targets = list(grid.get_node_ids()) if nodes is None else nodes
    messages = [Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=node) for node in targets]
    replies = [
        reply for reply in grid.send_and_receive(messages, timeout=settings.round_timeout) if not reply.has_error()
    ]
    if not replies:
        return {}
    metrics = aggregate_metricrecords([reply.content for reply in replies], "num-examples")
    return {name: float(value) for name, value in metrics.items()}


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """The ``ServerApp``: run the federation the run config describes."""
    run_federation(grid, FederationSettings.from_run_config(context.run_config))
