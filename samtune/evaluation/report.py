"""Evaluation results: the summary metrics, the printed table and the JSON / CSV / PNG files.

Files written by :func:`write_report` into an output folder (several datasets may share one folder):

* ``<name>.json``: configuration, counts, wall time, the nested metrics and the flat summary row;
* ``<name>_masks.csv``: one row per mask (image id, instance id, GT area, the IoUs of every protocol);
* ``summary.csv``: one row per dataset, rebuilt from every ``<name>.json`` report in the folder;
* ``iou_vs_clicks.png``: mean IoU against the number of clicks, one curve per dataset of the folder (needs the
  optional dependency matplotlib; without it the other files are still written and the reason is returned).

Metric names (flat summary): ``point_miou`` (click 1, the configured output), ``point_miou_oracle`` (best of the
three multimask outputs), ``point_miou_single_output`` (token 0), ``box_miou``, ``box_mdice`` (mean Dice),
``box_as_mask_miou`` (IoU of the filled box: the baseline), ``box_jitter_miou``, ``click_1..click_k`` (mIoU after
i clicks), ``click_dice_1..click_dice_k`` (mean Dice after i clicks), ``noc_85`` / ``noc_90`` (mean clicks to
reach the IoU, k when never reached), ``nof_85`` / ``nof_90`` (fraction never reaching it in k clicks) and
``*_iou_pred_mae`` (mean absolute error of the IoU head).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from samtune.evaluation.protocols import ProtocolConfig
from samtune.metrics import ClickIoU, dice_from_iou, noc_tag

__all__ = [
    "FORMAT",
    "EvaluationReport",
    "MissingOptionalDependency",
    "format_table",
    "plot_click_curves",
    "safe_name",
    "summarize",
    "write_report",
]

FORMAT = "samtune-evaluation/1"
SUMMARY_CSV = "summary.csv"
PLOT_PNG = "iou_vs_clicks.png"


class MissingOptionalDependency(ImportError):
    """An optional dependency (matplotlib for the plot) is not installed."""


def _mean(values: torch.Tensor) -> float | None:
    return float(values.double().mean()) if values.numel() else None


def _mae(pred: torch.Tensor, actual: torch.Tensor) -> float | None:
    return _mean((pred.double() - actual.double()).abs())


def summarize(per_mask: dict[str, Any], config: ProtocolConfig) -> dict[str, Any]:
    """Nested metrics from per-mask columns (see the module docstring).

    Args:
        per_mask: columns from :class:`samtune.evaluation.ProtocolRunner` (``[M]`` / ``[M, k]`` tensors).
        config: the protocols that ran.

    Returns:
        ``{"point": {...}, "box": {...}, "box_jitter": {...}, "clicks": {...}}`` for the protocols run.
    """
    out: dict[str, Any] = {}
    if "point" in config.protocols:
        out["point"] = {
            "miou": _mean(per_mask["point_iou"]),
            "miou_oracle": _mean(per_mask["point_iou_oracle"]),
            "miou_single_output": _mean(per_mask["point_iou_single"]),
            "iou_pred_mae": _mae(per_mask["point_iou_pred"], per_mask["point_iou"]),
        }
    if "box" in config.protocols:
        out["box"] = {
            "miou": _mean(per_mask["box_iou"]),
            "mdice": _mean(dice_from_iou(per_mask["box_iou"])),
            "box_as_mask_miou": _mean(per_mask["box_as_mask_iou"]),
            "iou_pred_mae": _mae(per_mask["box_iou_pred"], per_mask["box_iou"]),
        }
    if "box_jitter" in config.protocols:
        out["box_jitter"] = {
            "miou": _mean(per_mask["box_jitter_iou"]),
            "iou_pred_mae": _mae(per_mask["box_jitter_iou_pred"], per_mask["box_jitter_iou"]),
        }
    if "clicks" in config.protocols:
        ious = per_mask["click_iou"]
        # The columns are this process's whole result: no sync (under an initialised process group, e.g. after a
        # DDP fit, compute() would merge the other ranks' masks in, or wait forever for ranks that do not evaluate).
        metric = ClickIoU(config.num_clicks, config.noc_thresholds, sync_on_compute=False)
        if ious.shape[0]:
            metric.update(ious, click_iou_pred=per_mask["click_iou_pred"])
            values = {k: float(v) for k, v in metric.compute().items()}
        else:
            values = {}
        tags = [noc_tag(t) for t in config.noc_thresholds]
        out["clicks"] = {
            "max_clicks": config.num_clicks,
            "miou": [values.get(f"iou_click_{i + 1}") for i in range(config.num_clicks)],
            "mdice": [values.get(f"dice_click_{i + 1}") for i in range(config.num_clicks)],
            "noc": {tag: values.get(f"noc_{tag}") for tag in tags},
            "nof": {tag: values.get(f"nof_{tag}") for tag in tags},
            "iou_pred_mae": values.get("iou_pred_mae"),
        }
    return out


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The flat summary row (column name -> value) of nested metrics."""
    flat: dict[str, float | None] = {}
    if "point" in metrics:
        p = metrics["point"]
        flat.update(point_miou=p["miou"], point_miou_oracle=p["miou_oracle"],
                    point_miou_single_output=p["miou_single_output"], point_iou_pred_mae=p["iou_pred_mae"])
    if "box" in metrics:
        b = metrics["box"]
        flat.update(box_miou=b["miou"], box_mdice=b["mdice"], box_as_mask_miou=b["box_as_mask_miou"],
                    box_iou_pred_mae=b["iou_pred_mae"])
    if "box_jitter" in metrics:
        j = metrics["box_jitter"]
        flat.update(box_jitter_miou=j["miou"], box_jitter_iou_pred_mae=j["iou_pred_mae"])
    if "clicks" in metrics:
        c = metrics["clicks"]
        flat.update({f"click_{i + 1}": v for i, v in enumerate(c["miou"])})
        flat.update({f"click_dice_{i + 1}": v for i, v in enumerate(c["mdice"])})
        flat.update({f"noc_{t}": v for t, v in c["noc"].items()})
        flat.update({f"nof_{t}": v for t, v in c["nof"].items()})
        flat["clicks_iou_pred_mae"] = c["iou_pred_mae"]
    return flat


