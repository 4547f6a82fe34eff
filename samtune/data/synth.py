"""Synthetic SA-1B-format data: textured shapes with overlaps, nested parts and holes.

Each image has a smooth, low-contrast background and several objects (ellipses, rectangles, triangles, rings
with a hole showing the background) drawn in random order, each with its own colour and texture (flat, stripes,
checker, noise), so a small SAM can learn to segment an object from one click. Later objects occlude earlier
ones (their masks lose the occluded pixels); some objects get a nested "part" instance (a second annotation
inside them, as SA-1B's whole/part hierarchy). Output: ``<out>/sa_<n>.jpg`` + ``sa_<n>.json`` in the SA-1B
layout, masks as compressed COCO RLE.

Command line: ``python -m samtune.data.synth --out DIR --num-images N [--image-size 256] [--seed 0]``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from samtune.data.masks import rle_areas


def _texture(kind: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A ``[H, W]`` float pattern in [-1, 1]: 0 flat, 1 stripes, 2 checker, 3 blurred noise."""
    h, w = yy.shape
    if kind == 0:
        return np.zeros((h, w), np.float32)
    if kind == 1:
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
        return np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)).astype(np.float32)
    if kind == 2:
        cell = int(rng.integers(3, 9))
        return ((((yy // cell) + (xx // cell)) % 2) * 2 - 1).astype(np.float32)
    noise = rng.standard_normal((h, w)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 1.5) * 2.5, -1, 1)


def _shape_mask(kind: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One filled shape ``[H, W]`` uint8: 0 ellipse, 1 rotated rectangle, 2 triangle, 3 ring (with a hole)."""
    mask = np.zeros((h, w), np.uint8)
    side = min(h, w)
    cx, cy = int(rng.integers(side // 10, w - side // 10)), int(rng.integers(side // 10, h - side // 10))
    rx, ry = (int(v) for v in rng.integers(side // 14, side // 4, 2))
    if kind == 0:
        cv2.ellipse(mask, (cx, cy), (rx, ry), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif kind == 1:
        box = cv2.boxPoints(((cx, cy), (2 * rx, 2 * ry), float(rng.uniform(0, 90))))
        cv2.fillPoly(mask, [np.round(box).astype(np.int32)], 1)
    elif kind == 2:
        pts = np.array([[cx, cy - ry], [cx - rx, cy + ry], [cx + rx, cy + ry]], np.float64)
        angle = rng.uniform(0, 2 * np.pi)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        pts = (pts - [cx, cy]) @ rot.T + [cx, cy]
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    else:
        outer = max(rx, 6)
        cv2.circle(mask, (cx, cy), outer, 1, -1)
        cv2.circle(mask, (cx, cy), max(outer // 2, 2), 0, -1)
    return mask


def synthesize_image(
    image_size: int | tuple[int, int], rng: np.random.Generator, min_objects: int = 3, max_objects: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image and its instance masks.

    Args:
        image_size: S (square) or (H, W).
        rng: random source.
        min_objects, max_objects: range of the number of top-level objects.

    Returns:
        image ``[H, W, 3]`` uint8 RGB and masks ``[K, H, W]`` bool (non-empty; parts overlap their objects).

    Raises:
        ValueError: ``min_objects`` < 0 or > ``max_objects``, or a side below 16 pixels.
    """
    _check_arguments(0, image_size, min_objects, max_objects)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 110, 3).astype(np.float32)
    gradient = (xx / w * rng.uniform(-20, 20) + yy / h * rng.uniform(-20, 20))[..., None]
    image = base + gradient + rng.standard_normal((h, w, 1)).astype(np.float32) * 4
    masks: list[np.ndarray] = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        shape = _shape_mask(int(rng.integers(0, 4)), h, w, rng).astype(bool)
        if shape.sum() < 16:
            continue
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        while np.abs(colour - base).max() < 70:  # objects stand out from the background
            colour = rng.uniform(0, 255, 3).astype(np.float32)
        texture = _texture(int(rng.integers(0, 4)), yy, xx, rng)[..., None] * rng.uniform(10, 35)
        image[shape] = (colour + texture)[shape]
        masks = [m & ~shape for m in masks]  # occlusion
        masks.append(shape)
        if rng.random() < 0.3:  # a nested part with its own appearance (overlapping instance)
            part = shape & _shape_mask(0, h, w, rng).astype(bool)
            if part.sum() >= 16 and part.sum() < 0.8 * shape.sum():
                image[part] = rng.uniform(0, 255, 3).astype(np.float32)
                masks.append(part)
    masks = [m for m in masks if m.sum() >= 16]
    if not masks:  # guarantee at least one object
        shape = _shape_mask(0, h, w, rng).astype(bool)
        image[shape] = 255 - base
        masks = [shape]
    return np.clip(image, 0, 255).astype(np.uint8), np.stack(masks)


MIN_IMAGE_SIDE = 16  # the smallest instance kept has 16 pixels


def _check_arguments(num_images: int, image_size: int | tuple[int, int], min_objects: int, max_objects: int,
                     flags: bool = False) -> None:
    """Raise a ValueError naming the argument that :func:`synthesize_sa1b` cannot use (``flags``: named as the
    command-line option)."""
    def name(arg: str) -> str:
        return "--" + arg.replace("_", "-") if flags else arg

    if num_images < 0:
        raise ValueError(f"{name('num_images')} must be >= 0, got {num_images}")
    sides = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(sides) != 2 or min(sides) < MIN_IMAGE_SIDE:
        raise ValueError(f"{name('image_size')} must be a side (or height, width) of at least {MIN_IMAGE_SIDE} "
                         f"pixels, got {image_size}")
    if min_objects < 0:
        raise ValueError(f"{name('min_objects')} must be >= 0, got {min_objects}")
    if max_objects < min_objects:
        raise ValueError(f"{name('max_objects')} ({max_objects}) must be >= {name('min_objects')} ({min_objects})")


def synthesize_sa1b(
    out_dir: str | Path,
    num_images: int,
    image_size: int | tuple[int, int] = 256,
    seed: int = 0,
    min_objects: int = 3,
    max_objects: int = 8,
    start_index: int = 1,
) -> list[Path]:
    """Write ``num_images`` synthetic images with SA-1B-format annotation files.

    Args:
        out_dir: output folder (created).
        num_images: number of images.
        image_size: S (square) or (H, W).
        seed: seed of everything (same seed, same files).
        min_objects, max_objects: range of top-level objects per image.
        start_index: number of the first image (``sa_<n>``).

    Returns:
        The written image paths, in order.

    Raises:
        ValueError: a negative ``num_images`` or ``min_objects``, ``min_objects > max_objects``, or an image side
            below 16 pixels (named by argument).
    """
    _check_arguments(num_images, image_size, min_objects, max_objects)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for n in range(start_index, start_index + num_images):
        image, masks = synthesize_image(image_size, rng, min_objects, max_objects)
        h, w = image.shape[:2]
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        boxes = mask_utils.toBbox(rles)
        areas = rle_areas(rles)
        annotations = []
        for k, rle in enumerate(rles):
            ys, xs = np.nonzero(masks[k])
            pick = int(rng.integers(len(ys)))
            annotations.append({
                "id": n * 1000 + k,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "bbox": [float(v) for v in boxes[k]],
                "area": int(areas[k]),
                "predicted_iou": 1.0,
                "stability_score": 1.0,
                "point_coords": [[float(xs[pick]), float(ys[pick])]],
                "crop_box": [0.0, 0.0, float(w), float(h)],
            })
        name = f"sa_{n}"
        image_path = out / f"{name}.jpg"
        cv2.imwrite(str(image_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        record = {"image": {"image_id": n, "width": w, "height": h, "file_name": f"{name}.jpg"},
                  "annotations": annotations}
        (out / f"{name}.json").write_text(json.dumps(record))
        paths.append(image_path)
    return paths


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Command line entry point (``samtune data synth``)."""
    parser = argparse.ArgumentParser(prog="samtune data synth", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--num-images", type=int, required=True, help="number of images")
    parser.add_argument("--image-size", type=int, default=256, help="square image side (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--min-objects", type=int, default=3, help="fewest top-level objects per image (default 3)")
    parser.add_argument("--max-objects", type=int, default=8, help="most top-level objects per image (default 8)")
    args = parser.parse_args(argv)
    if args.num_images <= 0:
        parser.error("--num-images must be positive")
    try:
        _check_arguments(args.num_images, args.image_size, args.min_objects, args.max_objects, flags=True)
    except ValueError as err:
        parser.error(str(err))
    paths = synthesize_sa1b(args.out, args.num_images, args.image_size, args.seed, args.min_objects,
                            args.max_objects)
    print(f"wrote {len(paths)} images with SA-1B annotations to {args.out}")
    return paths


if __name__ == "__main__":
    main()
