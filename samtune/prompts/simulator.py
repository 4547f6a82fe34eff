"""The SAM paper's interactive training simulation (Appendix A): 11 prompt rounds per mask.

Round 0: per mask, with equal probability, one positive point drawn uniformly from the mask or the ground-truth
box with coordinate noise. Every following round feeds back the previous round's low-res logits as the mask
prompt (the highest-predicted-IoU output where three were produced), detached. 8 rounds each add one point drawn
uniformly from the error region of the previous prediction (within the unpadded image when ``image_sizes`` is
given: the padding is cropped from the mask the model gives back); 2 rounds add no point (mask prompt only): one
at a random position among the rounds after the first, one always last.

Token layout, identical for all masks at every round so that ONE batched decoder call covers all masks of all
images: a box is two points labelled 2 (top-left) and 3 (bottom-right); a point-first mask gets its point then a
padding point (label -1): ``[p, pad]`` or ``[tl, br]``, then one more token per point round. The decoder is
called with ``pad_points=False``, so these are exactly the tokens the official predictor sends for the same
prompts (it appends one padding token to points without a box, none with a box; token order does not matter to
the decoder).

At round 0 point-first masks are ambiguous and use the three multimask outputs (the loss back-propagates the
best), box-first masks the single-mask output; one decoder call with ``return_all_tokens=True`` serves both.
Later rounds use the single-mask output.

No host synchronisation happens inside the round loop: the schedule (which round is mask-only) is drawn
before it, and all sampling is done with fixed-shape tensor operations on the masks' device.

Memory: autograd keeps every round's decoder activations until the step's single backward, about 0.1 GB per mask
and round at SAM's 64x64 embedding in fp32 (16 masks x 11 rounds: ~20 GB). The rounds are independent for
autograd (the fed-back mask and the sampled points are detached), so ``checkpoint_rounds=True`` runs each round's
decoder and loss under activation checkpointing: backward recomputes one round at a time, bounding the decoder's
memory to one round's activations for one extra decoder forward per round. Gradients are unchanged.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch.utils.checkpoint import checkpoint

from samtune.prompts.geometry import check_masks, content_region, mask_scale, resize_logits, resize_masks
from samtune.prompts.sampling import (
    BOX_BOTTOM_RIGHT_LABEL,
    BOX_TOP_LEFT_LABEL,
    PAD_LABEL,
    sample_error_points,
    sample_noisy_boxes,
    sample_points_in_masks,
)

IterationKind = Literal["first", "point", "mask"]


class PromptableModel(Protocol):
    """What the simulator and the evaluator need from a model (``samtune.modeling.Sam`` provides it)."""

    image_size: int
    low_res_size: int

    def decode(
        self,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_all_tokens: bool = False,
        pad_points: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[M, C, low_res, low_res]`` logits and ``[M, C]`` predicted IoUs."""
        ...


@dataclass
class SimulationConfig:
    """Schedule and sampling parameters of the interactive simulation.

    Attributes:
        num_iterations: total rounds (decoder calls) per training step; must equal
            ``1 + num_point_iterations + random_mask_only_iteration + final_mask_only_iteration``.
        num_point_iterations: rounds after the first that each add one error point.
        box_probability: probability that a mask's first prompt is its noisy box instead of a point.
        box_noise_std_fraction: box noise standard deviation as a fraction of the box side.
        box_noise_max: cap of the box noise standard deviation, in model-input pixels.
        random_mask_only_iteration: insert one mask-only round at a uniformly random position among the
            rounds after the first (excluding the final mask-only round).
        final_mask_only_iteration: make the last round mask-only.
        feed_back_mask: feed the previous round's logits back as the mask prompt.
        sample_resolution: where error points are drawn: ``"low"`` on the low-res logits grid (GT
            area-downsampled, >= 0.5; fast), ``"gt"`` at the GT resolution (logits bilinearly upsampled).
            The first point is drawn at the same resolution; the box always comes from the full GT.
    """

    num_iterations: int = 11
    num_point_iterations: int = 8
    box_probability: float = 0.5
    box_noise_std_fraction: float = 0.1
    box_noise_max: float = 20.0
    random_mask_only_iteration: bool = True
    final_mask_only_iteration: bool = True
    feed_back_mask: bool = True
    sample_resolution: Literal["low", "gt"] = "low"

    def __post_init__(self) -> None:
        if self.num_point_iterations < 0:
            raise ValueError(f"num_point_iterations must be >= 0, got {self.num_point_iterations}")
        expected = (
            1 + self.num_point_iterations + int(self.random_mask_only_iteration) + int(self.final_mask_only_iteration)
        )
        if self.num_iterations != expected:
            raise ValueError(
                f"num_iterations={self.num_iterations} does not match the schedule: 1 first round + "
                f"num_point_iterations={self.num_point_iterations} + random_mask_only_iteration="
                f"{self.random_mask_only_iteration} + final_mask_only_iteration={self.final_mask_only_iteration} "
                f"= {expected}"
            )
        if not 0.0 <= self.box_probability <= 1.0:
            raise ValueError(f"box_probability must be in [0, 1], got {self.box_probability}")
        if not (self.box_noise_std_fraction >= 0 and self.box_noise_max >= 0):  # NaN too: it gives NaN boxes
            raise ValueError(
                f"box_noise_std_fraction and box_noise_max must be >= 0, got "
                f"{self.box_noise_std_fraction}, {self.box_noise_max}"
            )
        if self.sample_resolution not in ("low", "gt"):
            raise ValueError(f"sample_resolution must be 'low' or 'gt', got {self.sample_resolution!r}")

    @property
    def num_prompt_tokens(self) -> int:
        """Point tokens per mask at the last round: 2 (point + padding, or box corners) + one per point round."""
        return 2 + self.num_point_iterations


