"""Promptable segmentation training (SAM pretraining and fine-tuning) as a LightningModule.

Training step (SAM paper, Appendix A): each image of the batch is encoded once; the interactive simulator runs
its rounds (11 by default), each decoding all valid masks of all images in ONE batched decoder call; the per-round
loss sums (focal 20 : dice 1 : IoU 1, min over the multimask outputs) are added up and divided by the number of
valid masks over all devices and, with ``accumulate_grad_batches``, over all micro-batches of the optimizer step
(before each micro-batch's backward the gradients accumulated so far are rescaled to the window's running mask
count, so that a mask weighs the same whichever micro-batch holds it, and every hook sees the final gradients).

Validation: deterministic prompts (:class:`samtune.prompts.InteractiveEvaluator`): IoU after 1..k clicks, after
the ground-truth box, NoC@85/90 and the IoU head's error, accumulated with :class:`samtune.metrics.ClickIoU`.

Adaptation (``adaptation=``, :class:`samtune.adapt.AdaptationConfig`): LoRA / adapters and a freeze policy are
applied right after the model is built and its weights loaded, before the optimiser exists. Lightning checkpoints
of an adapted run carry the adapter metadata (``samtune_adapter``) and, unless ``checkpoint_weights: full`` or the
base is randomly initialised, only the trainable weights: on resume (``--ckpt_path``) or ``load_from_checkpoint``
the frozen base comes from the task's ``checkpoint`` file and is checked against the recorded fingerprint. Such a
``.ckpt`` loads directly with :func:`samtune.adapt.load_adapter_checkpoint`;
:meth:`PromptableSegmentationTask.save_adapter_checkpoint` and :func:`samtune.adapt.extract_adapter_checkpoint`
write a standalone adapter file (no optimiser state).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from samtune.adapt import AdaptationConfig, apply_adaptation, eval_frozen_batchnorm, save_adapter_checkpoint
from samtune.adapt.checkpoint import METADATA_KEY, adapter_metadata, restore_frozen, strip_frozen
from samtune.build import build_sam, get_config
from samtune.checkpoints import INPUT_MAPPING_KEY, CheckpointError, init_encoder_from_mae
from samtune.losses import SamLoss
from samtune.metrics import ClickIoU
from samtune.modeling.precision import emulates_bf16
from samtune.prompts import InteractiveEvaluator, InteractiveSimulator, SimulationConfig
from samtune.prompts.deterministic import region_centers
from samtune.prompts.geometry import content_region, resize_masks
from samtune.prompts.sampling import PAD_LABEL
from samtune.resumable import restore_rng_states, rng_states, track_trained_batches
from samtune.tasks.config import LossConfig, OptimizerConfig, to_plain
from samtune.tasks.optim import WarmupLR, WarmupSchedule, param_groups

__all__ = ["PromptableSegmentationTask"]

logger = logging.getLogger("samtune.tasks")

NUM_EXAMPLE_MASKS = 4


def _as_dataclass(value: Any, cls: type, name: str) -> Any:
    """Accept the dataclass itself or its dict form (how checkpoints store it); a copy either way."""
    if isinstance(value, cls):
        return dataclasses.replace(value)
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{name}: unknown keys {unknown} for {cls.__name__}; expected some of {sorted(known)}")
        return cls(**value)
    raise TypeError(f"{name} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")


class PromptableSegmentationTask(L.LightningModule):
    """Train SAM with the paper's interactive prompt simulation.

    Args:
        model: registry name (``samtune.build.available_models()``).
        checkpoint: weights for ``build_sam`` (official ``.pth``, LiteMedSAM, safetensors, samtune checkpoint).
        mae_checkpoint: MAE ViT weights initialising the image encoder (ViT models; applied after ``checkpoint``).
        simulation: the interactive simulation (rounds, box probability, noise).
        loss: loss weights.
        optimizer: AdamW, layer decay, encoder lr scale and schedule.
        freeze_image_encoder / freeze_prompt_encoder / freeze_mask_decoder: keep that part fixed (no parameters
            in the optimiser, ``requires_grad=False``, kept in eval mode: no dropout / drop path, frozen
            BatchNorm statistics). With ``adaptation`` the freeze policy decides what trains; a flag may then only
            restate it (freeze a part in which nothing trains): freezing a part that the adaptation trains (e.g.
            ``freeze_image_encoder`` with LoRA on the encoder, ``freeze_mask_decoder`` with ``decoder_only``) is
            an error.
        adaptation: LoRA / adapters / freeze policy (:class:`samtune.adapt.AdaptationConfig`), applied after
            ``checkpoint`` (and ``mae_checkpoint``) are loaded. The optimiser gets every trainable parameter with
            the usual groups: LoRA and adapter weight matrices get weight decay, their biases do not; in the
            image encoder they follow their block's layer-decay lr. An encoder with no trainable parameter at all
            runs without gradients; BatchNorm layers whose parameters are frozen keep their statistics (eval).
        drop_path_rate: stochastic depth of the encoder blocks.
        decoder_dropout: attention dropout of the mask decoder.
        activation_checkpointing: recompute encoder blocks in backward (less memory, ~30% more compute).
        decoder_checkpointing: recompute each simulated round's decoder in backward instead of keeping all rounds'
            activations (memory of one round instead of all 11, ~0.1 GB per mask and round at a 64x64 embedding
            in fp32; costs one more decoder forward per round; gradients unchanged).
        val_num_clicks: k, the number of validation click rounds.
        nan_policy: on a non-finite loss, ``"skip"`` the batch (counted in ``skipped_nonfinite_steps``; an optimizer
            step all of whose micro-batches were skipped updates nothing, on every process, while the step counter
            and the learning-rate schedule advance as for a skipped AMP step) or ``"raise"`` ``FloatingPointError``.
            The check is on the loss summed over all processes, so under DDP every process skips the same batches.
    """

    def __init__(
        self,
        model: str = "sam_tiny",
        checkpoint: str | None = None,
        mae_checkpoint: str | None = None,
        simulation: SimulationConfig = SimulationConfig(),
        loss: LossConfig = LossConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        freeze_image_encoder: bool = False,
        freeze_prompt_encoder: bool = False,
        freeze_mask_decoder: bool = False,
        drop_path_rate: float = 0.0,
        decoder_dropout: float = 0.0,
        activation_checkpointing: bool = False,
        decoder_checkpointing: bool = False,
        val_num_clicks: int = 5,
        nan_policy: Literal["skip", "raise"] = "skip",
        adaptation: AdaptationConfig | None = None,
    ) -> None:
        super().__init__()
        if adaptation is not None:
            adaptation = AdaptationConfig.coerce(adaptation, name="adaptation")
        simulation = _as_dataclass(simulation, SimulationConfig, "simulation")
        loss = _as_dataclass(loss, LossConfig, "loss")
        optimizer = _as_dataclass(optimizer, OptimizerConfig, "optimizer")
        if nan_policy not in ("skip", "raise"):
            raise ValueError(f"nan_policy must be 'skip' or 'raise', got {nan_policy!r}")
        if val_num_clicks < 1:
            raise ValueError(f"val_num_clicks must be >= 1, got {val_num_clicks}")
        if not 0.0 <= drop_path_rate < 1.0 or not 0.0 <= decoder_dropout < 1.0:
            raise ValueError(
                f"drop_path_rate and decoder_dropout must be in [0, 1), got {drop_path_rate}, {decoder_dropout}"
            )
        # Plain values only (dicts, lists, numbers, strings): checkpoints load with weights_only=True.
        self.save_hyperparameters(ignore=["simulation", "loss", "optimizer", "adaptation"])
        self.hparams.update(simulation=to_plain(simulation), loss=to_plain(loss), optimizer=to_plain(optimizer),
                            adaptation=None if adaptation is None else adaptation.to_dict())

        self.simulation_config = simulation
        self.loss_config = loss
        self.optimizer_config = optimizer
        self.nan_policy = nan_policy
        self.decoder_checkpointing = decoder_checkpointing
        self.adaptation = adaptation
        flags = {
            "image_encoder": freeze_image_encoder,
            "prompt_encoder": freeze_prompt_encoder,
            "mask_decoder": freeze_mask_decoder,
        }

        self.model = build_sam(model, checkpoint, drop_path_rate=drop_path_rate, decoder_dropout=decoder_dropout)
        if mae_checkpoint is not None:
            if get_config(model).encoder_type != "vit":
                raise ValueError(f"mae_checkpoint initialises ViT encoders; model {model!r} has a TinyViT encoder")
            logger.info("%s", init_encoder_from_mae(self.model.image_encoder, mae_checkpoint))
        if activation_checkpointing:
            self.model.image_encoder.set_grad_checkpointing(True)
        if adaptation is not None:
            apply_adaptation(self.model, adaptation)
            for part, frozen in flags.items():
                trains = [n for n, p in getattr(self.model, part).named_parameters() if p.requires_grad]
                if frozen and trains:
                    raise ValueError(
                        f"freeze_{part}=True contradicts the adaptation (method {adaptation.method!r}, freeze_policy "
                        f"{adaptation.freeze_policy!r}), which trains {len(trains)} parameters of the {part} (e.g. "
                        f"{trains[0]}); set freeze_{part}: false (the freeze policy decides what trains)"
                    )
        for part, frozen in flags.items():
            if frozen:
                getattr(self.model, part).requires_grad_(False)
        # A part with no trainable parameter at all is frozen: eval mode, and the encoder runs without gradients.
        self.frozen = {part: not any(p.requires_grad for p in getattr(self.model, part).parameters()) for part in flags}
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("every part of the model is frozen: nothing to train")

        self.simulator = InteractiveSimulator(simulation)
        self.loss_fn = SamLoss(
            focal_weight=loss.focal_weight, dice_weight=loss.dice_weight, iou_weight=loss.iou_weight,
            focal_alpha=loss.focal_alpha, focal_gamma=loss.focal_gamma, resolution=loss.resolution,
        )
        self.evaluator = InteractiveEvaluator(num_clicks=val_num_clicks, evaluate_box=True)
        self.val_metrics = ClickIoU(num_clicks=val_num_clicks)
        self.skipped_nonfinite_steps = 0
        self.last_val_example: dict[str, Any] | None = None
        self._generator: torch.Generator | None = None
        # Seed of the prompt simulation: from the global RNG, so `seed_everything` fixes it; kept in checkpoints.
        self.simulation_seed = int(torch.randint(0, 2**62, (1,)).item())
        self._train_step_counter = 0  # training_step calls (micro-batches), kept in checkpoints
        # From a checkpoint: the prompt seed and counter and the global generators' states, applied when a fit
        # resumes from it (not when the checkpoint only warm-starts a new run, e.g. after load_from_checkpoint).
        self._restored_training_state: dict[str, Any] | None = None
        # The training datamodule's image -> input mapping (bands, intensity), kept in checkpoints for inference.
        self.input_mapping: dict[str, Any] | None = None
        # Gradient accumulation: the global mask count of the optimizer step's micro-batches so far (None before its
        # first); training_step normalises by it, on_before_optimizer_step starts the next window.
        self._window_masks: torch.Tensor | None = None
        self._window_finite = False  # some micro-batch of the optimizer step so far had a finite loss
        self.train()  # build_sam returns an eval-mode model; Lightning keeps the mode it finds

    # ------------------------------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "PromptableSegmentationTask":
        """Set train/eval mode; frozen parts always stay in eval mode (no dropout, fixed BatchNorm stats)."""
        super().train(mode)
        for part, frozen in self.frozen.items():
            if frozen:
                getattr(self.model, part).eval()
        if mode and self.adaptation is not None:
            eval_frozen_batchnorm(self.model)  # e.g. a TinyViT encoder under LoRA keeps its statistics
        return self

    # ------------------------------------------------------------------------------------------ helpers
    def _simulation_generator(self, device: torch.device) -> torch.Generator:
        """Generator of the prompt simulation for the current training step.

        Re-seeded every step from ``(simulation_seed, step counter, rank)``: the prompts of a step do not depend on
        what ran before, so a run resumed from a checkpoint (which stores the seed and the counter) simulates
        exactly the prompts the uninterrupted run would have, and each DDP rank draws its own.
        """
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        seed = hash((self.simulation_seed, self._train_step_counter, self.global_rank)) & (2**63 - 1)
        self._generator.manual_seed(seed)
        return self._generator

    @staticmethod
    def _flatten_valid(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Valid masks of the whole batch: ``[M, S, S]`` bool, their image index ``[M]`` and ``(h, w)`` ``[M, 2]``."""
        for key in ("masks", "mask_valid", "input_size"):
            if key not in batch:
                raise KeyError(f"batch has no {key!r} (keys: {sorted(batch)}); use samtune.data.collate_samples")
        if "images" not in batch and "image_embeddings" not in batch:
            raise KeyError(f"batch has neither 'images' nor 'image_embeddings' (keys: {sorted(batch)})")
        masks, valid = batch["masks"], batch["mask_valid"]
        b, k = valid.shape
        if masks.shape[:2] != (b, k):
            raise ValueError(f"batch['masks'] {tuple(masks.shape)} does not match batch['mask_valid'] {(b, k)}")
        image_index = torch.arange(b, device=masks.device).repeat_interleave(k)
        flat_valid = valid.flatten()
        image_index = image_index[flat_valid]
        return masks.flatten(0, 1)[flat_valid], image_index, batch["input_size"].to(masks.device)[image_index]

    @staticmethod
    def _world_size() -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def _global_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over all processes (a copy; identity when not distributed)."""
        values = values.detach().clone()
        if self._world_size() > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def _zero_loss(self) -> torch.Tensor:
        """A zero loss connected to every trainable parameter (DDP then reduces zero gradients everywhere)."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return torch.stack([p.sum() for p in trainable]).sum() * 0.0

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.frozen["image_encoder"]:
            with torch.no_grad():
                return self.model.encode_image(images)
        return self.model.encode_image(images)

    def _image_embeddings(self, batch: dict[str, Any]) -> torch.Tensor:
        """``[B, C, h, w]``: the batch's cached ``image_embeddings`` (see :mod:`samtune.data.cached`; checked to
        come from this task's frozen encoder) or the encoder run on ``images``."""
        if "image_embeddings" in batch:
            from samtune.adapt.cache import check_cached_embeddings

            return check_cached_embeddings(self.model.image_encoder, batch)
        return self._encode(batch["images"])

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        """One step: encode once, simulate the prompt rounds, sum the losses, normalise by the global mask count.

        Returns:
            The loss. When it is not finite (``nan_policy="skip"``): None, or under DDP, where Lightning refuses None,
            a zero loss (every process, since all see the same global sums).
        """
        gt, image_index, sizes = self._flatten_valid(batch)
        m = gt.shape[0]
        terms = ("loss", "focal", "dice", "iou")
        # Every step advances the prompt seed, with or without masks, so that the DDP ranks' counters stay equal
        # (a checkpoint stores rank 0's) and a resumed run draws the prompts of the uninterrupted one.
        generator = self._simulation_generator(gt.device)
        self._train_step_counter += 1
        if m > 0:
            embeddings = self._image_embeddings(batch)

            # The loss's ground truth, resized once per step rather than in every round (and every recomputation).
            targets = gt if self.loss_fn.resolution == "gt" else resize_masks(gt, self.model.low_res_size)

            def loss_fn(logits, iou_pred, gt_masks, valid, multimask):  # losses in fp32 under autocast
                return self.loss_fn(logits.float(), iou_pred.float(), targets, valid, multimask)

            valid = torch.ones(m, dtype=torch.bool, device=gt.device)
            sums = self.simulator.loss(
                self.model, embeddings, image_index, gt, valid, loss_fn, generator, image_sizes=sizes,
                checkpoint_rounds=self.decoder_checkpointing,
            )
            local = torch.stack([sums[t].float() for t in terms])
        else:
            sums = {"loss": self._zero_loss()}
            local = torch.zeros(len(terms), device=gt.device)
        # One reduction: the global mask count and the global loss sums (for logging and the finiteness check).
        stats = self._global_sum(torch.cat([local, gt.new_tensor([float(m)], dtype=torch.float32)]))
        total_masks = stats[-1]
        if not torch.isfinite(stats[: len(terms)]).all():
            return self._nonfinite(dict(zip(terms, local.tolist())))
        self._window_finite = True
        denominator = total_masks.clamp_min(1.0)
        scale = self._world_size() / denominator
        if self._trainer is not None and self.trainer.accumulate_grad_batches > 1:
            scale = self._accumulation_scale(total_masks)
        # DDP averages gradients over processes: scale so that the average is (global sum) / (global count).
        # The zero term ties every trainable parameter to the loss: prompts of one kind (e.g. boxes only) leave some
        # embeddings unused, which DDP with find_unused_parameters=False would reject.
        loss = sums["loss"] * scale
        if m > 0:
            loss = loss + self._zero_loss()
        batch_size = int(batch["masks"].shape[0])
        for i, name in enumerate(terms):
            self.log(f"train/{name}", stats[i] / denominator, on_step=True, on_epoch=False, prog_bar=name == "loss",
                     batch_size=batch_size)
        self.log("train/num_masks", total_masks, on_step=True, on_epoch=False, batch_size=batch_size)
        return loss

    def _accumulation_scale(self, masks: torch.Tensor) -> torch.Tensor:
        """Loss scale of a micro-batch of ``masks`` global masks under gradient accumulation.

        The optimizer step's gradient must be (window's loss sum) / (window's mask count), and the count is known
        only after the last micro-batch. So each micro-batch divides by the running count ``n`` (its own masks
        included), after multiplying the gradients accumulated so far by ``n_before / n``: after the last
        micro-batch the gradients are exactly the window's mean, before any ``on_before_optimizer_step`` hook,
        callback or gradient clipping sees them. Lightning divides every micro-batch's loss by
        ``accumulate_grad_batches``; the scale undoes that.
        """
        before = self._window_masks
        running = masks if before is None else before + masks
        self._window_masks = running
        if before is not None:
            factor = before.clamp_min(1.0) / running.clamp_min(1.0)
            for optimizer in self.trainer.optimizers:
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.mul_(factor.to(p.grad.dtype))
        return self._world_size() * self.trainer.accumulate_grad_batches / running.clamp_min(1.0)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step's micro-batches are done: the next training step starts a new accumulation window.

        (Lightning calls this hook once per optimizer step, also when the last micro-batch was skipped.)
        """
        self._window_masks = None
        self._window_finite = False

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Lightning's step, except that a step whose micro-batches all had non-finite losses updates nothing.

        One process: such micro-batches returned None, so no gradient exists and the optimizer skips every weight.
        DDP: they returned a zero loss (Lightning needs a backward on every process), which leaves zero gradients,
        and AdamW would still apply weight decay and momentum: the gradients are dropped and the closure reports
        a skipped backward (None), as on one process; every precision plugin then skips the update (AMP's
        GradScaler included). Conversely, when only the LAST micro-batch was skipped, the closure reports a
        (zero) loss instead of its None: AMP's plugin would otherwise drop the earlier micro-batches' gradients.
        """
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

        def closure() -> Any:
            result = optimizer_closure()
            if not self._window_finite:
                optimizer.zero_grad(set_to_none=True)
                return None
            if result is None:  # the last micro-batch was skipped, earlier ones left gradients: step on them
                return torch.zeros((), device=self.device)
            return result

        return super().optimizer_step(epoch, batch_idx, optimizer, closure)

    def _nonfinite(self, terms: dict[str, float]) -> torch.Tensor | None:
        described = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        if self.nan_policy == "raise":
            raise FloatingPointError(f"non-finite loss at step {self.global_step} (local sums: {described})")
        self.skipped_nonfinite_steps += 1
        logger.warning(
            "non-finite loss at step %d (local sums: %s): step skipped (%d so far)",
            self.global_step, described, self.skipped_nonfinite_steps,
        )
        if self._world_size() > 1:
            # Lightning refuses None under DDP ("not supported in distributed training"), and DDP needs a backward
            # on every process: zero gradients for every weight; optimizer_step drops them if no micro-batch of the
            # step was finite.
            return self._zero_loss()
        return None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/skipped_nonfinite", float(self.skipped_nonfinite_steps), on_step=True, on_epoch=False,
                     batch_size=1)

    # ------------------------------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Deterministic click and box rounds on every valid mask; IoUs on each image's unpadded content."""
        gt, image_index, sizes = self._flatten_valid(batch)
        if gt.shape[0] == 0:
            return
        embeddings = self._image_embeddings(batch)
        ignore = batch.get("ignore_mask")  # void pixels (ignore_values): out of IoUs and clicks, as in evaluate
        ignore = None if ignore is None else ignore.to(gt.device)[image_index]
        result = self.evaluator(self.model, embeddings, image_index, gt, image_sizes=sizes, ignore_masks=ignore)
        self.val_metrics.update_from_result(result)
        if batch_idx == 0 and "images" in batch:  # overlays need the image (cached batches may have none)
            self.last_val_example = self._example(batch, embeddings, gt, image_index, sizes)

    @torch.no_grad()
    def _example(
        self, batch: dict[str, Any], embeddings: torch.Tensor, gt: torch.Tensor, image_index: torch.Tensor,
        sizes: torch.Tensor,
    ) -> dict[str, Any]:
        """Overlay material for callbacks: image 0, up to 4 of its masks, the first click and its prediction."""
        first = int(image_index[0])
        pick = (image_index == first).nonzero()[:NUM_EXAMPLE_MASKS, 0]
        masks = gt[pick]
        scale = self.model.image_size / masks.shape[-1]
        xy, label = region_centers(masks, scale)
        coords = torch.stack((xy, torch.zeros_like(xy)), dim=1)
        labels = torch.stack((label, torch.full_like(label, PAD_LABEL)), dim=1)
        logits, iou_pred = self.model.decode(
            embeddings[first : first + 1], torch.zeros(len(pick), dtype=torch.long, device=gt.device),
            point_coords=coords, point_labels=labels, multimask_output=self.evaluator.multimask_first_click,
            pad_points=False,
        )
        best = logits.gather(1, iou_pred.argmax(1)[:, None, None, None].expand(-1, 1, *logits.shape[-2:]))
        pred = nn.functional.interpolate(best.float(), masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0] > 0
        pred &= content_region(sizes[pick], len(pick), masks.shape[-2:], scale, pred.device)  # the padding cut off
        return {
            "image": batch["images"][first].detach().float().cpu(),
            "gt": masks.cpu(),
            "pred": pred.cpu(),
            "points": xy[:, None].float().cpu(),
            "labels": label[:, None].cpu(),
            "normalization": self.model.normalization,
        }

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()  # synchronised over processes by torchmetrics
        if self.evaluator.evaluate_box:  # NaN without masks, as the click entries: a ModelCheckpoint monitoring
            nan = torch.full((), float("nan"), device=self.device)  # val/iou_box must find its key (else it raises)
            values.setdefault("iou_box", nan)
            values.setdefault("dice_box", nan)
        for name, value in values.items():
            self.log(f"val/{name}", value, on_step=False, on_epoch=True, sync_dist=False)
        self.val_metrics.reset()

    # ------------------------------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the trainable parameters, with a per-step :class:`WarmupLR` (warmup + step / cosine / constant;
        a resumed run follows the current configuration's schedule from its restored step)."""
        cfg = self.optimizer_config
        groups = param_groups(self.model, cfg)
        if not groups:
            raise ValueError("no trainable parameters: every part of the model is frozen")
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else float("inf")
        schedule = WarmupSchedule.from_config(cfg, total)
        scheduler = WarmupLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------------------------------ checkpoints
    def _adapter_metadata(self, complete: bool) -> dict[str, Any]:
        meta = adapter_metadata(
            self.model, model_name=self.hparams["model"], base_checkpoint=self.hparams["checkpoint"],
            config=self.adaptation, mae_checkpoint=self.hparams["mae_checkpoint"], complete=complete,
        )
        meta["lightning"] = True
        return meta

    def _trainable_only_checkpoints(self) -> bool:
        """Whether Lightning checkpoints drop the frozen base (it can be rebuilt from the ``checkpoint`` file)."""
        return (
            self.adaptation is not None
            and self.adaptation.checkpoint_weights == "trainable"
            and self.hparams["checkpoint"] is not None
        )

    def on_fit_start(self) -> None:
        """Record the datamodule's ``input_mapping`` (bands, intensity; written into checkpoints and export
        metadata, see :attr:`samtune.data.datamodules.SegmentationDataModule.input_mapping`). Warn when the
        Trainer asks for bf16 on a CPU that only emulates it (``samtune fit`` trains in fp32 there itself:
        :func:`samtune.cli.cpu_precision`; a Trainer built in Python keeps what it was given)."""
        mapping = getattr(self.trainer.datamodule, "input_mapping", None)
        if isinstance(mapping, dict):
            self.input_mapping = dict(mapping)
        if emulates_bf16(self.trainer.precision, self.device):
            rank_zero_warn(
                f"Trainer precision {self.trainer.precision!r} on a CPU without native bf16 (no AVX512-BF16 / "
                "AMX-BF16): PyTorch emulates bf16 there, about 16x slower than fp32; pass precision='32-true'"
            )

    def on_train_start(self) -> None:
        """Exact resume: a resumed run's prompt seed and step counter, and its global generators (drop path, dropout),
        continue from the checkpoint's, set here, after the sanity-check validation has drawn its own.

        Only when the Trainer resumes from that checkpoint (``ckpt_path``): a new run started from a loaded task
        (``load_from_checkpoint``, then ``fit`` without ``ckpt_path``) keeps its own seeds (``seed_everything``)
        instead of replaying the checkpoint's random streams.
        """
        state, self._restored_training_state = self._restored_training_state, None
        if state is None or not self.trainer.ckpt_path:
            return
        simulation = state["simulation"]
        if simulation is not None:
            self.simulation_seed = int(simulation["seed"])
            self._train_step_counter = int(simulation["step_counter"])
        if state["rng_states"] is not None:
            restore_rng_states(state["rng_states"])

    def on_train_epoch_start(self) -> None:
        """Exact resume: the epoch's training loaders (reloaded ones included) count the batches whose step
        completed (:func:`samtune.resumable.track_trained_batches`)."""
        track_trained_batches(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skipped_nonfinite_steps"] = int(self.skipped_nonfinite_steps)
        checkpoint["simulation_state"] = {"seed": self.simulation_seed, "step_counter": self._train_step_counter}
        checkpoint["rng_states"] = rng_states()  # this process's (every DDP rank is seeded alike)
        if self.input_mapping is not None:
            checkpoint[INPUT_MAPPING_KEY] = dict(self.input_mapping)
        if self.adaptation is None:
            return
        state = checkpoint.get("state_dict")
        prune = self._trainable_only_checkpoints() and isinstance(state, dict) and any(
            k.startswith("model.") for k in state
        )
        checkpoint[METADATA_KEY] = self._adapter_metadata(complete=not prune)
        if prune:
            strip_frozen(state, self.model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_nonfinite_steps = int(checkpoint.get("skipped_nonfinite_steps", 0))
        # Applied in on_train_start when a fit resumes from this checkpoint.
        self._restored_training_state = {
            "simulation": checkpoint.get("simulation_state"), "rng_states": checkpoint.get("rng_states"),
        }
        mapping = checkpoint.get(INPUT_MAPPING_KEY)
        self.input_mapping = dict(mapping) if isinstance(mapping, dict) else None
        meta = checkpoint.get(METADATA_KEY)
        if meta is None:
            return
        saved = AdaptationConfig.coerce(meta["adaptation"])
        # checkpoint_weights only says what this run's checkpoints store: it may change between runs.
        if self.adaptation is None or dataclasses.replace(
            saved, checkpoint_weights=self.adaptation.checkpoint_weights
        ) != self.adaptation:
            raise CheckpointError(
                f"the checkpoint was trained with adaptation {meta['adaptation']}, this task has "
                f"{None if self.adaptation is None else self.adaptation.to_dict()}: use the same adaptation settings"
            )
        state = checkpoint.get("state_dict")
        if not meta.get("complete") and isinstance(state, dict):
            restore_frozen(state, self.model, meta, source=f"(model {meta['model_name']!r}, base "
                                                           f"{self.hparams['checkpoint']})")

    def save_adapter_checkpoint(self, path: str | Path) -> Path:
        """Write the adapted model's trainable weights and metadata (:func:`samtune.adapt.save_adapter_checkpoint`).

        Args:
            path: destination (``.safetensors`` or ``torch.save`` by suffix).

        Returns:
            The path written.

        Raises:
            ValueError: the task has no ``adaptation``.
        """
        if self.adaptation is None:
            raise ValueError("save_adapter_checkpoint: this task has no adaptation (set adaptation=...)")
        return save_adapter_checkpoint(
            self.model, path, model_name=self.hparams["model"], base_checkpoint=self.hparams["checkpoint"],
            config=self.adaptation, mae_checkpoint=self.hparams["mae_checkpoint"], input_mapping=self.input_mapping,
        )
