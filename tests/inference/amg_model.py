"""A SAM with hand-set decoder weights whose masks are nested blobs around the clicked point.

Random weights make SAM's decoder output near-constant logits that barely depend on the prompt, so an automatic
mask generator finds nothing to keep (or one whole-image mask). For comparing two generators we want what a
trained model gives: for every grid point a few masks of different sizes around the point, with sharp
boundaries, shapes perturbed by the image, and predicted IoUs spread around the default threshold. This module
sets the weights of the registered ``sam_tiny`` model (256 px, 64-d decoder, 16x16 embedding, 64x64 logits;
any ViT model works, e.g. ``sam_vit_b`` for benchmarks) so that:

* the prompt encoder's Fourier features use 4 frequency directions (each repeated; 8 for SAM's 256-d decoder),
  so the positional encoding lives in a subspace as wide as one attention head, and
  ``k(x, x') = sum_j cos(2 pi g_j . (x - x'))`` is a smooth, single-peaked kernel over the image;
* the first decoder layer passes the prompt tokens through unchanged (orthogonal token embeddings attend to
  themselves) and its image-to-token attention compares the image-grid and point encodings in that subspace:
  image tokens near the point attend to the point token and receive a fixed direction ``z``;
* the mask head reads the component of the (layer-normed) image tokens along ``z``, and the three multimask
  tokens threshold it at three levels: three nested blobs with logits of magnitude ~40;
* everything else keeps random values (image encoder, the second layer's token path, the IoU head's hidden
  layers), so the image texture perturbs the blobs and the predicted IoU varies by a few hundredths around a
  per-token level (``IOU_LEVELS``, set through the IoU head's bias).

The same state dict loads into the official ``segment_anything`` model built with the ``sam_tiny``
architecture (``tests/modeling/reference.py``), which is how the generators are compared.
"""
from __future__ import annotations

import math

import torch

from samtune import Sam, build_sam

from ..modeling.reference import randomize_

IOU_LEVELS = (0.90, 0.875, 0.885, 0.95)  # mean predicted IoU per mask token (0.88: token 1 mostly fails)