@dataclass
class EvaluationReport:
    """Result of :func:`samtune.evaluation.evaluate` on one dataset.

    Attributes:
        name: dataset name (used in file names and tables).
        config: the protocols.
        num_images: samples evaluated (images, or tiles with ``crop_size``; ``info["crop_size"]`` is then set).
        num_masks: masks evaluated.
        wall_time_s: wall time of the evaluation loop (loading, encoding, protocols).
        metrics: nested metrics (:func:`summarize`).
        per_mask: per-mask columns: ``image_id`` (list of str), ``instance_id`` ``[M]`` and the protocol
            columns (``[M]`` or ``[M, k]`` tensors).
        info: device, precision, model, checkpoint and other run facts.
    """

    name: str
    config: ProtocolConfig
    num_images: int
    num_masks: int
    wall_time_s: float
    metrics: dict[str, Any]
    per_mask: dict[str, Any] = field(repr=False)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, float | None]:
        """The flat metrics row (see the module docstring)."""
        return flatten_metrics(self.metrics)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready content of ``<name>.json`` (no per-mask data)."""
        return {
            "format": FORMAT,
            "name": self.name,
            "num_images": self.num_images,
            "num_masks": self.num_masks,
            "wall_time_s": round(self.wall_time_s, 3),
            "images_per_s": round(self.num_images / self.wall_time_s, 3) if self.wall_time_s > 0 else None,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.config).items()},
            "info": self.info,
            "metrics": self.metrics,
            "summary": self.summary,
        }

    def mask_rows(self) -> tuple[list[str], list[list[Any]]]:
        """Header and rows of ``<name>_masks.csv``."""
        header: list[str] = []
        columns: list[list[Any]] = []
        for key, value in self.per_mask.items():
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                for i in range(value.shape[1]):
                    header.append(f"{key}_{i + 1}")
                    columns.append(value[:, i].tolist())
            else:
                header.append(key)
                columns.append(value.tolist() if isinstance(value, torch.Tensor) else list(value))
        rows = [list(r) for r in zip(*columns)] if columns else []
        return header, rows


def safe_name(name: str) -> str:
    """``name`` made safe for file names (letters, digits, ``-``, ``_``, ``.``)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    if not cleaned:
        raise ValueError(f"dataset name {name!r} has no usable characters for a file name")
    return cleaned


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(report: EvaluationReport) -> str:
    """A plain-text table of the report for the terminal."""
    m, info = report.metrics, report.info
    samples = f"{report.num_images} images"
    if info.get("crop_size"):  # every sample is a tile "<image id>@<top>,<left>"
        images = {str(i).rpartition("@")[0] for i in report.per_mask.get("image_id", [])}
        samples = f"{report.num_images} tiles of {len(images)} images"
    head = (f"{report.name}: {samples}, {report.num_masks} masks"
            f" | model {info.get('model', '?')} | IoU at {report.config.iou_resolution} resolution"
            f" | {report.wall_time_s:.1f} s on {info.get('device', '?')}")
    lines = [head]
    empty, dropped = int(info.get("masks_empty_at_input", 0)), int(info.get("dropped_masks", 0))
    if empty:
        plural = "s" if empty != 1 else ""
        how = "not evaluated" if dropped else "evaluated at the original resolution"
        lines.append(f"  ({empty} mask{plural} empty at the model input, {how})")
    lines.append(f"  {'protocol':<12}{'mIoU':>8}   details")
    if "point" in m:
        p = m["point"]
        lines.append(f"  {'point':<12}{_fmt(p['miou']):>8}   oracle {_fmt(p['miou_oracle'])}, "
                     f"single output {_fmt(p['miou_single_output'])}")
    if "box" in m:
        b = m["box"]
        lines.append(f"  {'box':<12}{_fmt(b['miou']):>8}   Dice {_fmt(b['mdice'])}, "
                     f"box as mask {_fmt(b['box_as_mask_miou'])}")
    if "box_jitter" in m:
        cfg = report.config
        lines.append(f"  {'box_jitter':<12}{_fmt(m['box_jitter']['miou']):>8}   noise std "
                     f"{cfg.box_noise_std_fraction:g} x side, max {cfg.box_noise_max:g} px, seed {cfg.seed}")
    if "clicks" in m:
        c = m["clicks"]
        lines.append(f"  {'clicks':<12}" + "  ".join(f"{i + 1}: {_fmt(v)}" for i, v in enumerate(c["miou"])))
        noc = ", ".join(f"NoC@{t} {_fmt(v, 2)} (NoF {_fmt(c['nof'][t], 3)})" for t, v in c["noc"].items())
        lines.append(f"  {'':<12}{noc}; max {c['max_clicks']} clicks")
    return "\n".join(lines)


