"""Shared fixtures: a tiny demo data set and one tiny RADAR, GLAD and DADDA trained through anomalib's Engine.

Training even a tiny diffusion U-Net costs seconds on 2 CPU cores, so the trained models are
session fixtures that the end-to-end tests share (they only read them).
"""

import ctypes
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from lightning import seed_everything

from anomalib_diffusion.data import MVTecADFewDefects, make_demo_dataset
from anomalib_diffusion.models import DADDA, GLAD, RADAR

# Small enough for CI; RADAR's defaults otherwise (one full-image U-Net pass, no attention). Patch stitching
# (inference_mode="patch") is covered by tests/unit/test_radar.py.
TINY_RADAR = {
    "image_size": 64,
    "patch_size": 32,
    "block_out_channels": (8, 16),
    "max_steps": 6,
    "patches_per_step": 8,
}


# DDIM every 200 steps from 600: timesteps [600, 400, 200, 0]; with adaptive_steps, search steps [400] (the search
# starts after the start step).
TINY_GLAD = {
    "image_size": 64,
    "patch_size": 32,
    "block_out_channels": (8, 16),
    "attention_resolutions": (16,),
    "num_inference_steps": 5,
    "start_timestep": 600,
    "min_timestep": 300,
    "max_steps": 6,
    "patches_per_step": 4,
    "calibration_fraction": 0.25,
}


# Generator crops of 32 on 64x64 images, 3 DDIM steps, 4 generated defects per type; 4 generator then 4 detector steps.
TINY_DADDA = {
    "image_size": 64,
    "patch_size": 32,
    "block_out_channels": (8, 16),
    "attention_resolutions": (16,),
    "generation_steps": 3,
    "detector_width": 8,
    "max_defect_types": 6,
    "procedural_seeds": 8,
    "generator_steps": 4,
    "detector_steps": 4,
    "type_samples_per_type": 4,
    "generated_pool": 4,
}


# The suite's shared trained models (trained_radar, trained_glad, trained_dadda) get more steps than the
# TINY settings, enough to rank the demo's defective images above its good ones (tests/integration/test_quality.py):
# measured with seed 0, image AUROC RADAR 0.844, GLAD 0.875, DADDA 0.875, in 12, 19 and 8 s on 2 CPU cores
# (at 6 / 6 / 4 + 4 steps: 0.453, 0.750, 0.438).
REFERENCE_RADAR = TINY_RADAR | {"max_steps": 100}
# The shared GLAD runs the paper's adaptive steps (ADS + SAFF, off by default) so that their calibration, export
# and resume are tested end to end; the CLI and benchmark tests run GLAD's default, plain DDIM.
REFERENCE_GLAD = TINY_GLAD | {"max_steps": 200, "adaptive_steps": True}
REFERENCE_DADDA = TINY_DADDA | {"generator_steps": 10, "detector_steps": 40}


# glibc's mallopt parameter number for the mmap threshold (malloc.h).
M_MMAP_THRESHOLD = -3


def pytest_configure(config: pytest.Config) -> None:
    """Serve every allocation of 1 MiB or more from its own mapping, returned to the system when freed.

    The suite runs every model in one long process. By default glibc raises its mmap threshold each time a large
    mapped block is freed, after which such blocks come from the heap; anomalib's coreset loop (PatchCore's
    ``KCenterGreedy``) then allocates a 5 MB temporary per iteration between small long-lived ones, and the
    heap fragmented by one hole per iteration: the process reached 24 GB and was killed by the OOM killer in
    ``tests/integration/test_peers_export.py``, only after the tests before it. A fixed threshold keeps it near
    1.5 GB. No effect where the C library is not glibc.
    """
    del config
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # scripts/test.sh runs one worker per core: a second torch thread per worker would only contend for them.
        torch.set_num_threads(1)
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


# Test files whose tests use the suite's shared trained models (the session fixtures trained_radar, radar_openvino ...).
SHARED_MODEL_FILES = {
    "test_radar_end_to_end",
    "test_glad_end_to_end",
    "test_dadda_end_to_end",
    "test_quality",
    "test_precision",
    "test_resume",
}
MODELS = ("radar", "glad", "dadda")


