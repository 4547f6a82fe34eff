"""Sam.decode over several images and prompts in one call equals one image per call; gradients flow."""
from __future__ import annotations

import pytest
import torch

from samtune import build_sam

from .reference import build_reference, randomize_

B, N = 3, 5  # images, prompts per image
TOL = 1e-5


@pytest.fixture(scope="module")
def models():
    """samtune's sam_tiny and the official model with the same (randomised) weights, eval mode."""
    ref = randomize_(build_reference("sam_tiny"), seed=3)
    ours = build_sam("sam_tiny")
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval(), ref.eval()


def _embeddings(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    c = model.prompt_encoder.embed_dim
    h, w = model.prompt_encoder.image_embedding_size
    return torch.randn(B, c, h, w, generator=g)


def _prompt_sets(model) -> dict[str, dict[str, torch.Tensor]]:
    """Per-image prompts ``[B, N, ...]``: points with mixed labels, boxes as labels 2/3, boxes=, mask inputs."""
    g = torch.Generator().manual_seed(5)
    size = model.image_size
    low = model.low_res_size
    coords = torch.rand(B, N, 4, 2, generator=g) * size
    # Positive, negative and padding (-1), different in every prompt.
    labels = torch.tensor([[1, 0, 0, 1], [1, 1, 0, -1], [0, 1, 1, 0], [0, 1, -1, -1], [1, -1, -1, -1]])
    labels = torch.stack([labels.roll(i, dims=0) for i in range(B)])
    # With box corners as points (labels 2 / 3, the ONNX / SAM 2 convention).
    corner_labels = torch.tensor([[2, 3, 1, 0], [1, 2, 3, 0], [2, 3, -1, -1], [0, 2, 3, 1], [1, 1, 2, 3]])
    corner_labels = torch.stack([corner_labels.roll(i, dims=0) for i in range(B)])
    xy0 = torch.rand(B, N, 2, generator=g) * size * 0.5
    boxes = torch.cat([xy0, xy0 + 8 + torch.rand(B, N, 2, generator=g) * size * 0.5], dim=-1)
    masks = torch.randn(B, N, 1, low, low, generator=g) * 4
    return {
        "points": dict(point_coords=coords, point_labels=labels),
        "points_corners": dict(point_coords=coords, point_labels=corner_labels),
        "points_boxes": dict(point_coords=coords[:, :, :2], point_labels=labels[:, :, :2].abs(), boxes=boxes),
        "boxes": dict(boxes=boxes),
        "points_masks": dict(point_coords=coords[:, :, :3], point_labels=labels[:, :, :3], mask_inputs=masks),
        "boxes_masks": dict(boxes=boxes, mask_inputs=masks),
    }


def _image(prompts: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i] for k, v in prompts.items()}


def _flat(prompts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.flatten(0, 1) for k, v in prompts.items()}


