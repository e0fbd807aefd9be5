"""Fixes for anomalib 2.7 behaviour that stops its own pipelines from working with mixed models.

``anomalib benchmark`` gathers one result dictionary per job (the job's flattened config plus its
test metrics) with :meth:`anomalib.pipelines.benchmark.job.BenchmarkJob.collect`, which takes the
columns from the *first* job only. A grid that mixes models with different ``init_args`` (RADAR's
``max_steps``, DRAEM's ``max_epochs``, ...) or different metrics (DADDA's ``defect_type_accuracy``)
then raises ``KeyError`` after every job has run; anomalib logs it and still exits 0, and no
``results.csv`` is written. :func:`collect_benchmark_results` keeps the union of the columns in
first-seen order and leaves a cell empty where a job has no such key.

The import hook (:mod:`anomalib_diffusion._import_hook`) applies :func:`patch_benchmark_job` right
after anomalib's ``anomalib.pipelines.benchmark.job`` module loads, so the unmodified
``anomalib benchmark`` command gets it. Nothing else in anomalib is changed.
"""

from types import ModuleType
from typing import Any

BENCHMARK_JOB_MODULE = "anomalib.pipelines.benchmark.job"


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
