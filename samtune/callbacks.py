"""Lightning callbacks of the ``samtune`` CLI: progress bar, parameter counts, validation overlays, final
checkpoint, config logging.

The CLI adds :class:`SamtuneProgressBar`, :class:`ParameterCounts`, :class:`ValidationOverlays` and
:class:`FinalCheckpoint` to every Trainer unless the configuration already has a callback of that type (put one in
``trainer.callbacks`` to change its arguments), and uses :class:`SaveConfigToLoggers` as its save-config callback.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from samtune.modeling.preprocessing import PIXEL_MEAN, PIXEL_STD

__all__ = ["SamtuneProgressBar", "ParameterCounts", "ValidationOverlays", "FinalCheckpoint", "SaveConfigToLoggers",
           "render_overlays"]

log = logging.getLogger("samtune")

# shown in the progress bar: logged name -> short name
_BAR_METRICS = {"train/loss": "loss", "train/iou": "iou_loss", "val/iou_click_1": "val_iou@1"}


class SamtuneProgressBar(TQDMProgressBar):
    """TQDM progress bar showing the training loss, the IoU loss term and the last validation IoU after 1 click."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        for name in _BAR_METRICS:
            items.pop(name, None)
        metrics = trainer.callback_metrics
        for name, short in _BAR_METRICS.items():
            value = metrics.get(name)
            if value is not None:
                items[short] = f"{float(value):.4g}"
        return items


