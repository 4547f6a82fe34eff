"""The SAM model in pure PyTorch (torch and timm only; never Lightning)."""
from samtune.modeling.image_encoder import ImageEncoderViT
from samtune.modeling.mask_decoder import MaskDecoder, TwoWayTransformer
from samtune.modeling.prompt_encoder import PromptEncoder
from samtune.modeling.sam import Sam

__all__ = ["ImageEncoderViT", "MaskDecoder", "TwoWayTransformer", "PromptEncoder", "Sam"]
