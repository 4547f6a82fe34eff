"""Parameter-efficient adaptation of SAM: LoRA (via peft), bottleneck adapters, freeze policies, merging.

This is the only package that imports peft; it never imports Lightning.

* :class:`AdaptationConfig`: method (``none`` / ``lora`` / ``adapter``), freeze policy, LoRA and adapter settings.
* :func:`apply_adaptation`: adapt a :class:`samtune.modeling.Sam` in place.
* :func:`trainable_state_dict`: the trainable weights (what an adapter checkpoint stores).
* :func:`save_adapter_checkpoint` / :func:`load_adapter_checkpoint` / :func:`is_adapter_checkpoint`: small files
  with the trainable weights and what is needed to rebuild the model from its base checkpoint.
* :func:`merge_adaptation` / :func:`export_merged`: LoRA folded into the weights, official key layout.
  Bottleneck adapters cannot be merged (:class:`AdapterMergeError`): ship them as base + adapter checkpoint.
"""
from samtune.adapt.adapters import AdaptedAttention, BottleneckAdapter, ParallelAdapterMLP
from samtune.adapt.blocks import attention_blocks, select_blocks
from samtune.adapt.cache import CacheConfig, CacheError, EmbeddingCache, encoder_fingerprint
from samtune.adapt.checkpoint import (
    extract_adapter_checkpoint,
    is_adapter_checkpoint,
    load_adapter_checkpoint,
    read_adapter_checkpoint,
    save_adapter_checkpoint,
)
from samtune.adapt.config import AdaptationConfig
from samtune.adapt.core import (
    AdapterMergeError,
    adaptation_of,
    apply_adaptation,
    eval_frozen_batchnorm,
    export_merged,
    is_adapted,
    merge_adaptation,
    trainable_state_dict,
)

__all__ = [
    "AdaptationConfig",
    "AdaptedAttention",
    "AdapterMergeError",
    "BottleneckAdapter",
    "CacheConfig",
    "CacheError",
    "EmbeddingCache",
    "ParallelAdapterMLP",
    "adaptation_of",
    "apply_adaptation",
    "attention_blocks",
    "encoder_fingerprint",
    "eval_frozen_batchnorm",
    "export_merged",
    "extract_adapter_checkpoint",
    "is_adapted",
    "is_adapter_checkpoint",
    "load_adapter_checkpoint",
    "merge_adaptation",
    "read_adapter_checkpoint",
    "save_adapter_checkpoint",
    "select_blocks",
    "trainable_state_dict",
]