def make_schedule(config: SimulationConfig, generator: torch.Generator) -> list[IterationKind]:
    """Draw the kinds of the rounds of one training step.

    The random mask-only round is drawn from ``generator`` (one host read, outside the round loop).

    Args:
        config: the simulation parameters.
        generator: random generator (any device).

    Returns:
        ``config.num_iterations`` kinds: ``"first"``, then ``"point"``/``"mask"``.
    """
    middle: list[IterationKind] = ["point"] * config.num_point_iterations
    if config.random_mask_only_iteration:
        position = torch.randint(0, len(middle) + 1, (1,), generator=generator, device=generator.device)
        middle.insert(int(position.cpu()[0]), "mask")
    final: list[IterationKind] = ["mask"] if config.final_mask_only_iteration else []
    return ["first", *middle, *final]


@dataclass
class SimulationStep:
    """One round of the simulation: the prompts given and what the decoder returned.

    Attributes:
        iteration: round index (0-based).
        kind: ``"first"``, ``"point"`` (one error point added) or ``"mask"`` (no new point).
        low_res_logits: ``[M, C, h, w]`` decoder logits (C = 4 at round 0 when point- and box-first masks
            are mixed: token 0 then tokens 1..3; C = 3 when all are point-first; otherwise C = 1).
        iou_pred: ``[M, C]`` predicted IoUs.
        multimask: what :class:`samtune.losses.SamLoss` needs: a ``[M]`` bool tensor (C = 4: True where the
            mask uses the multimask outputs) or a bool (C = 3: True, C = 1: False).
        point_coords: ``[M, P, 2]`` the point tokens given (model-input pixels).
        point_labels: ``[M, P]`` their labels (1, 0, 2, 3, -1).
        mask_inputs: ``[M, 1, h, w]`` the fed-back logits (detached), or None at round 0.
        selected_logits: ``[M, 1, h, w]`` the output fed back to the next round (detached): the highest
            predicted IoU among the multimask outputs where those are used, else the single output.
        losses: the round's ``loss_fn`` output when :meth:`InteractiveSimulator.iterate` was given one, else None.
    """

    iteration: int
    kind: IterationKind
    low_res_logits: torch.Tensor
    iou_pred: torch.Tensor
    multimask: bool | torch.Tensor
    point_coords: torch.Tensor
    point_labels: torch.Tensor
    mask_inputs: torch.Tensor | None
    selected_logits: torch.Tensor
    losses: dict[str, torch.Tensor] | None = None