def _hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix ``[n, n]`` (n a power of 2) with entries +-1."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@torch.no_grad()
def localized_sam(
    name: str = "sam_tiny",
    seed: int = 0,
    radius_scale: float = 0.5,
    image_weight: float = 0.3,
    sharpness: float = 0.5,
    value: float = 0.5,
    levels: tuple[float, float, float, float] = (3.7, 2.65, 3.7, 5.0),
    gain: float = 40.0,
    iou_spread: float = 1.0,
) -> Sam:
    """A registered ViT model whose masks are nested blobs around the prompt point (see the module docstring).

    Args:
        name: registry name of a model with a ViT encoder (``sam_tiny``; ``sam_vit_b`` for benchmarks).
        seed: seed of the random weights that are kept.
        radius_scale: frequency of the Fourier features (larger: smaller blobs).
        image_weight: scale of the image embedding (larger: blobs follow the image texture more).
        sharpness: scale of the image-to-token query/key projections (larger: sharper, larger blobs).
        value: scale of the point token's value (how strongly the click marks the image tokens near it).
        levels: per mask token (0..3), the level of ``z . token`` above which a pixel is in the mask (larger:
            smaller blob); tokens 1..3 are the multimask outputs.
        gain: logit scale (larger: sharper logits, higher stability scores).
        iou_spread: scale of the IoU head's random last layer (spread of the predicted IoU around its level).

    Returns:
        The model in eval mode.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sam = build_sam(name)
    randomize_(sam, seed)
    pe, dec = sam.prompt_encoder, sam.mask_decoder
    c = pe.embed_dim  # 64 for sam_tiny, 256 for SAM
    i2t = dec.transformer.layers[0].cross_attn_image_to_token
    heads, head_dim = i2t.num_heads, i2t.internal_dim // i2t.num_heads
    groups = head_dim // 2  # frequency directions (4 for sam_tiny, 8 for SAM), each repeated `rep` times
    rep = c // 2 // groups
    # Positional encoding in an 8-d subspace: group j of the sin half and of the cos half share one frequency.
    angles = torch.arange(groups) * math.pi / groups
    freqs = torch.stack([torch.cos(angles), torch.sin(angles)]) * radius_scale
    pe.pe_layer.positional_encoding_gaussian_matrix.copy_(freqs.repeat_interleave(rep, dim=1))
    proj = torch.zeros(2 * groups, c)  # rows: normalised indicators of the 8 groups (the PE subspace)
    for j in range(2 * groups):
        proj[j, j * rep : (j + 1) * rep] = 1 / math.sqrt(rep)

    # Token embeddings orthogonal to the PE subspace and to each other (zero-sum Hadamard rows in every group).
    had = _hadamard(rep)[1:] / math.sqrt(rep)  # 7 zero-sum orthonormal rows of length 8

    def token(t: int, scale: float = 4.0) -> torch.Tensor:
        return scale * had[t].repeat(c // rep)

    dec.iou_token.weight.copy_(token(0)[None])
    dec.mask_tokens.weight.copy_(torch.stack([token(1 + i) for i in range(4)]))
    pe.point_embeddings[1].weight.copy_(token(5)[None])  # positive click
    pe.point_embeddings[0].weight.copy_(token(5)[None])
    pe.not_a_point_embed.weight.copy_(token(6)[None])
    pe.no_mask_embed.weight.mul_(0.1)
    neck = sam.image_encoder.neck[3]
    neck.weight.mul_(image_weight)
    neck.bias.mul_(image_weight)

    layer0, layer1 = dec.transformer.layers
    eye = torch.eye(c)
    # Self-attention ~ identity: every token attends to itself (orthogonal tokens, large logits).
    sa = layer0.self_attn
    for lin, w in ((sa.q_proj, 3 * eye), (sa.k_proj, 3 * eye), (sa.v_proj, eye), (sa.out_proj, eye)):
        lin.weight.copy_(w)
        lin.bias.zero_()
    # Token-to-image attention and MLP add nothing; the norms are plain standardisation.
    layer0.cross_attn_token_to_image.out_proj.weight.zero_()
    layer0.cross_attn_token_to_image.out_proj.bias.zero_()
    layer0.mlp.lin2.weight.zero_()
    layer0.mlp.lin2.bias.zero_()
    for norm in (layer0.norm1, layer0.norm2, layer0.norm3, layer0.norm4, layer1.norm4):
        norm.weight.fill_(1.0)
        norm.bias.zero_()
    # Image-to-token attention: the logit of (image token i, point token) is ~2.8 k(x_i, x_point); the other
    # tokens are orthogonal to the PE subspace (logit 0). Only the point token has a value (along u -> z).
    i2t.q_proj.weight.copy_(sharpness * proj.repeat(heads, 1))
    i2t.k_proj.weight.copy_(sharpness * proj.repeat(heads, 1))
    i2t.q_proj.bias.zero_()
    i2t.k_proj.bias.zero_()
    u = token(5) / token(5).norm()
    w = torch.zeros(i2t.internal_dim)
    w[0] = 1.0
    z = token(0, 1.0) / token(0, 1.0).norm()  # zero-mean unit direction written into the image tokens
    i2t.v_proj.weight.copy_(value * torch.outer(w, u))
    i2t.v_proj.bias.zero_()
    i2t.out_proj.weight.copy_(torch.outer(z, w))
    i2t.out_proj.bias.zero_()
    # The second layer leaves the image tokens alone (beyond re-normalising them).
    layer1.cross_attn_image_to_token.out_proj.weight.zero_()
    layer1.cross_attn_image_to_token.out_proj.bias.zero_()

    # Mask head: channel 0 of the first upscaling = s = z . token, channel 1 = -s, the others +-1 (bias);
    # LayerNorm keeps a monotone function of s; the second upscaling passes it through with a constant channel.
    conv1, norm, _, conv2, _ = dec.output_upscaling
    c1, c2 = conv1.out_channels, conv2.out_channels
    w1 = torch.zeros(c, c1)
    w1[:, 0], w1[:, 1] = z, -z
    conv1.weight.copy_(w1[:, :, None, None].expand(-1, -1, 2, 2))
    conv1.bias.copy_(torch.tensor([0.0, 0.0] + [1.0, -1.0] * ((c1 - 2) // 2)))
    norm.weight.fill_(1.0)
    norm.bias.zero_()
    w2 = torch.zeros(c1, c2)
    w2[0, 0] = 1.0
    conv2.weight.copy_(w2[:, :, None, None].expand(-1, -1, 2, 2))
    conv2.bias.copy_(torch.tensor([0.0, 1.0] + [0.0] * (c2 - 2)))
    def gelu(x: float) -> float:
        return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))

    for mlp, level in zip(dec.output_hypernetworks_mlps, levels):
        # LayerNorm of [s, -s, +-1, ...] gives channel 0 = s * sqrt(c1) / sqrt(2 s^2 + c1 - 2): threshold there.
        cut = gelu(level * math.sqrt(c1) / math.sqrt(2 * level**2 + c1 - 2))
        mlp.layers[-1].weight.zero_()
        mlp.layers[-1].bias.copy_(torch.tensor([gain, -gain * cut / gelu(1.0)] + [0.0] * (c2 - 2)))
    head = dec.iou_prediction_head.layers[-1]
    head.weight.mul_(iou_spread)
    # Centre each token's predicted IoU on its level: measure the mean over a grid of clicks on a random image.
    sam.eval()
    gen = torch.Generator().manual_seed(seed)
    grid = sam.prompt_encoder.image_embedding_size
    embedding = torch.randn(1, c, *grid, generator=gen)
    clicks = torch.rand(64, 1, 2, generator=gen) * sam.image_size
    _, iou = sam.decode(embedding, point_coords=clicks, point_labels=torch.ones(64, 1), return_all_tokens=True)
    head.bias.add_(torch.tensor(IOU_LEVELS) - iou.mean(dim=0))
    return sam