def plot_click_curves(curves: dict[str, Sequence[float | None]], path: str | Path, title: str = "") -> Path:
    """Plot mean IoU against the number of clicks, one line per dataset.

    Args:
        curves: dataset name -> mIoU after 1..k clicks.
        path: the PNG to write.
        title: figure title.

    Raises:
        MissingOptionalDependency: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingOptionalDependency(
            "matplotlib is not installed, so the IoU-vs-clicks plot was not drawn (the JSON and CSV reports are "
            "complete); install it with `pip install matplotlib` to get the PNG"
        ) from exc
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, values in curves.items():
        xs = [i + 1 for i, v in enumerate(values) if v is not None]
        ax.plot(xs, [v for v in values if v is not None], marker="o", label=name)
    ax.set_xlabel("number of clicks")
    ax.set_ylabel("mean IoU")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(loc="best")
        ax.set_xticks(range(1, max(len(v) for v in curves.values()) + 1))
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _folder_reports(folder: Path) -> list[dict[str, Any]]:
    """Every samtune evaluation JSON in ``folder``, sorted by name."""
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("format") == FORMAT:
            found.append(data)
    return sorted(found, key=lambda d: str(d.get("name")))


def _write_summary_csv(reports: list[dict[str, Any]], path: Path) -> None:
    lead = ["name", "model", "checkpoint", "num_images", "num_masks", "iou_resolution", "wall_time_s"]
    metric_keys: list[str] = []
    for data in reports:
        metric_keys.extend(k for k in data["summary"] if k not in metric_keys)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(lead + metric_keys)
        for data in reports:
            info, cfg = data.get("info", {}), data.get("config", {})
            row = [data["name"], info.get("model", ""), info.get("checkpoint", ""), data["num_images"],
                   data["num_masks"], cfg.get("iou_resolution", ""), data["wall_time_s"]]
            row += ["" if data["summary"].get(k) is None else data["summary"][k] for k in metric_keys]
            writer.writerow(row)


def write_report(
    report: EvaluationReport, output_dir: str | Path, plot: bool = True
) -> tuple[dict[str, Path], list[str]]:
    """Write the report's files (see the module docstring) into ``output_dir`` (created if needed).

    Args:
        report: the evaluation result.
        output_dir: the folder.
        plot: draw ``iou_vs_clicks.png`` (when some report of the folder has click results).

    Returns:
        ``(paths, warnings)``: the files written by kind (``json``, ``masks_csv``, ``summary_csv``, ``plot``)
        and messages about files not written (e.g. matplotlib missing).
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    stem = safe_name(report.name)
    paths: dict[str, Path] = {}
    warnings: list[str] = []
    paths["json"] = out / f"{stem}.json"
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    header, rows = report.mask_rows()
    paths["masks_csv"] = out / f"{stem}_masks.csv"
    with paths["masks_csv"].open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    reports = _folder_reports(out)
    paths["summary_csv"] = out / SUMMARY_CSV
    _write_summary_csv(reports, paths["summary_csv"])
    curves = {d["name"]: d["metrics"]["clicks"]["miou"] for d in reports if "clicks" in d.get("metrics", {})}
    if plot and curves:
        try:
            paths["plot"] = plot_click_curves(curves, out / PLOT_PNG, title="mean IoU vs clicks")
        except MissingOptionalDependency as exc:
            warnings.append(str(exc))
    return paths, warnings
