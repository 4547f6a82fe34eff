"""ONNX export: the prompt encoder + mask decoder with the official SAM ONNX interface, and the image encoder.

Decoder (:func:`export_onnx_decoder`), the interface browser and annotation tools load unchanged (the one
written by ``segment_anything``'s ``scripts/export_onnx_model.py``):

=================== ========================= =====================================================================
input               shape (float32)           meaning
=================== ========================= =====================================================================
``image_embeddings`` ``[1, C, g, g]``          encoder output (C = 256, g = 64 for SAM / MobileSAM / LiteMedSAM)
``point_coords``     ``[1, N, 2]`` (N dynamic) (x, y) in model-input pixels (apply ``ResizeLongestSide`` first)
``point_labels``     ``[1, N]``                1 positive, 0 negative, 2 / 3 box corners, -1 padding point
``mask_input``       ``[1, 1, 4g, 4g]``        previous low-res logits (anything when ``has_mask_input`` is 0)
``has_mask_input``   ``[1]``                   1.0 to use ``mask_input``, 0.0 otherwise
``orig_im_size``     ``[2]``                   (H, W) of the original image
=================== ========================= =====================================================================

A box is two points labelled 2 and 3 after the clicks; without a box the caller appends a (0, 0) point
labelled -1 (as the official prompt encoder does). Labels are compared with -1..3 as in the official graph: a
point with any other label (4, -2, 0.5...) gets only its positional encoding. Outputs: ``masks`` ``[1, K, H, W]`` logits upscaled to
``orig_im_size`` (threshold at 0), ``iou_predictions`` ``[1, K]``, ``low_res_masks`` ``[1, K, 4g, 4g]``
logits; ``K`` is 4 (token 0, the single-mask output, then the 3 multimask outputs) or 1 with
``return_single_mask``.

Options (same meaning as the official export script):

* ``return_single_mask``: K = 1. With more than 2 points (padding and box corners count) token 0, else the
  multimask output with the highest score (cheaper upscaling for large images).
* ``use_stability_score``: the scores are the stability score of the low-res logits (offset 1.0) instead of
  the predicted IoU.
* ``return_extra_metrics``: five outputs in the official order ``masks, iou_predictions, stability_scores,
  areas, low_res_masks`` (stability of the upscaled masks and their pixel count, int64). The official script
  names only the first three of its five outputs (so there ``low_res_masks`` is really the stability
  scores); samtune names all five.
* ``gelu_approximate``: tanh GELU for runtimes with a slow or missing ``Erf``.
* ``return_logits=False`` (samtune only): ``masks`` is boolean (logits > 0) instead of logits.

Encoder (:func:`export_onnx_encoder`): input ``x`` ``[B, 3, S, S]`` preprocessed (normalised, padded) images,
output ``image_embeddings`` ``[B, C, g, g]`` (the official script's names; B dynamic). With
``include_preprocessing=True`` the input is instead ``input_image`` ``[1, 3, h, w]``: the resized image
(longest side S, h and w dynamic, RGB, 0-255 float, not normalised, not padded); the model normalises it with
the checkpoint's convention (SAM mean/std, or LiteMedSAM's min-max) and pads it to S x S. Resizing stays
outside the graph: ONNX ``Resize`` cannot reproduce PIL's antialiased bilinear or OpenCV's area filter, and the
masks depend on the filter (see :mod:`samtune.modeling.preprocessing`).

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``, as the official export. It needs no
extra package and traces the data-dependent crop of the padding (a ``Slice`` whose end is computed from
``orig_im_size``); the ``torch.export``-based exporter needs ``onnxscript`` (not a samtune dependency) and
cannot express that crop without rewriting it. Opset 17 by default; both graphs need opset >= 14
(``scaled_dot_product_attention``, ``unflatten``; :data:`MIN_OPSET`).
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from samtune.files import atomic_write
from samtune.modeling.preprocessing import normalize_image
from samtune.modeling.sam import Sam

__all__ = [
    "SamOnnxDecoder",
    "SamOnnxEncoder",
    "export_onnx_decoder",
    "export_onnx_encoder",
    "decoder_dummy_inputs",
    "DECODER_INPUT_NAMES",
    "decoder_output_names",
    "OnnxExportError",
    "MIN_OPSET",
    "check_opset",
    "external_data_name",
]

DECODER_INPUT_NAMES = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention (attention of the encoder and decoder) and unflatten need 14


def _max_opset() -> int | None:
    """The newest opset torch's TorchScript-based exporter writes (None if this torch does not say)."""
    try:
        from torch.onnx import _constants
    except ImportError:
        return None
    value = getattr(_constants, "ONNX_MAX_OPSET", None)
    return value if isinstance(value, int) else None


