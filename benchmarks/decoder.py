"""Prompt encoder + mask decoder speed: official ``segment_anything`` vs samtune, side by side in one run.

Same weights, same image embedding, same prompts (one positive point + one negative point per prompt, the
interactive-annotation case). For each number of prompts per call N, prints milliseconds per prompt (median
of interleaved repetitions) for the official modules and samtune in fp32 and in its fast path, with the max
abs difference of the low-res logits.

    python benchmarks/decoder.py                      # ViT-B sized decoder (256-d, 64x64), CPU
    python benchmarks/decoder.py --model lite_medsam  # any registered model (TinyViT: decoder only)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchmarks.common import interleaved, machine  # noqa: E402
from samtune.build import build_sam  # noqa: E402
from samtune.modeling.precision import autocast, resolve_precision  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sam_vit_b", help="registry name; only the decoder side is used")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from modeling.reference import build_reference, randomize_

    torch.manual_seed(0)
    ours = build_sam(args.model).to(args.device).eval()
    randomize_(ours)
    # The official prompt encoder and decoder are architecture-independent of the image encoder: build them
    # for a ViT registry entry with the same decoder config and copy samtune's weights in.
    ref = build_reference("sam_vit_b" if ours.prompt_encoder.embed_dim == 256 else "sam_tiny")
    ref.prompt_encoder = _official_prompt_encoder(ours)
    ref.prompt_encoder.load_state_dict(ours.prompt_encoder.state_dict())
    ref.mask_decoder.load_state_dict(ours.mask_decoder.state_dict())
    ref = ref.to(args.device).eval()
    grid = ours.prompt_encoder.image_embedding_size
    emb = torch.randn(1, ours.prompt_encoder.embed_dim, *grid, device=args.device)
    fast = resolve_precision("auto", args.device)
    size = ours.image_size

    print(f"# prompt encoder + mask decoder ({args.model}), {args.device}: {machine()}")
    print("| prompts / call | official fp32 ms/prompt | samtune fp32 ms/prompt | speed-up | "
          f"samtune {fast} ms/prompt | speed-up | max abs diff fp32 |")
    print("|---|---|---|---|---|---|---|")
    for n in args.prompts:
        gen = torch.Generator().manual_seed(n)
        coords = (torch.rand(n, 2, 2, generator=gen) * size).to(args.device)
        labels = torch.tensor([[1, 0]] * n, device=args.device)

        def official():
            with torch.inference_mode():
                sparse, dense = ref.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
                return ref.mask_decoder(
                    image_embeddings=emb, image_pe=ref.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
                )[0]

        def samtune(precision):
            def fn():
                with torch.inference_mode(), autocast(args.device, precision):
                    return ours.decode(emb, point_coords=coords, point_labels=labels, multimask_output=True)[0]
            return fn

        times = interleaved({"ref": official, "fp32": samtune("fp32"), "fast": samtune(fast)}, args.repeats, args.device)
        diff = (official().float() - samtune("fp32")().float()).abs().max().item()
        ms = {k: v * 1000 / n for k, v in times.items()}
        print(f"| {n} | {ms['ref']:.2f} | {ms['fp32']:.2f} | {ms['ref'] / ms['fp32']:.2f}x | {ms['fast']:.2f} | "
              f"{ms['ref'] / ms['fast']:.2f}x | {diff:.1e} |")


def _official_prompt_encoder(ours):
    from segment_anything.modeling import PromptEncoder

    pe = ours.prompt_encoder
    return PromptEncoder(
        embed_dim=pe.embed_dim,
        image_embedding_size=pe.image_embedding_size,
        input_image_size=pe.input_image_size,
        mask_in_chans=pe.mask_downscaling[0].out_channels * 4,
    )


if __name__ == "__main__":
    main()
