"""Image encoder speed: official ``segment_anything`` ViT vs samtune, side by side in one run.

Same weights (official init with non-zero position tables), same 1024x1024 input. Prints seconds per forward
(median of interleaved repetitions), the speed-up, and the accuracy of each samtune mode against the official
fp32 output: max abs diff for fp32, cosine similarity for the fast path.

    python benchmarks/encoder.py                 # ViT-B, CPU
    python benchmarks/encoder.py --model sam_vit_h --device cuda --repeats 10
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchmarks.common import interleaved, machine  # noqa: E402
from samtune.build import build_sam  # noqa: E402
from samtune.modeling.precision import autocast, resolve_precision  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sam_vit_b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--skip-official-bf16", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time samtune's fast path under torch.compile")
    args = parser.parse_args(argv)

    from modeling.reference import build_reference, randomize_

    torch.manual_seed(0)
    ref = randomize_(build_reference(args.model)).image_encoder.to(args.device).eval()
    ours = build_sam(args.model).image_encoder.to(args.device).eval()
    ours.load_state_dict(ref.state_dict())
    size = ours.img_size
    x = torch.randn(args.batch, 3, size, size, device=args.device)
    fast = resolve_precision("auto", args.device)

    def run(model, precision, weights_dtype=torch.float32):
        def fn():
            with torch.inference_mode(), autocast(args.device, precision):
                return model(x.to(weights_dtype))
        return fn

    # samtune's fast path is what samtune.Predictor(precision="auto") runs: a bf16 copy of the encoder.
    dtype = torch.bfloat16 if fast == "bf16" else torch.float32
    fast_encoder = copy.deepcopy(ours).to(dtype)
    fns = {
        "official fp32": run(ref, "fp32"),
        "samtune fp32": run(ours, "fp32"),
        f"samtune fast ({fast})": run(fast_encoder, "fp32", dtype),
    }
    if args.compile:
        fns["samtune fp32 + torch.compile"] = run(torch.compile(ours), "fp32")
        fns[f"samtune fast ({fast}) + torch.compile"] = run(torch.compile(fast_encoder), "fp32", dtype)
    if not args.skip_official_bf16 and fast != "fp32":
        fns[f"official {fast} autocast"] = run(ref, fast)
    times = interleaved(fns, args.repeats, args.device)

    ref_out = fns["official fp32"]().float()
    fp32_diff = {
        name: (fn().float() - ref_out).abs().max().item() for name, fn in fns.items() if name.startswith("samtune fp32")
    }
    cos = {
        name: F.cosine_similarity(fn().float().flatten(1), ref_out.flatten(1)).min().item()
        for name, fn in fns.items() if name.startswith("samtune fast")
    }

    print(f"# image encoder {args.model}, batch {args.batch}, {size}x{size}, {args.device}: {machine()}")
    print("| run | s / forward | speed-up vs official fp32 | accuracy vs official fp32 |")
    print("|---|---|---|---|")
    base = times["official fp32"]
    for name, t in times.items():
        acc = f"max abs diff {fp32_diff[name]:.2e}" if name in fp32_diff else (f"cosine {cos[name]:.5f}" if name in cos else "")
        print(f"| {name} | {t:.3f} | {base / t:.2f}x | {acc} |")


if __name__ == "__main__":
    main()
