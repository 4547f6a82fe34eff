"""One SAM training step: samtune's task vs a straightforward loop over the official ``segment_anything`` modules.

The step of the SAM paper: encode the image (forward AND backward through the encoder), 11 simulated prompt
rounds over N masks (first prompt a point or the noisy box, 8 error-point rounds, 2 mask-only rounds, the previous
logits fed back), focal 20 : dice 1 : IoU-MSE 1 per round, one backward, one AdamW step.

* reference: the official modules called directly (not ``Sam.forward``, which runs under no_grad), one decoder
  call per mask per round, the next point drawn on the host with numpy, fp32 eager. ``--reference-backward one``
  (default) keeps every mask's rounds in one graph and back-propagates once; at 16 ViT-B masks that graph needs
  about 30 GB. ``per-mask`` back-propagates each mask's rounds into the detached image embedding as soon as they
  are done, then runs one encoder backward with the summed embedding gradient: the same arithmetic with one
  mask's decoder graphs alive at a time (a leaner reference: its peak memory is the lower one);
* samtune: ``PromptableSegmentationTask.training_step`` (one batched decoder call per round, sampling on device)
  with bf16 autocast where the hardware runs it natively, activation checkpointing of the encoder blocks and
  ``decoder_checkpointing`` (each round's decoder recomputed in backward instead of kept).

Each side runs in its own spawned process (so its peak memory, ``ru_maxrss``, is its own), one after the other
and interleaved over the repetitions (ref, samtune, ref, samtune, ...). Reported: median seconds per step (the
first step of every process is a warm-up and is not timed) and peak resident memory.

    python benchmarks/train_step.py                         # ViT-B at 1024, 16 masks, 11 rounds
    python benchmarks/train_step.py --reference-backward per-mask   # the same where the reference needs > RAM
    python benchmarks/train_step.py --model sam_tiny --masks 4 --iterations 3
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _masks(num: int, size: int, seed: int) -> "Any":
    """``[num, size, size]`` bool ellipses (the same for both sides)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = torch.rand(num, 2, generator=g) * size * 0.6 + size * 0.2
    r = torch.rand(num, 2, generator=g) * size * 0.15 + size * 0.05
    return ((xx - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 + ((yy - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2 <= 1


def _reference_side(model: str, num_masks: int, iterations: int, steps: int, seed: int,
                    backward: str = "one") -> dict[str, Any]:
    import numpy as np
    import resource
    import torch
    import torch.nn.functional as F
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    from functools import partial

    from samtune.build import get_config

    cfg = get_config(model)
    enc = cfg.encoder
    torch.manual_seed(seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=enc.depth, embed_dim=enc.embed_dim, img_size=cfg.image_size, mlp_ratio=enc.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=enc.num_heads, patch_size=enc.patch_size,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=enc.global_attn_indexes, window_size=enc.window_size,
            out_chans=cfg.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim, image_embedding_size=(cfg.embedding_grid, cfg.embedding_grid),
            input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_embed_dim,
                                          mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_heads),
            transformer_dim=cfg.prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
    ).train()
    optimizer = torch.optim.AdamW(sam.parameters(), lr=1e-5)
    size = cfg.image_size
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    gt = _masks(num_masks, size, seed)
    low = 4 * cfg.embedding_grid
    gt_low = F.interpolate(gt[:, None].float(), (low, low), mode="area")[:, 0] >= 0.5
    gt_low_np = gt_low.numpy()
    rng = np.random.default_rng(seed)

    def loss_of(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = target.float().expand_as(logits)
        p = torch.sigmoid(logits)
        ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
        p_t = p * t + (1 - p) * (1 - t)
        focal = (ce * (1 - p_t) ** 2 * (0.25 * t + 0.75 * (1 - t))).mean((-2, -1))
        dice = 1 - (2 * (p * t).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1)
        with torch.no_grad():
            pred = logits > 0
            inter = (pred & target.bool()).sum((-2, -1)).float()
            union = (pred | target.bool()).sum((-2, -1)).float()
            actual = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
        mask_loss = 20 * focal + dice
        best = mask_loss.argmin(dim=1)
        return mask_loss[0, best[0]] + ((iou_pred - actual) ** 2).mean()

    def rounds(k: int, embeddings: torch.Tensor, dense_pe: torch.Tensor, mask_only: set[int]) -> torch.Tensor:
        """All simulated rounds of mask ``k``, one decoder call each; the sum of their losses."""
        ys, xs = np.nonzero(gt_low_np[k])
        if rng.random() < 0.5:  # noisy box
            x0, x1, y0, y1 = xs.min() * 4, xs.max() * 4, ys.min() * 4, ys.max() * 4
            noise = rng.normal(0, 1, 4) * np.minimum(0.1 * np.array([x1 - x0, y1 - y0] * 2), 20)
            box: np.ndarray | None = np.array([x0, y0, x1, y1], np.float32) + noise.astype(np.float32)
            coords, labels = np.zeros((0, 2), np.float32), np.zeros((0,), np.int64)
        else:
            j = rng.integers(len(ys))
            box = None
            coords, labels = np.array([[xs[j] * 4 + 2, ys[j] * 4 + 2]], np.float32), np.array([1], np.int64)
        previous: torch.Tensor | None = None
        total = torch.zeros(())
        for it in range(iterations):
            if it > 0 and it not in mask_only:  # a new point from the error region, on the host
                pred = previous[0, 0].numpy() > 0
                fn, fp = gt_low_np[k] & ~pred, pred & ~gt_low_np[k]
                err = np.argwhere(fn | fp)
                if len(err):
                    y, x = err[rng.integers(len(err))]
                    coords = np.concatenate([coords, [[x * 4 + 2, y * 4 + 2]]]).astype(np.float32)
                    labels = np.concatenate([labels, [1 if fn[y, x] else 0]])
            pts = (torch.from_numpy(coords)[None], torch.from_numpy(labels)[None]) if len(labels) else None
            boxes = None if box is None else torch.from_numpy(box)[None]
            sparse, dense = sam.prompt_encoder(points=pts, boxes=boxes, masks=previous)
            logits, iou_pred = sam.mask_decoder(
                image_embeddings=embeddings, image_pe=dense_pe, sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense, multimask_output=it == 0 and box is None,
            )
            total = total + loss_of(logits, iou_pred, gt_low[k][None, None])
            best = int(iou_pred.argmax(1)[0])
            previous = logits[:, best : best + 1].detach()
        return total

    def step() -> None:
        embeddings = sam.image_encoder(image)
        dense_pe = sam.prompt_encoder.get_dense_pe()
        mask_only = {int(rng.integers(1, iterations - 1)), iterations - 1} if iterations > 2 else set()
        if backward == "one":  # every mask's rounds in one graph, one backward
            total = sum(rounds(k, embeddings, dense_pe, mask_only) for k in range(num_masks))
            (total / num_masks).backward()
        else:  # each mask's rounds back-propagated into the embedding as soon as they are done
            leaf = embeddings.detach().requires_grad_(True)
            for k in range(num_masks):
                (rounds(k, leaf, dense_pe, mask_only) / num_masks).backward()
            embeddings.backward(leaf.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _time_steps(step, steps) | {"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _samtune_side(model: str, num_masks: int, iterations: int, steps: int, seed: int) -> dict[str, Any]:
    import resource
    import warnings

    import torch

    from samtune.modeling.precision import autocast, resolve_precision
    from samtune.prompts import SimulationConfig
    from samtune.tasks import OptimizerConfig, PromptableSegmentationTask

    warnings.filterwarnings("ignore", message=".*self.log.*")
    torch.manual_seed(seed)
    points = max(iterations - 3, 0)
    simulation = SimulationConfig(num_iterations=iterations, num_point_iterations=points,
                                  random_mask_only_iteration=iterations > 2, final_mask_only_iteration=iterations > 1)
    task = PromptableSegmentationTask(model, simulation=simulation, activation_checkpointing=True,
                                      decoder_checkpointing=True,
                                      optimizer=OptimizerConfig(lr=1e-5, schedule="constant"))
    optimizer = task.configure_optimizers()["optimizer"]
    size = task.model.image_size
    batch = {
        "images": torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed)),
        "masks": _masks(num_masks, size, seed)[None],
        "mask_valid": torch.ones(1, num_masks, dtype=torch.bool),
        "input_size": torch.tensor([[size, size]]),
    }
    precision = resolve_precision("auto", "cpu")

    def step() -> None:
        with autocast("cpu", precision):
            loss = task.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    out = _time_steps(step, steps)
    return out | {"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "precision": precision}


def _time_steps(step: Any, steps: int) -> dict[str, Any]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    timed = times[1:] if len(times) > 1 else times
    return {"times": timed}


def _child(side: str, queue: Any, *args: Any) -> None:
    fn = _reference_side if side == "reference" else _samtune_side
    queue.put(fn(*args))


def _run(side: str, *args: Any) -> dict[str, Any]:
    """Run one side in a fresh spawned process; a clear error when it dies (e.g. killed for memory)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=_child, args=(side, queue, *args))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or queue.empty():
        raise RuntimeError(
            f"the {side} process exited with code {proc.exitcode} (-9: killed, usually out of memory); "
            "try fewer --masks or --iterations"
        )
    return queue.get()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sam_vit_b", help="registry name of a ViT model (default sam_vit_b)")
    parser.add_argument("--masks", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=11, help="simulated rounds (11 in the paper)")
    parser.add_argument("--repeats", type=int, default=1, help="processes per side (interleaved)")
    parser.add_argument("--steps", type=int, default=2, help="steps per process; the first is an untimed warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-backward", choices=("one", "per-mask"), default="one",
                        help="one: all masks' rounds in one graph, one backward (the straightforward loop; at 16 "
                             "ViT-B masks it needs ~30 GB); per-mask: each mask's rounds back-propagated into the "
                             "detached embedding when done, then one encoder backward (same arithmetic, the "
                             "decoder graphs of one mask alive at a time)")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.masks < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--iterations, --masks, --steps and --repeats must be >= 1")

    from benchmarks.common import machine

    results: dict[str, list[dict[str, Any]]] = {"reference": [], "samtune": []}
    for _ in range(args.repeats):
        for side in ("reference", "samtune"):
            extra = (args.reference_backward,) if side == "reference" else ()
            results[side].append(_run(side, args.model, args.masks, args.iterations, args.steps, args.seed, *extra))
            print(f"  {side}: {results[side][-1]}", flush=True)
    summary = {
        side: (statistics.median(t for r in runs for t in r["times"]), max(r["peak_gb"] for r in runs))
        for side, runs in results.items()
    }
    (ref_s, ref_gb), (ours_s, ours_gb) = summary["reference"], summary["samtune"]
    print(f"\n{machine()}")
    print(f"{args.model}, batch 1, {args.masks} masks, {args.iterations} rounds, encoder forward + backward, AdamW "
          f"step; samtune precision {results['samtune'][0]['precision']}, activation checkpointing\n")
    print("| side | s/step | peak GB (max RSS) |")
    print("|---|---|---|")
    print(f"| reference (official modules, per-mask decoder, numpy sampling, fp32, backward: "
          f"{args.reference_backward}) | {ref_s:.2f} | {ref_gb:.2f} |")
    print(f"| samtune PromptableSegmentationTask | {ours_s:.2f} | {ours_gb:.2f} |")
    print(f"| ratio | {ref_s / ours_s:.2f}x faster | {ours_gb / ref_gb:.0%} of the reference's memory |")


if __name__ == "__main__":
    main()
