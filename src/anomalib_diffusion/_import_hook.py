"""Register the package's models with anomalib as soon as ``anomalib.models`` is imported.

anomalib 2.7 reads no entry points. Its CLI resolves ``--model RADAR`` with jsonargparse
against the ``AnomalibModule`` subclasses already imported when parsing starts, and
``anomalib.models.get_model`` (used by ``anomalib benchmark``) only looks at direct subclasses
and at attributes of ``anomalib.models``. Users type the unmodified ``anomalib`` command, so
a wrapper script cannot help. Instead, the ``anomalib_diffusion.pth`` file installed next to
the package calls :func:`install` at interpreter start-up; it puts a one-shot finder on
``sys.meta_path`` that wraps the loader of ``anomalib.models`` so that, right after that
module has executed, :mod:`anomalib_diffusion.models` is imported and aliases its classes
into ``anomalib.models``. The same finder wraps ``anomalib.pipelines.benchmark.job`` and ``anomalib.loggers`` so
that :mod:`anomalib_diffusion.compat` can fix how ``anomalib benchmark`` gathers results of mixed models and let the
CLI print each log line once.

This module must stay import-cheap: it runs in every Python process of the environment
(``python -c pass`` must not import torch).
"""

import importlib.abc
import importlib.machinery
import logging
import sys
from types import ModuleType

from anomalib_diffusion import _MODELS, _PEERS  # the package __init__ is import-cheap by design

logger = logging.getLogger(__name__)

TARGET_MODULE = "anomalib.models"
BENCHMARK_JOB_MODULE = "anomalib.pipelines.benchmark.job"  # == compat.BENCHMARK_JOB_MODULE (kept import-cheap)
LOGGERS_MODULE = "anomalib.loggers"  # == compat.LOGGERS_MODULE
PLUGIN_MODULE = "anomalib_diffusion.models"
PLUGIN_CLASSES = (*_MODELS, *_PEERS)


class _RegisteringLoader(importlib.abc.Loader):
    """Delegate loading to anomalib's own loader, then run the plugin's after-import step."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _after_import(module)

    def __getattr__(self, name: str) -> object:
        # importlib.resources, pkgutil and friends ask the loader for more than exec_module.
        return getattr(self._loader, name)


class _AnomalibModelsFinder(importlib.abc.MetaPathFinder):
    """Find ``anomalib.models`` with the regular finders and wrap its loader."""

    def find_spec(
        self,
        fullname: str,
        path: list[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET_MODULE and fullname not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def _plugin_is_importing() -> bool:
    """True while any ``anomalib_diffusion`` submodule is half-way through its own import."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name.startswith("anomalib_diffusion.") and name != __name__
    )


def _lazy_models_getattr(name: str) -> object:
    if name in PLUGIN_CLASSES:
        return getattr(importlib.import_module(PLUGIN_MODULE), name)
    msg = f"module {TARGET_MODULE!r} has no attribute {name!r}"
    raise AttributeError(msg)


def register_models() -> None:
    """Import the plugin's models; their package aliases them into ``anomalib.models``.

    A broken plugin must never break anomalib itself, so failures are logged, not raised.
    When one of the plugin's own modules triggered the import of ``anomalib.models`` (the user
    imported ``anomalib_diffusion.components`` first, say), importing the models now would
    re-enter that half-initialised module; ``anomalib.models`` then resolves the names lazily.
    """
    if PLUGIN_MODULE in sys.modules:
        return
    if _plugin_is_importing():
        sys.modules[TARGET_MODULE].__getattr__ = _lazy_models_getattr  # type: ignore[attr-defined]
        return
    try:
        importlib.import_module(PLUGIN_MODULE)
    except Exception:
        logger.warning("anomalib-diffusion could not register its models with anomalib.", exc_info=True)


# anomalib modules that anomalib_diffusion.compat patches right after they load: the compat function, and what it
# fixes (for the warning if it fails). ``anomalib benchmark`` collecting results of mixed models; the CLI printing
# each log line once.
PATCHES = {
    BENCHMARK_JOB_MODULE: ("patch_benchmark_job", "benchmark result collection"),
    LOGGERS_MODULE: ("patch_configure_logger", "console logging"),
}


def apply_patch(module: ModuleType) -> None:
    """Apply :mod:`anomalib_diffusion.compat`'s fix for one of the :data:`PATCHES` modules; never raise."""
    function, what = PATCHES[module.__name__]
    try:
        getattr(importlib.import_module("anomalib_diffusion.compat"), function)(module)
    except Exception:
        logger.warning("anomalib-diffusion could not patch anomalib's %s.", what, exc_info=True)


def _after_import(module: ModuleType) -> None:
    if module.__name__ == TARGET_MODULE:
        register_models()
    elif module.__name__ in PATCHES:
        apply_patch(module)


def install() -> None:
    """Arrange for the plugin's models to be registered whenever anomalib's models load."""
    loaded = [name for name in PATCHES if name in sys.modules]
    for name in loaded:
        apply_patch(sys.modules[name])
    if TARGET_MODULE in sys.modules:
        register_models()
        if len(loaded) == len(PATCHES):
            return
    if not any(isinstance(finder, _AnomalibModelsFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AnomalibModelsFinder())