def _official(ref, emb_i: torch.Tensor, p: dict[str, torch.Tensor], multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One image, N prompts through the official prompt encoder and decoder."""
    points = (p["point_coords"], p["point_labels"]) if "point_coords" in p else None
    with torch.no_grad():
        sparse, dense = ref.prompt_encoder(points=points, boxes=p.get("boxes"), masks=p.get("mask_inputs"))
        return ref.mask_decoder(
            image_embeddings=emb_i,
            image_pe=ref.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    assert a.shape == b.shape, (what, a.shape, b.shape)
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"{what}: max abs diff {diff}"


PROMPT_SETS = ["points", "points_corners", "points_boxes", "boxes"]
MASK_SETS = ["points_masks", "boxes_masks"]


def _check_batched_equals_loop(models, name: str) -> None:
    ours, ref = models
    emb = _embeddings(ours)
    prompts = _prompt_sets(ours)[name]
    with torch.no_grad():
        for multimask in (True, False):
            # Official style: one image per call (ours and the official implementation).
            loop = [ours.decode(emb[i : i + 1], **_image(prompts, i), multimask_output=multimask) for i in range(B)]
            loop_logits = torch.stack([x[0] for x in loop])
            loop_iou = torch.stack([x[1] for x in loop])
            # segment_anything 1.0 ignores point labels 2 / 3 (only its ONNX model embeds them as box corners),
            # so the official implementation is the reference only for labels -1 / 0 / 1.
            official_labels = "point_labels" not in prompts or bool((prompts["point_labels"] <= 1).all())
            for i in range(B if official_labels else 0):
                off_logits, off_iou = _official(ref, emb[i : i + 1], _image(prompts, i), multimask)
                _close(loop_logits[i], off_logits, 1e-4, f"{name}: ours vs official, image {i}")
                _close(loop_iou[i], off_iou, 1e-4, f"{name}: ours vs official IoU, image {i}")
            c_out = 3 if multimask else 1
            assert loop_logits.shape == (B, N, c_out, ours.low_res_size, ours.low_res_size)

            # [B, N, ...] form.
            logits, iou = ours.decode(emb, **prompts, multimask_output=multimask)
            _close(logits, loop_logits, TOL, f"{name}: [B, N] logits")
            _close(iou, loop_iou, TOL, f"{name}: [B, N] IoU")

            # Flat form with image_index.
            index = torch.arange(B).repeat_interleave(N)
            logits, iou = ours.decode(emb, index, **_flat(prompts), multimask_output=multimask)
            _close(logits, loop_logits.flatten(0, 1), TOL, f"{name}: flat logits")
            _close(iou, loop_iou.flatten(0, 1), TOL, f"{name}: flat IoU")

            # Flat, prompts of all images shuffled (image_index out of order).
            perm = torch.randperm(B * N, generator=torch.Generator().manual_seed(2))
            shuffled = {k: v[perm] for k, v in _flat(prompts).items()}
            logits, iou = ours.decode(emb, index[perm], **shuffled, multimask_output=multimask)
            _close(logits, loop_logits.flatten(0, 1)[perm], TOL, f"{name}: shuffled logits")
            _close(iou, loop_iou.flatten(0, 1)[perm], TOL, f"{name}: shuffled IoU")

        # All four tokens = single-mask output followed by the multimask outputs.
        all_logits, all_iou = ours.decode(emb, **prompts, return_all_tokens=True)
        single = ours.decode(emb, **prompts, multimask_output=False)
        multi = ours.decode(emb, **prompts, multimask_output=True)
        assert all_logits.shape[2] == 4
        _close(all_logits, torch.cat([single[0], multi[0]], dim=2), TOL, f"{name}: all tokens logits")
        _close(all_iou, torch.cat([single[1], multi[1]], dim=2), TOL, f"{name}: all tokens IoU")


@pytest.mark.parametrize("name", PROMPT_SETS)
def test_batched_points_and_boxes_equal_per_image_loop(models, name):
    _check_batched_equals_loop(models, name)


@pytest.mark.parametrize("name", MASK_SETS)
def test_batched_mask_inputs_equal_per_image_loop(models, name):
    _check_batched_equals_loop(models, name)


@pytest.fixture(scope="module")
def models_vit_b():
    """ViT-B's full-size decoder (256-d, 8 heads, 64x64 image tokens), official and samtune, same weights.

    Its attention between a few prompt tokens and 4096 image tokens takes the factorised paths of
    ``Attention._few_keys`` / ``_few_queries``, which the tiny decoder (32-d internal width) never takes.
    """
    ref = randomize_(build_reference("sam_vit_b"), seed=3)
    ours = build_sam("sam_vit_b")
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("name", ["points", "points_boxes", "points_masks"])
def test_full_size_decoder_batched_equals_official(models_vit_b, name, monkeypatch):
    from samtune.modeling.mask_decoder import Attention

    calls = {"_few_keys": 0, "_few_queries": 0}
    for path in calls:
        def counted(self, *args, _path=path, _method=getattr(Attention, path)):
            calls[_path] += 1
            return _method(self, *args)

        monkeypatch.setattr(Attention, path, counted)
    _check_batched_equals_loop(models_vit_b, name)
    assert calls["_few_keys"] > 0 and calls["_few_queries"] > 0, calls


@pytest.mark.parametrize("few", ["keys", "queries"])
@pytest.mark.parametrize("shared", [False, True])
def test_factorised_attention_equals_official(few, shared):
    """Few tokens against many image tokens: values and gradients equal the official Attention's."""
    from segment_anything.modeling.transformer import Attention as OfficialAttention

    from samtune.modeling.mask_decoder import Attention

    torch.manual_seed(0)
    ours, ref = Attention(256, 8, downsample_rate=2), OfficialAttention(256, 8, downsample_rate=2)
    ref.load_state_dict(ours.state_dict())
    m, many, tokens = 3, 300, 7
    image = torch.randn(1 if shared else m, many, 256)
    token = torch.randn(m, tokens, 256)
    if few == "keys":  # image -> tokens
        args = (image, token, token)
    else:  # tokens -> image; a shared image side takes the plain path (projected once per image)
        args = (token, image, image)
    ours_in = [a.clone().requires_grad_() for a in args]
    ref_in = [a.clone().requires_grad_() for a in args]
    out = ours(*ours_in, per_image="q" if few == "keys" else "kv")
    expected = ref(*[a.expand(m, -1, -1) for a in ref_in])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for a, b in zip(ours_in, ref_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_box_as_labels_equals_boxes_argument(models):
    """A box given as two points labelled 2 / 3 equals the same box passed as ``boxes=``."""
    ours, _ = models
    emb = _embeddings(ours)
    boxes = _prompt_sets(ours)["boxes"]["boxes"]
    corners = boxes.reshape(B, N, 2, 2)
    labels = torch.tensor([2, 3]).expand(B, N, 2)
    with torch.no_grad():
        a = ours.decode(emb, boxes=boxes)
        b = ours.decode(emb, point_coords=corners, point_labels=labels, pad_points=False)
    _close(a[0], b[0], TOL, "logits")
    _close(a[1], b[1], TOL, "IoU")


def test_prompts_of_one_image_only(models):
    """Prompts for only some of the images (image 2 and 0, none on 1) decode against the right embeddings."""
    ours, _ = models
    emb = _embeddings(ours)
    p = _flat(_prompt_sets(ours)["points"])
    index = torch.tensor([2, 2, 0])
    sel = {k: v[:3] for k, v in p.items()}
    with torch.no_grad():
        logits, _ = ours.decode(emb, index, **sel)
        for j, i in enumerate(index.tolist()):
            single, _ = ours.decode(emb[i : i + 1], **{k: v[j : j + 1] for k, v in sel.items()})
            _close(logits[j : j + 1], single, TOL, f"prompt {j}")
        # The image actually matters: the same prompt on another image gives another mask.
        other, _ = ours.decode(emb[1:2], **{k: v[:1] for k, v in sel.items()})
        assert (other - logits[:1]).abs().max() > 1e-2


def test_mismatched_batch_is_a_clear_error(models):
    ours, _ = models
    emb = _embeddings(ours)
    boxes = _prompt_sets(ours)["boxes"]["boxes"]
    with pytest.raises(ValueError, match="image_index"):
        ours.decode(emb, boxes=boxes.flatten(0, 1))  # 15 prompts, 3 images, no index
    with pytest.raises(ValueError, match="prompts for 2 images but 3"):
        ours.decode(emb, boxes=boxes[:2])


def _grads_missing(module: torch.nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


def test_encode_and_decode_keep_gradients():
    """Unlike the official forward (under no_grad), every parameter gets a gradient through encode + decode."""
    model = build_sam("sam_tiny").train()
    randomize_(model, seed=4)
    g = torch.Generator().manual_seed(0)
    size = model.image_size
    images = torch.randn(2, 3, size, size, generator=g)
    emb = model.encode_image(images)
    assert emb.requires_grad
    index = torch.tensor([1, 0, 1])
    coords = torch.rand(3, 2, 2, generator=g) * size
    labels = torch.tensor([[1, 0], [1, 1], [0, 1]])
    boxes = torch.tensor([[10.0, 20.0, 100.0, 120.0], [0.0, 0.0, 200.0, 180.0], [50.0, 60.0, 70.0, 90.0]])
    low = model.low_res_size
    masks = torch.randn(3, 1, low, low, generator=g)
    # Points without box (pads with not-a-point), then box + mask: together they use every prompt parameter.
    a_logits, a_iou = model.decode(emb, index, point_coords=coords, point_labels=labels, return_all_tokens=True)
    b_logits, b_iou = model.decode(emb, index, point_coords=coords, point_labels=labels, boxes=boxes, mask_inputs=masks)
    assert a_logits.requires_grad and b_iou.requires_grad
    loss = a_logits.sigmoid().mean() + a_iou.square().mean() + b_logits.sigmoid().mean() + b_iou.square().mean()
    loss.backward()
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        missing = _grads_missing(getattr(model, part))
        assert not missing, f"{part}: no gradient for {missing}"


def test_official_style_forward_keeps_gradients():
    """``Sam.forward`` (the official batched_input interface) is differentiable too."""
    model = build_sam("sam_tiny").train()
    size = model.image_size
    batched = [
        {"image": torch.rand(3, size, size - 40) * 255, "original_size": (300, 253),
         "boxes": torch.tensor([[10.0, 10.0, 90.0, 120.0]])},
        {"image": torch.rand(3, size - 16, size) * 255, "original_size": (240, 256),
         "point_coords": torch.tensor([[[30.0, 40.0]]]), "point_labels": torch.tensor([[1]])},
    ]
    out = model(batched, multimask_output=True)
    assert out[0]["masks"].shape == (1, 3, 300, 253) and out[1]["masks"].shape == (1, 3, 240, 256)
    loss = sum(o["low_res_logits"].mean() + o["iou_predictions"].mean() for o in out)
    loss.backward()
    assert not _grads_missing(model.image_encoder)
    assert model.mask_decoder.iou_token.weight.grad is not None


@pytest.mark.parametrize("kind", ["points", "boxes_masks"])
def test_cpu_prompt_chunks_equal_one_pass(models, monkeypatch, kind) -> None:
    """Decoding the prompts a few at a time (CPU, see MaskDecoder.predict_masks) changes no value or gradient,
    with the shared no-mask embedding and with per-prompt mask inputs, prompts of several images interleaved."""
    from samtune.modeling import mask_decoder

    ours, _ = models
    prompts = _flat(_prompt_sets(ours)[kind])
    emb = _embeddings(ours)
    index = torch.arange(B).repeat_interleave(N)[torch.randperm(B * N, generator=torch.Generator().manual_seed(0))]
    calls = []
    original = mask_decoder.MaskDecoder._predict_masks
    monkeypatch.setattr(mask_decoder.MaskDecoder, "_predict_masks",
                        lambda self, *a: calls.append(a[2].shape[0]) or original(self, *a))

    def run(chunk_bytes: int):
        monkeypatch.setattr(mask_decoder, "_CPU_CHUNK_BYTES", chunk_bytes)
        e = emb.clone().requires_grad_(True)
        ours.zero_grad(set_to_none=True)
        logits, iou = ours.decode(e, index, multimask_output=True, **prompts)
        (logits.square().mean() + iou.sum()).backward()
        grads = {n: p.grad.clone() for n, p in ours.mask_decoder.named_parameters() if p.grad is not None}
        return logits.detach(), iou.detach(), e.grad, grads

    c, h, w = emb.shape[1:]
    one = run(1 << 40)
    assert calls == [B * N]
    calls.clear()
    chunked = run(4 * h * w * c * 4)  # 4 prompts per chunk: 15 = 4 + 4 + 4 + 3
    assert calls == [4, 4, 4, 3]
    for a, b in zip(one[:3], chunked[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert one[3].keys() == chunked[3].keys() and one[3]
    for name in one[3]:
        torch.testing.assert_close(one[3][name], chunked[3][name], rtol=1e-4, atol=1e-5, msg=name)


def test_prompt_positional_encoding_stays_fp32_under_autocast(models) -> None:
    """Point, box and dense positional encodings are computed in fp32 under bf16 autocast (in bf16 a point moved by
    pixels), and a dense encoding cached under autocast is the fp32 one, so later fp32 decodes do not reuse a bf16
    table (an fp32 Predictor used to give other masks after a bf16 one had run on the same model)."""
    ours, _ = models
    encoder = ours.prompt_encoder
    encoder.__dict__.pop("_dense_pe_cache", None)
    coords = torch.tensor([[[10.3, 200.7], [250.1, 3.9]]])
    labels = torch.tensor([[1, 0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense_autocast = encoder.get_dense_pe()
        points_autocast = encoder.embed_points(coords, labels)
    assert dense_autocast.dtype == torch.float32 and points_autocast.dtype == torch.float32
    dense = encoder.get_dense_pe()
    encoder.__dict__.pop("_dense_pe_cache", None)
    torch.testing.assert_close(dense, encoder.get_dense_pe(), rtol=0, atol=0)
    torch.testing.assert_close(points_autocast, encoder.embed_points(coords, labels), rtol=0, atol=1e-6)


def test_zero_prompts_decode_to_empty_outputs() -> None:
    """No prompts (an image without detections, a batch whose masks were all filtered) gives empty outputs of the
    documented shapes instead of a reshape error inside the decoder."""
    model = build_sam("sam_tiny").eval()
    size = model.image_encoder.img_size
    low = 4 * (size // 16)
    with torch.no_grad():
        embeddings = model.encode_image(torch.rand(2, 3, size, size))
        for multimask, channels in ((True, 3), (False, 1)):
            logits, iou = model.decode(embeddings[:1], boxes=torch.zeros(0, 4), multimask_output=multimask)
            assert logits.shape == (0, channels, low, low) and iou.shape == (0, channels)
            logits, iou = model.decode(embeddings[:1], point_coords=torch.zeros(0, 1, 2),
                                       point_labels=torch.zeros(0, 1), multimask_output=multimask)
            assert logits.shape == (0, channels, low, low) and iou.shape == (0, channels)
        logits, iou = model.decode(embeddings, boxes=torch.zeros(2, 0, 4))  # [B, N] prompts with N = 0
        assert logits.shape == (2, 0, 3, low, low) and iou.shape == (2, 0, 3)
        logits, iou = model.decode(embeddings, image_index=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4),
                                   return_all_tokens=True)
        assert logits.shape == (0, 4, low, low) and iou.shape == (0, 4)
