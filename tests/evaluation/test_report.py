"""Report files: JSON, per-mask CSV, summary CSV and the PNG agree; matplotlib stays optional."""
from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

from samtune.evaluation import (
    EvaluationReport,
    MissingOptionalDependency,
    ProtocolConfig,
    format_table,
    plot_click_curves,
    summarize,
    write_report,
)


def _report(name: str, offset: float = 0.0) -> EvaluationReport:
    config = ProtocolConfig(num_clicks=3)
    per_mask = {
        "image_id": ["a", "a", "b"],
        "instance_id": torch.tensor([1, 2, 7]),
        "area": torch.tensor([10.0, 20.0, 30.0]),
        "point_iou": torch.tensor([0.5, 0.25, 0.75]) - offset,
        "point_iou_pred": torch.tensor([0.5, 0.5, 0.5]),
        "point_iou_oracle": torch.tensor([0.75, 0.5, 1.0]),
        "point_iou_single": torch.tensor([0.25, 0.25, 0.25]),
        "click_iou": torch.tensor([[0.5, 0.9, 0.95], [0.25, 0.5, 0.86], [0.75, 0.8, 0.8]]) - offset,
        "click_iou_pred": torch.full((3, 3), 0.5),
        "box_iou": torch.tensor([0.8, 0.9, 1.0]),
        "box_iou_pred": torch.tensor([0.9, 0.9, 0.9]),
        "box_as_mask_iou": torch.tensor([0.5, 0.6, 0.7]),
        "box_jitter_iou": torch.tensor([0.7, 0.8, 0.9]),
        "box_jitter_iou_pred": torch.tensor([0.9, 0.9, 0.9]),
    }
    return EvaluationReport(name=name, config=config, num_images=2, num_masks=3, wall_time_s=2.0,
                            metrics=summarize(per_mask, config), per_mask=per_mask,
                            info={"model": "paint", "checkpoint": "x.pth", "device": "cpu"})


def _rows(path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_summary_hand_values() -> None:
    metrics = _report("d").metrics
    assert metrics["point"]["miou"] == pytest.approx(0.5) and metrics["point"]["miou_oracle"] == pytest.approx(0.75)
    assert metrics["clicks"]["miou"] == pytest.approx([0.5, 0.7333333, 0.87], abs=1e-6)
    # NoC@85: 2, 3, never (3) -> 8/3; NoC@90: 2, never, never -> 8/3; NoF@90 = 2/3.
    assert metrics["clicks"]["noc"] == {"85": pytest.approx(8 / 3), "90": pytest.approx(8 / 3)}
    assert metrics["clicks"]["nof"] == {"85": pytest.approx(1 / 3), "90": pytest.approx(2 / 3)}
    box_ious = torch.as_tensor(_report("d").per_mask["box_iou"], dtype=torch.float64)
    assert metrics["box"] == {"miou": pytest.approx(0.9), "box_as_mask_miou": pytest.approx(0.6),
                              "mdice": pytest.approx(float((2 * box_ious / (1 + box_ious)).mean())),
                              "iou_pred_mae": pytest.approx(0.2 / 3)}  # (0.1 + 0 + 0.1) / 3
    table = format_table(_report("d"))
    assert "box as mask 0.6000" in table and "3: 0.8700" in table and "NoC@90 2.67" in table


def test_summary_is_of_the_columns_given_even_in_an_initialised_process_group(monkeypatch) -> None:
    """``evaluate`` after a DDP fit (process group still up): the click summary is of this process's columns, never
    merged with other ranks' (nor waiting for ranks that do not evaluate)."""
    import torchmetrics.metric

    def other_rank_too(tensor, group=None):  # a second rank whose masks all have IoU 0 (and NoC 0)
        return [tensor, torch.zeros_like(tensor) if tensor.dim() else torch.ones_like(tensor)]

    monkeypatch.setattr(torchmetrics.metric, "jit_distributed_available", lambda: True)
    monkeypatch.setattr(torchmetrics.metric, "gather_all_tensors", other_rank_too)
    metrics = _report("d").metrics
    assert metrics["clicks"]["miou"] == pytest.approx([0.5, 0.7333333, 0.87], abs=1e-6)
    assert metrics["clicks"]["noc"] == {"85": pytest.approx(8 / 3), "90": pytest.approx(8 / 3)}


def test_files_agree(tmp_path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (an optional dependency) is not installed")
    report = _report("nuclei 2d")
    paths, warnings = write_report(report, tmp_path / "out")
    assert warnings == []
    assert {p.name for p in paths.values()} == {"nuclei_2d.json", "nuclei_2d_masks.csv", "summary.csv",
                                                "iou_vs_clicks.png"}
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert data["format"] == "samtune-evaluation/1" and data["num_masks"] == 3 and data["config"]["num_clicks"] == 3
    masks = _rows(paths["masks_csv"])
    assert [r["image_id"] for r in masks] == ["a", "a", "b"] and masks[2]["instance_id"] == "7"
    summary = _rows(paths["summary_csv"])
    assert len(summary) == 1 and summary[0]["name"] == "nuclei 2d" and summary[0]["model"] == "paint"
    for column, per_mask_column in (("point_miou", "point_iou"), ("box_miou", "box_iou"),
                                    ("box_jitter_miou", "box_jitter_iou"), ("click_2", "click_iou_2"),
                                    ("box_as_mask_miou", "box_as_mask_iou")):
        mean = sum(float(r[per_mask_column]) for r in masks) / len(masks)
        assert float(summary[0][column]) == pytest.approx(mean, abs=1e-6), column
        assert data["summary"][column] == pytest.approx(float(summary[0][column]), abs=1e-9), column
    assert data["metrics"]["clicks"]["miou"] == [pytest.approx(float(summary[0][f"click_{i}"])) for i in (1, 2, 3)]
    assert float(summary[0]["noc_85"]) == pytest.approx(data["metrics"]["clicks"]["noc"]["85"])
    # A second dataset in the same folder: the summary and the plot cover both.
    write_report(_report("em", offset=0.1), tmp_path / "out")
    assert [r["name"] for r in _rows(paths["summary_csv"])] == ["em", "nuclei 2d"]


def test_without_matplotlib_the_tables_are_still_written(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    paths, warnings = write_report(_report("d"), tmp_path)
    assert "plot" not in paths and paths["json"].is_file() and paths["summary_csv"].is_file()
    assert len(warnings) == 1 and "matplotlib is not installed" in warnings[0]
    assert "pip install matplotlib" in warnings[0]
    with pytest.raises(MissingOptionalDependency, match="matplotlib is not installed"):
        plot_click_curves({"d": [0.5, 0.6]}, tmp_path / "x.png")
    paths, warnings = write_report(_report("d"), tmp_path, plot=False)
    assert warnings == [] and "plot" not in paths


def test_output_must_be_a_folder(tmp_path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        write_report(_report("d"), target)
    with pytest.raises(ValueError, match="no usable characters"):
        write_report(_report("///"), tmp_path)
