"""Fixes for anomalib 2.7 behaviour that stops its own pipelines from working with mixed models.

``anomalib benchmark`` gathers one result dictionary per job (the job's flattened config plus its
test metrics) with :meth:`anomalib.pipelines.benchmark.job.BenchmarkJob.collect`, which takes the
columns from the *first* job only. A grid that mixes models with different ``init_args`` (RADAR's
``max_steps``, DRAEM's ``max_epochs``, ...) or different metrics (DADDA's ``defect_type_accuracy``)
then raises ``KeyError`` after every job has run; anomalib logs it and still exits 0, and no
``results.csv`` is written. :func:`collect_benchmark_results` keeps the union of the columns in
first-seen order and leaves a cell empty where a job has no such key.

The ``anomalib`` CLI calls :func:`anomalib.loggers.configure_logger`, which adds a rich handler to the root logger
and to Lightning's beside the plain console handlers already there (``logging.basicConfig``'s, Lightning's own):
every INFO line of a run is printed twice. :func:`patch_configure_logger` wraps it so that each of the two loggers
keeps one console handler, the plain one (its lines do not wrap); no record is dropped, each is printed once.

The import hook (:mod:`anomalib_diffusion._import_hook`) applies :func:`patch_benchmark_job` right
after anomalib's ``anomalib.pipelines.benchmark.job`` module loads, and :func:`patch_configure_logger` right after
``anomalib.loggers`` loads, so the unmodified ``anomalib`` command gets them. Nothing else in anomalib is changed.
"""

import functools
import logging
import sys
from types import ModuleType
from typing import Any

BENCHMARK_JOB_MODULE = "anomalib.pipelines.benchmark.job"
LOGGERS_MODULE = "anomalib.loggers"
# The loggers anomalib's configure_logger gives a rich handler: the root logger and Lightning's.
CONFIGURED_LOGGERS = ("", "lightning.pytorch")


def collect_benchmark_results(results: list[dict[str, Any]]) -> "Any":  # noqa: ANN401  (pandas is imported lazily)
    """One row per job; columns are the union of all jobs' keys, in the order first seen."""
    import pandas as pd

    columns: dict[str, None] = {}
    for result in results:
        columns.update(dict.fromkeys(result))
    return pd.DataFrame([{key: result.get(key) for key in columns} for result in results], columns=list(columns))


def patch_benchmark_job(module: ModuleType) -> None:
    """Replace ``BenchmarkJob.collect`` in anomalib's loaded benchmark job module (idempotent)."""
    job_class = getattr(module, "BenchmarkJob", None)
    if job_class is not None:
        job_class.collect = staticmethod(collect_benchmark_results)


def one_console_handler(logger: logging.Logger) -> None:
    """Keep one of a logger's console handlers: its first plain one if it has one, else its first rich one.

    Console handlers are rich handlers and plain ``StreamHandler``s writing to stdout or stderr; file handlers and
    anything else stay. The plain handler is kept because its lines never wrap: a rich console wraps at its width (80
    columns when the output is not a terminal), which breaks long lines such as the compile config ``anomalib
    export`` prints for copying.
    """
    from rich.logging import RichHandler

    console = [
        handler
        for handler in logger.handlers
        if isinstance(handler, RichHandler)
        or (type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr))
    ]
    if len(console) < 2:  # noqa: PLR2004
        return
    plain = [handler for handler in console if not isinstance(handler, RichHandler)]
    keep = (plain or console)[0]
    for handler in console:
        if handler is not keep:
            logger.removeHandler(handler)


def patch_configure_logger(module: ModuleType) -> None:
    """Wrap ``configure_logger`` in anomalib's loaded ``anomalib.loggers`` module (idempotent)."""
    original = getattr(module, "configure_logger", None)
    if original is None or getattr(original, "__wrapped__", None) is not None:
        return

    @functools.wraps(original)
    def configure_logger(*args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        original(*args, **kwargs)
        for name in CONFIGURED_LOGGERS:
            one_console_handler(logging.getLogger(name))

    module.configure_logger = configure_logger
