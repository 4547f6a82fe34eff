"""Evaluation of promptable segmentation: the SAM paper's point, box and interactive-click protocols.

``samtune evaluate`` (:mod:`samtune.evaluation.cli`) is the command line; the API is::

    from samtune.evaluation import ProtocolConfig, dataset_options, evaluate, write_report

    config = ProtocolConfig(protocols=("point", "box", "clicks"), num_clicks=5)
    dataset = MaskFolderDataset(images, masks, **dataset_options(model, config))
    report = evaluate(model, dataset, config, name="em")
    print(format_table(report)); write_report(report, "eval/")

No Lightning import here (``--config`` in the CLI imports the datamodules only when used).
"""
from samtune.evaluation.protocols import PROTOCOLS, ImageTarget, ProtocolConfig, ProtocolRunner, sample_seed
from samtune.evaluation.report import (
    EvaluationReport,
    MissingOptionalDependency,
    format_table,
    plot_click_curves,
    summarize,
    write_report,
)
from samtune.evaluation.runner import ALL_MASKS, check_dataset, dataset_options, evaluate

__all__ = [
    "ALL_MASKS",
    "PROTOCOLS",
    "EvaluationReport",
    "ImageTarget",
    "MissingOptionalDependency",
    "ProtocolConfig",
    "ProtocolRunner",
    "check_dataset",
    "dataset_options",
    "evaluate",
    "format_table",
    "plot_click_curves",
    "sample_seed",
    "summarize",
    "write_report",
]