class ParameterCounts(Callback):
    """Logs the total and trainable parameter counts as hyperparameters (``params/total``, ``params/trainable``)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = sum(p.numel() for p in pl_module.parameters())
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        counts = {"params/total": total, "params/trainable": trainable}
        for logger in trainer.loggers:
            logger.log_hyperparams(counts)
        if trainer.is_global_zero:
            log.info("parameters: %s total, %s trainable (%.1f%%)", f"{total:,}", f"{trainable:,}",
                     100.0 * trainable / max(total, 1))


class FinalCheckpoint(Callback):
    """Writes each ``ModelCheckpoint``'s ``last`` checkpoint when ``fit`` ends if training went on after its last save.

    With a monitored metric, Lightning saves ``last.ckpt`` only together with a monitored checkpoint, after a
    validation; the steps after the last validation (``max_steps`` not a multiple of the validation interval: 300
    steps validated every 40) would be missing from it, and ``last.ckpt`` would not be the trained model. With
    ``save_last: link`` the final save is a file, not a link to an older checkpoint.

    When the folder already held an earlier run's ``last.ckpt`` (the recipes' fixed ``dirpath``, a new run that does
    not resume), Lightning writes this run's as ``last-v1.ckpt``; the callback then warns which file holds the final
    step, since ``last.ckpt`` (the path of the documented ``evaluate`` / ``export`` commands) is the earlier model.

    It relies on members of ``ModelCheckpoint`` that Lightning does not make public (tested with the Lightning
    this package requires). If a Lightning release drops one, the callback says so when ``fit`` starts and does
    nothing, instead of failing at the end of a finished run.
    """

    _NEEDED = ("_last_global_step_saved", "_monitor_candidates", "_last_checkpoint_saved", "_save_last_checkpoint")

    def __init__(self) -> None:
        self.supported = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        missing = sorted({name for callback in trainer.checkpoint_callbacks if isinstance(callback, ModelCheckpoint)
                          for name in self._NEEDED if not hasattr(callback, name)})
        self.supported = not missing
        if missing:
            log.warning("FinalCheckpoint is off: this Lightning (%s) has no ModelCheckpoint.%s; last.ckpt holds the "
                        "last checkpointed step, which may precede the final one", L.__version__,
                        ", ModelCheckpoint.".join(missing))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or not self.supported:
            return
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or not callback.save_last:
                continue
            candidates = callback._monitor_candidates(trainer)
            if callback._last_global_step_saved != trainer.global_step:  # else saved at the final step already
                if callback.save_last == "link":
                    path = callback.format_checkpoint_name(candidates, ModelCheckpoint.CHECKPOINT_NAME_LAST)
                    if trainer.is_global_zero and os.path.islink(path):
                        os.remove(path)  # else the save would write through the link into the checkpoint it names
                    trainer.strategy.barrier()
                    callback._last_checkpoint_saved = ""  # makes _save_last_checkpoint write a file
                callback._save_last_checkpoint(trainer, candidates)
                if trainer.is_global_zero:
                    log.info("saved the final step %d to %s", trainer.global_step, callback.last_model_path)
            if trainer.is_global_zero and callback.last_model_path:
                plain = callback.format_checkpoint_name(candidates, ModelCheckpoint.CHECKPOINT_NAME_LAST)
                if os.path.normpath(callback.last_model_path) != os.path.normpath(plain) and os.path.exists(plain):
                    log.warning("this run's last checkpoint is %s; %s is an earlier run's (same folder): use %s "
                                "with evaluate / export, or give each run its own ModelCheckpoint dirpath",
                                callback.last_model_path, os.path.basename(plain), callback.last_model_path)


def _to_uint8_image(image: torch.Tensor, normalization: str) -> np.ndarray:
    """``[3, S, S]`` normalised model input -> ``[S, S, 3]`` uint8 RGB."""
    image = image.detach().float().cpu()
    if normalization == "sam":
        mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
        std = torch.tensor(PIXEL_STD).view(3, 1, 1)
        image = image * std + mean
    elif normalization == "minmax":
        image = image * 255.0
    else:
        raise ValueError(f"last_val_example['normalization'] must be 'sam' or 'minmax', got {normalization!r}")
    return image.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def _tint(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], alpha: float = 0.45) -> np.ndarray:
    """``image`` ``[S, S, 3]`` with ``mask`` ``[S, S]`` blended in ``colour`` and its contour drawn."""
    out = image.copy()
    out[mask] = (out[mask] * (1 - alpha) + np.array(colour, np.float32) * alpha).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, colour, 1)
    return out


def render_overlays(example: dict[str, Any], max_masks: int = 4) -> np.ndarray:
    """One picture of a validation example: a row per mask, ground truth left, prediction + prompts right.

    Args:
        example: the task's ``last_val_example``: ``image`` ``[3, S, S]``, ``gt`` and ``pred`` bool ``[K, S, S]``,
            ``points`` ``[K, P, 2]`` (x, y), ``labels`` ``[K, P]`` (1 positive, 0 negative, others not drawn),
            ``normalization`` ``"sam"`` | ``"minmax"``.
        max_masks: rows drawn at most.

    Returns:
        ``[R * S, 2 * S, 3]`` uint8 RGB (ground truth green, prediction blue, positive clicks green with a white
        ring, negative clicks red).
    """
    for key in ("image", "gt", "pred", "points", "labels", "normalization"):
        if key not in example:
            raise KeyError(f"last_val_example has no {key!r} (keys: {sorted(example)})")
    image = _to_uint8_image(example["image"], example["normalization"])
    gt = example["gt"].bool().cpu().numpy()
    pred = example["pred"].bool().cpu().numpy()
    points = example["points"].float().cpu().numpy()
    labels = example["labels"].cpu().numpy()
    if gt.shape != pred.shape or gt.shape[1:] != image.shape[:2]:
        raise ValueError(f"last_val_example: gt {gt.shape} / pred {pred.shape} do not match image {image.shape[:2]}")
    side = image.shape[0]
    radius = max(2, side // 64)
    rows = []
    for k in range(min(len(gt), max_masks)):
        left = _tint(image, gt[k], (0, 220, 0))
        right = _tint(image, pred[k], (30, 144, 255))
        for (x, y), label in zip(points[k], labels[k]):
            if label not in (0, 1):
                continue
            centre = (int(round(float(x))), int(round(float(y))))
            cv2.circle(right, centre, radius + 1, (255, 255, 255), -1)
            cv2.circle(right, centre, radius, (0, 200, 0) if label == 1 else (230, 0, 0), -1)
        rows.append(np.concatenate([left, right], axis=1))
    if not rows:
        return np.concatenate([image, image], axis=1)
    return np.concatenate(rows, axis=0)


class ValidationOverlays(Callback):
    """Every ``every_n_epochs`` validation epochs, draws the task's ``last_val_example`` and logs it.

    W&B gets ``val/overlays`` as an image, TensorBoard an image summary; with ``save_png`` the picture is also
    written to ``<log_dir>/overlays/epoch<E>_step<S>.png`` (the only output when the loggers take no images,
    e.g. CSV). Runs on global rank 0 only; skipped during the sanity check.

    Args:
        every_n_epochs: period in validation epochs.
        max_masks: masks drawn per example.
        save_png: also write a PNG file.
    """

    def __init__(self, every_n_epochs: int = 1, max_masks: int = 4, save_png: bool = True) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"ValidationOverlays.every_n_epochs must be >= 1, got {every_n_epochs}")
        if max_masks < 1:
            raise ValueError(f"ValidationOverlays.max_masks must be >= 1, got {max_masks}")
        self.every_n_epochs = every_n_epochs
        self.max_masks = max_masks
        self.save_png = save_png
        self._validations = 0
        self.last_path: Path | None = None

    def state_dict(self) -> dict[str, Any]:
        # the period counts on across a resume instead of restarting at the resumed run's first validation
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = int(state_dict.get("validations", 0))

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_epochs:
            return
        example = getattr(pl_module, "last_val_example", None)
        if not example:
            return
        picture = render_overlays(example, self.max_masks)
        step, epoch = trainer.global_step, trainer.current_epoch
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/overlays", images=[picture], step=step,
                                 caption=[f"epoch {epoch}: ground truth | prediction after 1 click"])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/overlays", picture, step, dataformats="HWC")
        if self.save_png:
            # not trainer.log_dir: it broadcasts, a collective that would deadlock in this rank-0-only hook
            logger = trainer.loggers[0] if trainer.loggers else None
            base = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir
            folder = Path(base) / "overlays"
            folder.mkdir(parents=True, exist_ok=True)
            self.last_path = folder / f"epoch{epoch:04d}_step{step}.png"
            cv2.imwrite(str(self.last_path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))


class SaveConfigToLoggers(SaveConfigCallback):
    """Saves the resolved config to ``<log_dir>/config.yaml`` and sends it to W&B (``run.config["cli"]``)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self.config.as_dict()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                # under "cli": the task's own hyperparameters (model, optimizer, ...) use the top-level names
                logger.experiment.config.update({"cli": config}, allow_val_change=True)
