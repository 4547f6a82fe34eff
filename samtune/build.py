"""Registry of named SAM models and :func:`build_sam`.

A model is chosen by name; its weights are a separate ``checkpoint`` argument. The registry holds plain
config dataclasses, so YAML recipes never spell out architecture trees.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from torch import nn

from samtune.modeling.image_encoder import ImageEncoderViT
from samtune.modeling.mask_decoder import MaskDecoder, TwoWayTransformer
from samtune.modeling.preprocessing import Interpolation, Normalization
from samtune.modeling.prompt_encoder import PromptEncoder
from samtune.modeling.sam import Sam

__all__ = ["ViTConfig", "TinyViTConfig", "SamConfig", "MODEL_REGISTRY", "register_model", "get_config", "build_sam", "available_models"]


@dataclass(frozen=True)
class ViTConfig:
    """SAM ViT image encoder (the paper's MAE-pretrained ViT with windowed attention)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    patch_size: int = 16
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class TinyViTConfig:
    """TinyViT image encoder of MobileSAM (``vit_t``) and LiteMedSAM."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    stem_stride: int = 4  # 4: MobileSAM (1024 -> 64x64); 1: LiteMedSAM (256 -> 64x64)
    num_classes: int = 0  # MobileSAM's file keeps an unused 1000-class head


@dataclass(frozen=True)
class SamConfig:
    """Everything needed to build one named model.

    Attributes:
        encoder: image encoder config (:class:`ViTConfig` or :class:`TinyViTConfig`).
        image_size: side of the square model input.
        normalization: input convention (see :mod:`samtune.modeling.preprocessing`).
        resize_interpolation: resize filter of the input convention (PIL bilinear for SAM, area for LiteMedSAM).
        prompt_embed_dim: token width of prompt encoder and decoder (256).
        embedding_grid: side of the image-embedding grid (64).
        mask_in_chans: hidden channels of the mask-prompt convs (16).
        decoder_depth / decoder_heads / decoder_mlp_dim: two-way transformer.
        iou_head_hidden_dim: IoU head width.
        url / sha256: official download location of the pretrained weights, if any.
    """

    encoder: ViTConfig | TinyViTConfig
    image_size: int = 1024
    normalization: Normalization = "sam"
    resize_interpolation: Interpolation = "bilinear"
    prompt_embed_dim: int = 256
    embedding_grid: int = 64
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256
    url: str | None = None
    sha256: str | None = None
    notes: str = field(default="", compare=False)

    @property
    def encoder_type(self) -> Literal["vit", "tiny_vit"]:
        return "vit" if isinstance(self.encoder, ViTConfig) else "tiny_vit"


_FB = "https://dl.fbaipublicfiles.com/segment_anything/"

MODEL_REGISTRY: dict[str, SamConfig] = {
    "sam_vit_b": SamConfig(
        ViTConfig(768, 12, 12, (2, 5, 8, 11)),
        url=_FB + "sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    "sam_vit_l": SamConfig(
        ViTConfig(1024, 24, 16, (5, 11, 17, 23)),
        url=_FB + "sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "sam_vit_h": SamConfig(
        ViTConfig(1280, 32, 16, (7, 15, 23, 31)),
        url=_FB + "sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
    "sam_vit_t": SamConfig(
        TinyViTConfig(num_classes=1000),
        url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
    ),
    "lite_medsam": SamConfig(
        TinyViTConfig(stem_stride=1),
        image_size=256,
        normalization="minmax",
        resize_interpolation="area",
        notes="weights: lite_medsam.pth from the MedSAM repository (LiteMedSAM branch); no direct URL",
    ),
    # Tiny variants for tests and CPU smoke runs (random init). 16x16 embedding grid, 64x64 low-res masks.
    "sam_tiny": SamConfig(
        ViTConfig(embed_dim=96, depth=4, num_heads=3, global_attn_indexes=(1, 3), window_size=8),
        image_size=256,
        prompt_embed_dim=64,
        embedding_grid=16,
        decoder_heads=4,
        decoder_mlp_dim=256,
        iou_head_hidden_dim=64,
    ),
    "sam_tiny_vit_t": SamConfig(
        TinyViTConfig(
            embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4), window_sizes=(7, 7, 7, 7), stem_stride=1
        ),
        image_size=256,
        normalization="minmax",
        resize_interpolation="area",
        prompt_embed_dim=64,
        decoder_heads=4,
        decoder_mlp_dim=256,
        iou_head_hidden_dim=64,
    ),
}


def register_model(name: str, config: SamConfig, overwrite: bool = False) -> None:
    """Add a named model to the registry (for plugins and custom variants)."""
    if name in MODEL_REGISTRY and not overwrite:
        raise ValueError(f"model {name!r} is already registered; pass overwrite=True to replace it")
    MODEL_REGISTRY[name] = config


def available_models() -> list[str]:
    """Names accepted by :func:`build_sam`."""
    return sorted(MODEL_REGISTRY)


def get_config(name: str) -> SamConfig:
    """The config of a registered model; a clear error listing the known names otherwise."""
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}") from None


def _build_image_encoder(cfg: SamConfig, drop_path_rate: float) -> nn.Module:
    enc = cfg.encoder
    if isinstance(enc, ViTConfig):
        if cfg.image_size // enc.patch_size != cfg.embedding_grid:
            raise ValueError(
                f"image_size {cfg.image_size} / patch {enc.patch_size} != embedding grid {cfg.embedding_grid}"
            )
        return ImageEncoderViT(
            img_size=cfg.image_size,
            patch_size=enc.patch_size,
            embed_dim=enc.embed_dim,
            depth=enc.depth,
            num_heads=enc.num_heads,
            global_attn_indexes=enc.global_attn_indexes,
            window_size=enc.window_size,
            out_chans=cfg.prompt_embed_dim,
            mlp_ratio=enc.mlp_ratio,
            drop_path_rate=drop_path_rate,
        )
    from samtune.modeling.tiny_vit import TinyViT

    stride = enc.stem_stride * 2 ** (len(enc.embed_dims) - 2)
    if cfg.image_size // stride != cfg.embedding_grid:
        raise ValueError(
            f"image_size {cfg.image_size} / TinyViT stride {stride} != embedding grid {cfg.embedding_grid}"
        )
    return TinyViT(
        img_size=cfg.image_size,
        in_chans=3,
        embed_dims=list(enc.embed_dims),
        depths=list(enc.depths),
        num_heads=list(enc.num_heads),
        window_sizes=list(enc.window_sizes),
        mlp_ratio=enc.mlp_ratio,
        drop_path_rate=drop_path_rate,
        mbconv_expand_ratio=enc.mbconv_expand_ratio,
        local_conv_size=enc.local_conv_size,
        stem_stride=enc.stem_stride,
        num_classes=enc.num_classes,
        out_chans=cfg.prompt_embed_dim,
    )


def build_sam_from_config(cfg: SamConfig, drop_path_rate: float = 0.0, decoder_dropout: float = 0.0) -> Sam:
    """Build a randomly initialised :class:`Sam` from a config."""
    grid = (cfg.embedding_grid, cfg.embedding_grid)
    return Sam(
        image_encoder=_build_image_encoder(cfg, drop_path_rate),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=grid,
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=cfg.prompt_embed_dim,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_embed_dim,
                num_heads=cfg.decoder_heads,
                mlp_dim=cfg.decoder_mlp_dim,
                dropout=decoder_dropout,
            ),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        normalization=cfg.normalization,
        resize_interpolation=cfg.resize_interpolation,
    )


def build_sam(
    name: str,
    checkpoint: str | Path | None = None,
    *,
    drop_path_rate: float = 0.0,
    decoder_dropout: float = 0.0,
    strict: bool = True,
) -> Sam:
    """Build a registered model, optionally loading weights.

    Args:
        name: registry name (see :func:`available_models`), e.g. ``"sam_vit_b"`` or ``"lite_medsam"``.
        checkpoint: official ``.pth``, MobileSAM / LiteMedSAM file, safetensors, or a samtune / Lightning
            checkpoint (see :func:`samtune.checkpoints.load_checkpoint`). None: random initialisation.
        drop_path_rate: stochastic depth of the image encoder (training).
        decoder_dropout: attention dropout in the mask decoder (training; the paper uses 0.1).
        strict: require every key to match (a mismatch lists missing, unexpected and mis-shaped keys).

    Returns:
        The model in eval mode.
    """
    cfg = get_config(name)
    model = build_sam_from_config(cfg, drop_path_rate=drop_path_rate, decoder_dropout=decoder_dropout)
    if checkpoint is not None:
        from samtune.checkpoints import load_checkpoint

        load_checkpoint(model, checkpoint, strict=strict)
    return model.eval()


def with_overrides(name: str, **changes: object) -> SamConfig:
    """A copy of a registered config with top-level fields replaced (e.g. ``image_size``)."""
    return replace(get_config(name), **changes)