def worker_group(nodeid: str) -> str:
    """Which tests share a worker when scripts/test.sh runs the suite on one worker per core (pytest-xdist).

    A worker is its own process with its own session and module fixtures: the tests that use one trained model go
    to one worker (that model is trained once), and every other file stays whole (its module fixtures run once).
    In the shared-model files a test is grouped by the model in its file name or its parameters; the few that
    use no model there (or RADAR's by fixture) go with RADAR.
    """
    path, _, name = nodeid.partition("::")
    stem = Path(path).stem
    if stem not in SHARED_MODEL_FILES:
        return stem
    words = stem.split("_") + name.partition("[")[2].rstrip("]").lower().split("-")
    return next((model for model in MODELS if model in words), "radar")


# The groups that take longest (each a minute or more on 2 cores), handed out first so that no worker is left with
# a long one at the end; the rest follow in collection order.
LONGEST_GROUPS = (
    "test_federated_deployment",
    "test_federated",
    "test_cli",
    "glad",
    "radar",
    "test_peers_export",
    "dadda",
    "test_registration",
)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist's scope scheduling over :func:`worker_group` (its ``loadgroup`` does not group on pytest 9)."""
    from xdist.scheduler import LoadScopeScheduling

    def priority(nodeid: str) -> int:
        group = worker_group(nodeid)
        return LONGEST_GROUPS.index(group) if group in LONGEST_GROUPS else len(LONGEST_GROUPS)

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

        def schedule(self) -> None:
            if self.collection is None:  # the first call: order the work before it is split into groups
                self.config.option.loadscopereorder = False
                for node, collection in self.registered_collections.items():
                    self.registered_collections[node] = sorted(collection, key=priority)
            super().schedule()

    return ByGroup(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration trains a model or runs real processes: mark it ``slow``."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.slow)


@dataclass
class TrainedModel:
    engine: Engine
    model: RADAR | GLAD | DADDA
    datamodule: MVTecAD
    checkpoint: Path
    root: Path
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # the model's state_dict right after fit


def tiny_datamodule(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="brick", train_batch_size=4, eval_batch_size=4, num_workers=0, seed=0)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(
        root,
        categories=("brick",),
        n_train=8,
        n_test_good=4,
        n_test_per_defect=2,
        image_size=64,
        seed=0,
        progress=False,
    )
    return root


def few_defects_datamodule(root: Path, defects_per_type: int = 1) -> MVTecADFewDefects:
    return MVTecADFewDefects(
        root=root,
        category="brick",
        defects_per_type=defects_per_type,
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        seed=0,
    )


def tiny_engine(work: Path, callbacks: list | None = None) -> Engine:
    """anomalib's ``Engine`` on the CPU, writing under ``work``, without logger or progress bar."""
    return Engine(
        default_root_dir=work,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        callbacks=callbacks or [],
    )


def train_tiny(
    model: RADAR | GLAD | DADDA,
    demo_root: Path,
    work: Path,
    datamodule: MVTecAD | None = None,
    callbacks: list | None = None,
) -> TrainedModel:
    datamodule = datamodule or tiny_datamodule(demo_root)
    engine = tiny_engine(work, callbacks)
    engine.fit(model=model, datamodule=datamodule)
    checkpoint = Path(
        engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    )
    return TrainedModel(engine=engine, model=model.eval(), datamodule=datamodule, checkpoint=checkpoint, root=work)


def train_reference(
    model_class: type[RADAR | GLAD | DADDA], settings: dict, demo_root: Path, work: Path, datamodule: MVTecAD
) -> TrainedModel:
    """The suite's one training run of a model: seeded, with a resume checkpoint at every epoch end.

    tests/integration/test_resume.py compares an interrupted and resumed run against exactly this run,
    so the end-to-end tests and the resume test share it.
    """
    seed_everything(0)
    model = model_class(**settings)
    model.resume_checkpoint_interval = 0.0
    trained = train_tiny(model, demo_root, work, datamodule)
    trained.state = {key: value.detach().clone() for key, value in trained.model.state_dict().items()}
    return trained


@pytest.fixture(scope="session")
def trained_radar(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    work = tmp_path_factory.mktemp("radar_run")
    return train_reference(RADAR, REFERENCE_RADAR, demo_root, work, tiny_datamodule(demo_root))


@pytest.fixture(scope="session")
def trained_radar_t10(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """The shared RADAR at the earlier default timestep t = 10, where its bf16 promise was measured.

    Trained only by tests that run on CPUs with bf16 (tests/integration/test_precision.py): at the default t = 1 the
    diffusion noise is 3x smaller against bf16's rounding, and RADAR promises nothing in bf16 (docs/deployment.md).
    """
    work = tmp_path_factory.mktemp("radar_t10_run")
    return train_reference(RADAR, REFERENCE_RADAR | {"timestep": 10}, demo_root, work, tiny_datamodule(demo_root))


@pytest.fixture(scope="session")
def trained_glad(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    work = tmp_path_factory.mktemp("glad_run")
    return train_reference(GLAD, REFERENCE_GLAD, demo_root, work, tiny_datamodule(demo_root))


@pytest.fixture(scope="session")
def trained_dadda(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """DADDA with one real defect of each of the four demo types lent from the test split."""
    work = tmp_path_factory.mktemp("dadda_run")
    return train_reference(DADDA, REFERENCE_DADDA, demo_root, work, few_defects_datamodule(demo_root))


def export_openvino(trained: TrainedModel, root: Path, keep_onnx: Path | None = None) -> Path:
    """The model's OpenVINO IR as ``anomalib export`` writes it (dynamic height and width).

    anomalib converts to OpenVINO from an ONNX file that it writes with ``to_onnx`` into a temporary folder;
    ``keep_onnx`` keeps a copy of that file, so that a test of the ONNX export needs no second export. What this
    package logs during the export is kept too: :func:`export_messages` reads it.
    """
    to_onnx = trained.model.to_onnx

    def to_onnx_and_keep(*args: object, **kwargs: object) -> Path:
        path = Path(to_onnx(*args, **kwargs))
        shutil.copy(path, keep_onnx)
        for weights in path.parent.glob(f"{path.name}.data"):  # weights stored next to the graph
            shutil.copy(weights, keep_onnx.parent / f"{keep_onnx.name}.data")
        return path

    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    package_logger = logging.getLogger("anomalib_diffusion")
    level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    if keep_onnx is not None:
        trained.model.to_onnx = to_onnx_and_keep
    try:
        model_xml = trained.engine.export(model=trained.model, export_type=ExportType.OPENVINO, export_root=root)
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(level)
        if keep_onnx is not None:
            del trained.model.to_onnx
    (root / "export_messages.json").write_text(json.dumps(messages))
    return model_xml


def export_messages(model_xml: Path) -> list[str]:
    """What this package logged while :func:`export_openvino` wrote ``model_xml``."""
    return json.loads((model_xml.parents[2] / "export_messages.json").read_text())


@pytest.fixture(scope="session")
def radar_openvino(trained_radar: TrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_openvino(trained_radar, tmp_path_factory.mktemp("radar_ov"))


@pytest.fixture(scope="session")
def radar_t10_openvino(trained_radar_t10: TrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_openvino(trained_radar_t10, tmp_path_factory.mktemp("radar_t10_ov"))


@pytest.fixture(scope="session")
def glad_openvino(trained_glad: TrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GLAD's export costs about 40 s on 2 cores (a DDIM loop of U-Net calls): made once, with its ONNX file kept."""
    root = tmp_path_factory.mktemp("glad_ov")
    return export_openvino(trained_glad, root, keep_onnx=root / "model.onnx")


@pytest.fixture(scope="session")
def glad_onnx(glad_openvino: Path) -> Path:
    """The ONNX file that the export of ``glad_openvino`` converted (``to_onnx``, as ``anomalib export`` runs it)."""
    return glad_openvino.parents[2] / "model.onnx"


@pytest.fixture(scope="session")
def dadda_openvino(trained_dadda: TrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_openvino(trained_dadda, tmp_path_factory.mktemp("dadda_ov"))