def check_opset(opset: object) -> int:
    """``opset`` if the exporter can write both SAM graphs with it, else a ``ValueError`` naming ``--opset``.

    The graphs use ``scaled_dot_product_attention`` and ``unflatten``, which torch's exporter supports from
    opset 14 (:data:`MIN_OPSET`).
    """
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ValueError(f"opset (--opset) must be an integer >= {MIN_OPSET}, got {opset!r}")
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset (--opset) {opset} is too old: the SAM ONNX graphs need opset >= {MIN_OPSET} "
            f"(scaled_dot_product_attention, unflatten); pass --opset {MIN_OPSET} or later (default {DEFAULT_OPSET})"
        )
    newest = _max_opset()
    if newest is not None and opset > newest:
        raise ValueError(f"opset (--opset) {opset} is newer than this torch's ONNX exporter writes (at most "
                         f"{newest}); pass --opset {MIN_OPSET} to {newest} (default {DEFAULT_OPSET})")
    return opset


def decoder_output_names(return_extra_metrics: bool = False) -> tuple[str, ...]:
    """Names of the decoder outputs, in order (the official order; see the module docstring)."""
    if return_extra_metrics:
        return ("masks", "iou_predictions", "stability_scores", "areas", "low_res_masks")
    return ("masks", "iou_predictions", "low_res_masks")


class OnnxExportError(RuntimeError):
    """The exported graph is missing a dependency or does not reproduce the PyTorch model."""


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """Stability of masks under a threshold shift: ``|logits > t + o| / |logits > t - o|``.

    Args:
        logits: ``[..., H, W]``.
        threshold: mask threshold t (0 for SAM).
        offset: o.

    Returns:
        ``[...]`` float32 (NaN where no pixel is above ``t - o``).
    """
    inner = (logits > threshold + offset).flatten(-2).sum(-1, dtype=torch.float32)
    outer = (logits > threshold - offset).flatten(-2).sum(-1, dtype=torch.float32)
    return inner / outer