def select_feedback(
    low_res_logits: torch.Tensor, iou_pred: torch.Tensor, multimask: bool | torch.Tensor
) -> torch.Tensor:
    """The output to feed back: the highest predicted IoU among the candidates, detached.

    Args:
        low_res_logits: ``[M, C, h, w]``.
        iou_pred: ``[M, C]``.
        multimask: as in :class:`SimulationStep`.

    Returns:
        ``[M, 1, h, w]`` detached logits.
    """
    logits, iou = low_res_logits.detach(), iou_pred.detach()
    if isinstance(multimask, torch.Tensor):  # C == 4: token 0, then tokens 1..3
        best_multi = iou[:, 1:].argmax(dim=1) + 1
        index = torch.where(multimask, best_multi, torch.zeros_like(best_multi))
    else:
        index = iou.argmax(dim=1)
    return logits.gather(1, index[:, None, None, None].expand(-1, 1, *logits.shape[-2:]))


class InteractiveSimulator:
    """Runs the simulated interactive rounds of one training step through a model's batched decoder.

    Args:
        config: schedule and sampling parameters (default: the SAM paper's).
    """

    def __init__(self, config: SimulationConfig | None = None) -> None:
        self.config = config if config is not None else SimulationConfig()

    def iterate(
        self,
        model: PromptableModel,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        gt_masks: torch.Tensor,
        generator: torch.Generator,
        schedule: list[IterationKind] | None = None,
        image_sizes: torch.Tensor | None = None,
        loss_fn: Callable[..., dict[str, torch.Tensor]] | None = None,
        valid: torch.Tensor | None = None,
        checkpoint_rounds: bool = False,
    ) -> Iterator[SimulationStep]:
        """Yield the rounds one by one (the next round is computed when the caller asks for it).

        Args:
            model: the model (``decode``, ``image_size``, ``low_res_size``).
            image_embeddings: ``[B, C, h, w]`` computed once by the caller.
            image_index: ``[M]`` long, the image of each mask.
            gt_masks: ``[M, S, S]`` bool masks on the padded model-input canvas (any S, e.g. 1024 or 256).
            generator: random generator on ``gt_masks.device``.
            schedule: round kinds from :func:`make_schedule`; drawn from ``generator`` when None.
            image_sizes: optional ``[M, 2]`` ``(h, w)`` of each mask's unpadded image in model-input pixels;
                noisy boxes are clipped to it and error points drawn inside it, the padding not counting as a
                false positive (default: the whole input).
            loss_fn: optional per-round loss, called as ``loss_fn(logits, iou_pred, gt_masks, valid, multimask)``;
                its output is the step's ``losses``.
            valid: ``[M]`` bool for ``loss_fn`` (default: all masks valid).
            checkpoint_rounds: run each round's decoder (and ``loss_fn``) under activation checkpointing, so that
                backward recomputes it instead of keeping its activations (see the module docstring). Only where
                gradients are enabled.

        Yields:
            One :class:`SimulationStep` per round.
        """
        cfg = self.config
        check_masks(gt_masks, "gt_masks")
        m = gt_masks.shape[0]
        if image_index.shape != (m,) or image_index.dtype != torch.long:
            raise ValueError(
                f"image_index must be a long tensor [M]={m}, got {image_index.dtype} {tuple(image_index.shape)}"
            )
        schedule = make_schedule(cfg, generator) if schedule is None else schedule
        if len(schedule) != cfg.num_iterations or schedule[0] != "first" or "first" in schedule[1:]:
            raise ValueError(f"schedule must have {cfg.num_iterations} rounds starting with 'first', got {schedule}")

        image_size, low_res = int(model.image_size), int(model.low_res_size)
        gt_scale = mask_scale(gt_masks, image_size, "gt_masks")
        sample_gt = resize_masks(gt_masks, low_res) if cfg.sample_resolution == "low" else gt_masks
        sample_scale = image_size / sample_gt.shape[-1]
        # The mask the model gives back is cropped to the image: its padding is neither prediction nor error region.
        content = content_region(image_sizes, m, sample_gt.shape[-2:], sample_scale, gt_masks.device)

        # Round 0: a point or the noisy box, per mask.
        point, point_label = sample_points_in_masks(sample_gt, generator, sample_scale)
        box, box_found = sample_noisy_boxes(
            gt_masks, generator, gt_scale, cfg.box_noise_std_fraction, cfg.box_noise_max,
            image_size if image_sizes is None else image_sizes,
        )
        use_box = torch.rand(m, generator=generator, device=gt_masks.device) < cfg.box_probability
        pad_xy = torch.zeros_like(point)
        coords = torch.where(
            use_box[:, None, None], box.view(m, 2, 2), torch.stack((point, pad_xy), dim=1)
        )  # [M, 2, 2]
        box_labels = torch.where(
            box_found[:, None],
            torch.tensor([BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL], device=gt_masks.device),
            PAD_LABEL,
        )
        point_labels2 = torch.stack((point_label, torch.full_like(point_label, PAD_LABEL)), dim=1)
        labels = torch.where(use_box[:, None], box_labels, point_labels2).long()  # [M, 2]

        if cfg.box_probability >= 1.0:
            multimask: bool | torch.Tensor = False
            decode_kwargs = {"multimask_output": False, "return_all_tokens": False}
        elif cfg.box_probability <= 0.0:
            multimask = True
            decode_kwargs = {"multimask_output": True, "return_all_tokens": False}
        else:
            multimask = ~use_box
            decode_kwargs = {"multimask_output": True, "return_all_tokens": True}

        if valid is None:
            valid = torch.ones(m, dtype=torch.bool, device=gt_masks.device)
        recompute = checkpoint_rounds and torch.is_grad_enabled()

        def run_round(coords, labels, mask_inputs, multimask, decode_kwargs):
            logits, iou_pred = model.decode(
                image_embeddings,
                image_index,
                point_coords=coords,
                point_labels=labels,
                mask_inputs=mask_inputs,
                pad_points=False,  # the layout carries its own padding token (module docstring)
                **decode_kwargs,
            )
            losses = None if loss_fn is None else loss_fn(logits, iou_pred, gt_masks, valid, multimask)
            return logits, iou_pred, losses

        mask_inputs: torch.Tensor | None = None
        for iteration, kind in enumerate(schedule):
            if kind == "point":
                pred = (resize_logits(selected, sample_gt.shape[-2:])[:, 0] > 0) & content
                new_xy, new_label = sample_error_points(pred, sample_gt, generator, sample_scale)
                coords = torch.cat((coords, new_xy[:, None]), dim=1)
                labels = torch.cat((labels, new_label[:, None]), dim=1)
            if iteration > 0:
                multimask = False
                decode_kwargs = {"multimask_output": False, "return_all_tokens": False}
                mask_inputs = selected if cfg.feed_back_mask else None
            if recompute:
                logits, iou_pred, losses = checkpoint(
                    run_round, coords, labels, mask_inputs, multimask, decode_kwargs, use_reentrant=False
                )
            else:
                logits, iou_pred, losses = run_round(coords, labels, mask_inputs, multimask, decode_kwargs)
            selected = select_feedback(logits, iou_pred, multimask)
            yield SimulationStep(
                iteration=iteration,
                kind=kind,
                low_res_logits=logits,
                iou_pred=iou_pred,
                multimask=multimask,
                point_coords=coords,
                point_labels=labels,
                mask_inputs=mask_inputs,
                selected_logits=selected,
                losses=losses,
            )

    def loss(
        self,
        model: PromptableModel,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        gt_masks: torch.Tensor,
        valid: torch.Tensor,
        loss_fn: Callable[..., dict[str, torch.Tensor]],
        generator: torch.Generator,
        schedule: list[IterationKind] | None = None,
        image_sizes: torch.Tensor | None = None,
        checkpoint_rounds: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Run all rounds and sum the per-round loss dicts.

        Args:
            model, image_embeddings, image_index, gt_masks, generator, schedule, image_sizes, checkpoint_rounds:
                as in :meth:`iterate`.
            valid: ``[M]`` bool, False for padding masks.
            loss_fn: e.g. :class:`samtune.losses.SamLoss`, called as
                ``loss_fn(logits, iou_pred, gt_masks, valid, multimask)``.

        Returns:
            ``loss``, ``focal``, ``dice``, ``iou`` summed over rounds (still sums over masks: divide by the
            global ``num_masks``), and ``num_masks`` (valid masks, counted once).
        """
        totals: dict[str, torch.Tensor] = {}
        steps = self.iterate(
            model, image_embeddings, image_index, gt_masks, generator, schedule, image_sizes,
            loss_fn=loss_fn, valid=valid, checkpoint_rounds=checkpoint_rounds,
        )
        for step in steps:
            out = step.losses
            assert out is not None
            for key in ("loss", "focal", "dice", "iou"):
                totals[key] = out[key] if key not in totals else totals[key] + out[key]
        totals["num_masks"] = valid.sum()
        return totals
