"""Data loading throughput vs the consumption rate of a ViT-B training step.

Loading: SA-1B-style files (JPEG 1500 x 2250, ~100 RLE masks each, like the real SA-1B) read by
``SA1BDataset`` at 1024 px with 64 masks per image, ``natural`` augmentation, 2 DataLoader workers, batch 1.
Consumption: forward + backward of the official ``segment_anything`` ViT-B image encoder on one 1024 image
(bf16 autocast on CUDA, fp32 on CPU). Loading is not the bottleneck when the ratio loading/consumption > 1.

Usage: ``python benchmarks/data.py [--num-images 24] [--workers 2] [--reps 2] [--device auto]``
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils

from samtune.data import SA1BDataset, collate_samples, seed_worker


def write_sa1b_like(out: Path, num_images: int, height: int = 1500, width: int = 2250, masks: int = 100) -> None:
    """SA-1B-sized files: a noisy JPEG and ``masks`` random ellipses/rectangles as compressed RLE."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in range(num_images):
        small = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        stack = np.zeros((height, width, masks), np.uint8, order="F")
        for k in range(masks):
            canvas = np.zeros((height, width), np.uint8)
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            axes = (int(rng.integers(10, 500)), int(rng.integers(10, 500)))
            cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
            stack[:, :, k] = canvas
        rles = mask_utils.encode(stack)
        anns = [{"id": k, "segmentation": {"size": [height, width], "counts": r["counts"].decode()}}
                for k, r in enumerate(rles)]
        cv2.imwrite(str(out / f"sa_{n}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        (out / f"sa_{n}.json").write_text(json.dumps({"image": {"height": height, "width": width},
                                                      "annotations": anns}))


def loading_rate(root: Path, workers: int, image_size: int = 1024, max_masks: int = 64) -> tuple[float, float]:
    """(images/s, mean masks per image) of a full pass after one warm-up batch per worker."""
    ds = SA1BDataset(root, image_size=image_size, train=True, augmentation="natural",
                     max_masks_per_image=max_masks)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, shuffle=True, num_workers=workers,
                                         collate_fn=collate_samples, worker_init_fn=seed_worker,
                                         pin_memory=torch.cuda.is_available(), prefetch_factor=2,
                                         persistent_workers=True)
    for _ in loader:  # warm-up epoch: worker start, imports, page cache
        break
    count, masks = 0, 0
    start = time.perf_counter()
    for batch in loader:
        count += batch["images"].shape[0]
        masks += int(batch["mask_valid"].sum())
    return count / (time.perf_counter() - start), masks / max(count, 1)


def vit_b_rate(device: str, reps: int) -> float:
    """Images/s of forward + backward of the official ViT-B image encoder at 1024 px, batch 1."""
    from segment_anything.modeling import ImageEncoderViT

    encoder = ImageEncoderViT(
        depth=12, embed_dim=768, img_size=1024, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=12, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(2, 5, 8, 11),
        window_size=14, out_chans=256,
    ).to(device)
    image = torch.randn(1, 3, 1024, 1024, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast(
        "cpu", enabled=False)

    def step() -> None:
        with autocast:
            loss = encoder(image).float().square().mean()
        loss.backward()
        encoder.zero_grad(set_to_none=True)

    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return reps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sa1b"
        start = time.perf_counter()
        write_sa1b_like(root, args.num_images)
        print(f"wrote {args.num_images} SA-1B-like images in {time.perf_counter() - start:.1f}s")
        load, masks = loading_rate(root, args.workers)
    torch.set_num_threads(os.cpu_count() or 1)
    consume = vit_b_rate(device, args.reps)
    hardware = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'x86'})"
    print()
    print(f"| measurement ({os.cpu_count()} CPU cores, {hardware}) | images/s |")
    print("|---|---|")
    print(f"| SA1BDataset 1500x2250 -> 1024, {masks:.0f} masks/image, natural aug, {args.workers} workers | "
          f"{load:.2f} |")
    print(f"| ViT-B encoder forward+backward, 1 x 1024, {device}{' bf16' if device == 'cuda' else ' fp32'} | "
          f"{consume:.2f} |")
    print(f"| ratio loading / consumption | {load / consume:.2f} |")


if __name__ == "__main__":
    main()
