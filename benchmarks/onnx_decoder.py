"""ONNX decoder latency: the official ``segment_anything`` export vs samtune's, both in onnxruntime, one run.

Same weights (a ViT-B sized prompt encoder + mask decoder, random values), same image embedding and prompts.
Both graphs are exported as their tools do (opset 17, TorchScript exporter); the official one with the
benchmark's image size as its dummy ``orig_im_size`` (the segment-anything 1.0 export bakes that aspect ratio
into the graph). onnxruntime on CPU with ``--threads`` intra-op threads (default 2), calls interleaved
(official, samtune, official, ...); prints the median milliseconds per prompt (one decoder call: one click +
the padding point, or a box, or several clicks), the ratio, and the max abs difference of the outputs.

    python benchmarks/onnx_decoder.py
    python benchmarks/onnx_decoder.py --orig-size 1500 2250 --points 2 6 --single-mask
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import interleaved, machine  # noqa: E402
from samtune.build import build_sam  # noqa: E402
from samtune.export.onnx import export_onnx_decoder  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sam_vit_b", help="registry name of a ViT model (official reference)")
    parser.add_argument("--orig-size", type=int, nargs=2, default=[1200, 1800], metavar=("H", "W"),
                        help="original image size the masks are upscaled to")
    parser.add_argument("--points", type=int, nargs="+", default=[2, 6], help="points per prompt, padding included")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--single-mask", action="store_true", help="export both with return_single_mask")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from tests.export.official import export_official, official_sam_like
    from tests.modeling.reference import randomize_

    torch.manual_seed(0)
    ours = build_sam(args.model).eval()
    randomize_(ours.prompt_encoder, seed=1)
    randomize_(ours.mask_decoder, seed=2)
    official = official_sam_like(ours, args.model)
    orig = tuple(args.orig_size)

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        ours_path = export_onnx_decoder(ours, Path(tmp) / "samtune.onnx", return_single_mask=args.single_mask)
        ref_path = export_official(official, Path(tmp) / "official.onnx", orig, return_single_mask=args.single_mask)
        sessions = {
            "official": ort.InferenceSession(str(ref_path), options, providers=["CPUExecutionProvider"]),
            "samtune": ort.InferenceSession(str(ours_path), options, providers=["CPUExecutionProvider"]),
        }
        pe = ours.prompt_encoder
        size = ours.image_size
        print(f"# ONNX decoder ({args.model} prompt encoder + mask decoder), onnxruntime {ort.__version__} CPU, "
              f"{args.threads} threads, masks upscaled to {orig[0]}x{orig[1]}, "
              f"{'single mask' if args.single_mask else '4 masks'}: {machine()}")
        print("| points | official ms/prompt | samtune ms/prompt | official / samtune | max abs diff |")
        print("|---|---|---|---|---|")
        for n in args.points:
            gen = torch.Generator().manual_seed(n)
            labels = torch.randint(0, 2, (1, n), generator=gen).float()
            labels[0, -1] = -1.0  # the padding point of a click-only prompt
            feed = {
                "image_embeddings": torch.randn(1, pe.embed_dim, *pe.image_embedding_size, generator=gen).numpy(),
                "point_coords": (torch.rand(1, n, 2, generator=gen) * size * 0.6).numpy(),
                "point_labels": labels.numpy(),
                "mask_input": np.zeros((1, 1, *pe.mask_input_size), dtype=np.float32),
                "has_mask_input": np.zeros(1, dtype=np.float32),
                "orig_im_size": np.array(orig, dtype=np.float32),
            }
            outputs = {name: sess.run(None, feed) for name, sess in sessions.items()}
            diff = max(float(np.abs(a - b).max()) for a, b in zip(outputs["official"], outputs["samtune"]))
            times = interleaved({name: (lambda s=sess: s.run(None, feed)) for name, sess in sessions.items()},
                                args.repeats, warmup=3)
            ms = {k: v * 1e3 for k, v in times.items()}
            print(f"| {n} | {ms['official']:.2f} | {ms['samtune']:.2f} | {ms['official'] / ms['samtune']:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