class SamOnnxDecoder(nn.Module):
    """Prompt encoder + mask decoder + mask upscaling with the official ONNX decoder interface (see module doc).

    The prompt encoder and mask decoder are copied (float32, eval), so the options never change ``model``.

    Args:
        model: the SAM model.
        return_single_mask: output only the best mask (K = 1).
        use_stability_score: scores are the low-res stability score instead of the predicted IoU.
        return_extra_metrics: also output stability scores and areas of the upscaled masks.
        return_logits: ``masks`` as logits (True, official) or booleans.
        gelu_approximate: use tanh-approximated GELU.
        stability_score_offset: offset of the stability score (1.0, as the official).
    """

    def __init__(
        self,
        model: Sam,
        return_single_mask: bool = False,
        use_stability_score: bool = False,
        return_extra_metrics: bool = False,
        return_logits: bool = True,
        gelu_approximate: bool = False,
        stability_score_offset: float = 1.0,
    ) -> None:
        super().__init__()
        self.prompt_encoder = copy.deepcopy(model.prompt_encoder).float().eval()
        self.mask_decoder = copy.deepcopy(model.mask_decoder).float().eval()
        if gelu_approximate:
            for module in self.modules():
                if isinstance(module, nn.GELU):
                    module.approximate = "tanh"
        self.image_size = int(model.image_size)
        self.mask_threshold = float(model.mask_threshold)
        self.return_single_mask = return_single_mask
        self.use_stability_score = use_stability_score
        self.return_extra_metrics = return_extra_metrics
        self.return_logits = return_logits
        self.stability_score_offset = stability_score_offset
        # Eval as a whole: the exporter restores the wrapper's mode afterwards, recursively.
        self.eval()

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the outputs in order."""
        return decoder_output_names(self.return_extra_metrics)

    def _dense(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """``[1, C, g, g]``: the embedded mask prompt where ``has_mask_input`` is 1, the "no mask" embedding where 0."""
        has = has_mask_input.reshape(-1, 1, 1, 1).to(mask_input.dtype)
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has * self.prompt_encoder.embed_masks(mask_input) + (1 - has) * no_mask

    def _select_single(
        self, masks: torch.Tensor, scores: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token 0 for more than 2 points (a box, or several clicks), else the best-scoring multimask output.

        Args:
            masks: ``[1, 4, h, w]``.
            scores: ``[1, 4]``.
            point_labels: ``[1, N]`` (only its length is used; computed in-graph so N stays dynamic).

        Returns:
            ``[1, 1, h, w]`` and ``[1, 1]``.
        """
        num_points = torch.ones_like(point_labels).sum(dim=1, keepdim=True)  # [1, 1]
        best_multi = scores[:, 1:].argmax(dim=1, keepdim=True) + 1
        index = torch.where(num_points > 2.5, torch.zeros_like(best_multi), best_multi)  # [1, 1]
        h, w = masks.shape[-2:]
        return masks.gather(1, index[:, :, None, None].expand(-1, -1, h, w)), scores.gather(1, index)

    def _upscale(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """Low-res logits -> model-input frame -> crop the padding -> original size (bilinear, as the official).

        Args:
            masks: ``[1, K, 4g, 4g]``.
            orig_im_size: ``[2]`` (H, W).

        Returns:
            ``[1, K, H, W]``.
        """
        size = self.image_size
        masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        hw = orig_im_size.to(torch.float32)
        resized = torch.floor(hw * (size / hw.max()) + 0.5).to(torch.int64)  # ResizeLongestSide's rounding
        masks = masks[..., : resized[0], : resized[1]]
        out = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(out[0], out[1]), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """Decode one prompt set (see the module docstring for shapes and outputs)."""
        sparse = self.prompt_encoder.embed_points(point_coords, point_labels)
        dense = self._dense(mask_input, has_mask_input)
        low_res, scores = self.mask_decoder.predict_masks(
            image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense
        )
        if self.use_stability_score:
            scores = stability_score(low_res, self.mask_threshold, self.stability_score_offset)
        if self.return_single_mask:
            low_res, scores = self._select_single(low_res, scores, point_labels)
        masks = self._upscale(low_res, orig_im_size)
        if self.return_extra_metrics:
            binary = masks > self.mask_threshold
            stability = stability_score(masks, self.mask_threshold, self.stability_score_offset)
            areas = binary.flatten(-2).sum(-1)
            return (masks if self.return_logits else binary), scores, stability, areas, low_res
        return (masks if self.return_logits else masks > self.mask_threshold), scores, low_res


class SamOnnxEncoder(nn.Module):
    """The image encoder for ONNX, optionally with the model's normalisation and padding folded in.

    Args:
        model: the SAM model (its image encoder is copied, float32, eval).
        include_preprocessing: input is the resized, unnormalised, unpadded ``[1, 3, h, w]`` 0-255 image.
    """

    def __init__(self, model: Sam, include_preprocessing: bool = False) -> None:
        super().__init__()
        # No gradients: traced with autograd on, the forward keeps every activation for a backward that never
        # comes (ViT-H at 1024 then ran out of 24 GB). The ViT's reusable bias workspace is off while tracing.
        self.image_encoder = copy.deepcopy(model.image_encoder).float().eval().requires_grad_(False)
        self.include_preprocessing = include_preprocessing
        self.normalization = model.normalization
        self.image_size = int(model.image_size)
        # Eval as a whole: the exporter restores the wrapper's mode afterwards, recursively (a wrapper left in
        # training mode would put BatchNorm layers into training mode after the export).
        self.eval()

    @property
    def input_name(self) -> str:
        return "input_image" if self.include_preprocessing else "x"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` preprocessed (or ``[1, 3, h, w]`` resized 0-255) images -> ``[B, C, g, g]``."""
        if self.include_preprocessing:
            x = normalize_image(x, self.normalization)
            h, w = x.shape[-2:]
            x = F.pad(x, (0, self.image_size - w, 0, self.image_size - h))
        return self.image_encoder(x)


def decoder_dummy_inputs(model: Sam, num_points: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Example decoder inputs (float32, the official export's dtypes) for ``model``.

    Returns:
        Inputs by name: ``image_embeddings [1, C, g, g]``, ``point_coords [1, N, 2]``, ``point_labels [1, N]``,
        ``mask_input [1, 1, 4g, 4g]``, ``has_mask_input [1]``, ``orig_im_size [2]``.
    """
    gen = torch.Generator().manual_seed(seed)
    pe = model.prompt_encoder
    grid = tuple(pe.image_embedding_size)
    size = model.image_size
    return {
        "image_embeddings": torch.randn(1, pe.embed_dim, *grid, generator=gen),
        "point_coords": torch.randint(0, size, (1, num_points, 2), generator=gen).float(),
        "point_labels": torch.randint(-1, 4, (1, num_points), generator=gen).float(),
        "mask_input": torch.randn(1, 1, *pe.mask_input_size, generator=gen),
        "has_mask_input": torch.tensor([1.0]),
        "orig_im_size": torch.tensor([size * 1.5, size * 2.2]).floor(),
    }


def _torch_export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                  output_names: list[str], dynamic_axes: dict[str, dict[int, str]], opset: int) -> Path:
    """Run the TorchScript-based exporter in a temporary folder beside ``path`` and move the result into place.

    A graph over protobuf's 2 GB (ViT-L / ViT-H encoders) cannot hold its weights: the exporter then writes one
    file per tensor beside the model, named after the tensor (``image_encoder.blocks.0.attn.qkv.weight``...),
    so two such exports into one folder would overwrite each other's weights. Those are gathered into a single
    ``<name>.data`` next to ``<name>`` (ONNX's external-data format, which onnxruntime reads from the model's
    folder). Each file is replaced atomically, the weights first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as work:
        raw = Path(work) / path.name
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
            warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
            torch.onnx.export(
                module,
                args,
                str(raw),
                dynamo=False,
                export_params=True,
                opset_version=opset,
                do_constant_folding=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
            )
        data = path.with_name(external_data_name(path))
        if any(p != raw for p in Path(work).iterdir()):
            single = _gather_external_data(raw, Path(work) / "gathered", data.name)
            atomic_write(data, lambda tmp: os.replace(single.with_name(data.name), tmp))
            atomic_write(path, lambda tmp: os.replace(single, tmp))
        else:
            atomic_write(path, lambda tmp: os.replace(raw, tmp))
            if data.is_file():  # the weights of an earlier, larger export to this name: nothing refers to them now
                data.unlink()
    return path


def external_data_name(path: str | Path) -> str:
    """The file next to an exported ``.onnx`` over 2 GB that holds its weights: ``<name>.data``."""
    return f"{Path(path).name}.data"


def _gather_external_data(model_file: Path, out_dir: Path, data_name: str) -> Path:
    """Rewrite an ONNX model whose weights lie in many files beside it with all of them in ``out_dir/data_name``.

    Returns:
        The rewritten model file (in ``out_dir``, with ``model_file``'s name).
    """
    try:
        import onnx
    except ImportError as err:
        raise OnnxExportError(
            f"the ONNX graph for {model_file.name} is over 2 GB and its weights are written as external data, "
            "which needs the onnx package to gather them into one file (pip install onnx)"
        ) from err
    proto = onnx.load(str(model_file), load_external_data=True)
    out_dir.mkdir()
    out = out_dir / model_file.name
    onnx.save_model(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                    size_threshold=1024)
    return out


def _check_with_onnxruntime(path: Path, module: nn.Module, inputs: dict[str, torch.Tensor], atol: float) -> float:
    """Run the exported graph in onnxruntime and compare with ``module``.

    Float outputs must agree within ``atol``; boolean masks in all but 0.1% of their pixels and pixel counts
    within 2 + 0.1% (values at the threshold may flip with float rounding).

    Returns:
        The largest difference of the float outputs.
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise OnnxExportError("verifying an ONNX export needs onnxruntime (pip install onnxruntime)") from err
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    expected = module(*inputs.values())
    expected = expected if isinstance(expected, tuple) else (expected,)
    worst = 0.0
    for name, a, b in zip([o.name for o in session.get_outputs()], got, expected):
        a_t = torch.from_numpy(a)
        if a_t.shape != b.shape:
            raise OnnxExportError(f"ONNX export {path}: output {name} has shape {tuple(a_t.shape)}, PyTorch {tuple(b.shape)}")
        if b.dtype.is_floating_point:
            finite = torch.isfinite(b)
            diff = (a_t.float() - b.float())[finite].abs().max().item() if finite.any() else 0.0
            worst = max(worst, diff)
            if diff > atol:
                raise OnnxExportError(f"ONNX export {path}: output {name} differs from PyTorch by {diff:.3g} (> {atol})")
        elif b.dtype == torch.bool:  # thresholded logits: float rounding may flip pixels right at the threshold
            flipped = (a_t != b).float().mean().item()
            if flipped > 1e-3:
                raise OnnxExportError(f"ONNX export {path}: output {name} differs from PyTorch in {flipped:.2%} of its values")
        else:  # pixel counts of thresholded masks: the same few threshold flips
            excess = ((a_t - b).abs().double() - (2 + 1e-3 * b.abs().double())).max().item()
            if excess > 0:
                raise OnnxExportError(f"ONNX export {path}: output {name} differs from PyTorch beyond a few pixels")
    return worst


def export_onnx_decoder(
    model: Sam,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    return_single_mask: bool = False,
    use_stability_score: bool = False,
    return_extra_metrics: bool = False,
    return_logits: bool = True,
    gelu_approximate: bool = False,
    verify: bool = False,
    atol: float = 1e-3,
) -> Path:
    """Write the prompt encoder + mask decoder as ONNX with the official interface (see the module docstring).

    Args:
        model: the SAM model (any device/dtype; it is not modified).
        path: destination ``.onnx`` (written atomically).
        opset: ONNX opset (>= 14, :data:`MIN_OPSET`; 17 as the official export).
        return_single_mask / use_stability_score / return_extra_metrics / return_logits / gelu_approximate:
            see :class:`SamOnnxDecoder`.
        verify: run the file in onnxruntime on example inputs and compare with PyTorch (raises
            :class:`OnnxExportError` beyond ``atol``).
        atol: tolerance of ``verify``.

    Returns:
        The path written.
    """
    check_opset(opset)
    wrapper = SamOnnxDecoder(
        model,
        return_single_mask=return_single_mask,
        use_stability_score=use_stability_score,
        return_extra_metrics=return_extra_metrics,
        return_logits=return_logits,
        gelu_approximate=gelu_approximate,
    ).cpu()
    inputs = decoder_dummy_inputs(model)
    wrapper(*inputs.values())  # fail early, with a PyTorch traceback, on a model that cannot run
    dynamic = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
    path = _torch_export(wrapper, tuple(inputs.values()), Path(path), list(DECODER_INPUT_NAMES),
                         list(wrapper.output_names), dynamic, opset)
    if verify:
        _check_with_onnxruntime(path, wrapper, inputs, atol)
    return path


def export_onnx_encoder(
    model: Sam,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    include_preprocessing: bool = False,
    verify: bool = False,
    atol: float = 1e-3,
) -> Path:
    """Write the image encoder as ONNX (see the module docstring for the two input conventions).

    Args:
        model: the SAM model (not modified).
        path: destination ``.onnx`` (written atomically).
        opset: ONNX opset (>= 14, :data:`MIN_OPSET`).
        include_preprocessing: fold normalisation and padding into the graph (input ``input_image``
            ``[1, 3, h, w]``, resized 0-255 RGB); otherwise input ``x`` ``[B, 3, S, S]`` preprocessed.
        verify: compare onnxruntime with PyTorch on an example input (raises :class:`OnnxExportError`).
        atol: tolerance of ``verify``.

    Returns:
        The path written.
    """
    check_opset(opset)
    wrapper = SamOnnxEncoder(model, include_preprocessing=include_preprocessing).cpu()
    size = wrapper.image_size
    gen = torch.Generator().manual_seed(0)
    if include_preprocessing:
        example = torch.rand(1, 3, size, (size * 3) // 4, generator=gen) * 255
        dynamic = {"input_image": {2: "height", 3: "width"}}
    else:
        example = torch.randn(1, 3, size, size, generator=gen)
        dynamic = {"x": {0: "batch"}, "image_embeddings": {0: "batch"}}
    with torch.no_grad():
        wrapper(example)  # fail early, with a PyTorch traceback, on a model that cannot run
        path = _torch_export(wrapper, (example,), Path(path), [wrapper.input_name], ["image_embeddings"], dynamic, opset)
    if verify:
        with torch.no_grad():
            _check_with_onnxruntime(path, wrapper, {wrapper.input_name: example}, atol)
    return path
