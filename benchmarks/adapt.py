"""Adaptation strategies side by side: seconds per training step and peak memory.

Rows (the same batch for all; one training step = ``PromptableSegmentationTask.training_step`` with the paper's
simulated prompt rounds + backward + AdamW step):

* ``full``: every part trained (image encoder forward AND backward);
* ``lora`` / ``adapters``: ``samtune.adapt.apply_adaptation(model, AdaptationConfig(**options))`` (skipped with a
  note when ``samtune.adapt.apply_adaptation`` is not importable);
* ``decoder-only``: image and prompt encoders frozen, the live encoder runs forward (no grad) every step;
* ``cached``: the same decoder-only training, from cached embeddings (:mod:`samtune.adapt.cache`): the encoder
  never runs; the embeddings are read from an on-disk cache each step (timed separately as "load").

Each row runs in its own spawned process (its peak memory is its own: CUDA ``max_memory_allocated`` over the
steps, or on CPU the growth of the process's max RSS during the steps and the total max RSS); the first step is
an untimed warm-up; the median of the others is reported. ``--repeats`` runs the rows again, interleaved.

A second table checks the storage dtypes of the cache: the embeddings of LiteMedSAM (real weights) on the EM asset
(or synthetic images) stored as float16 / bfloat16, against float32: max relative error, agreement of the box-
prompted masks (IoU between the masks decoded from the half and the float32 embeddings), and the mean IoU against
the ground truth.

    python benchmarks/adapt.py                                   # lite_medsam at 256, then sam_vit_b at 1024
    python benchmarks/adapt.py --models lite_medsam --steps 6 --threads 1
    python benchmarks/adapt.py --models sam_vit_b --steps 2 --iterations 3 --masks 8
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = ("full", "lora", "adapters", "decoder-only", "cached")
ASSETS = Path(os.environ.get("SAMTUNE_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
LITE_MEDSAM = ASSETS / "weights" / "lite_medsam" / "lite_medsam.pth"
DEFAULT_ADAPT = {"lora": {"method": "lora"}, "adapters": {"method": "adapter"}}


def _checkpoint(model: str) -> str | None:
    """Real weights where the assets have them (LiteMedSAM), random weights otherwise."""
    return str(LITE_MEDSAM) if model == "lite_medsam" and LITE_MEDSAM.is_file() else None


def _batch(model: str, batch: int, masks: int, seed: int) -> dict[str, Any]:
    """The same synthetic batch for every row: textured images, ``masks`` ellipses per image."""
    import torch

    from samtune.build import get_config
    from samtune.data import collate_samples, masks_to_boxes
    from samtune.data.transforms import to_model_input

    cfg = get_config(model)
    size = cfg.image_size
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    samples = []
    for b in range(batch):
        centre = torch.rand(masks, 2, generator=g) * size * 0.6 + size * 0.2
        radius = torch.rand(masks, 2, generator=g) * size * 0.12 + size * 0.04
        m = ((xx - centre[:, 0, None, None]) / radius[:, 0, None, None]) ** 2 + \
            ((yy - centre[:, 1, None, None]) / radius[:, 1, None, None]) ** 2 <= 1
        image = (torch.rand(size, size, 3, generator=g) * 60 + 80)
        for k in range(masks):
            image[m[k]] = torch.rand(3, generator=g) * 255
        image_t, masks_t = to_model_input(image.to(torch.uint8).numpy(), m.numpy(), size, cfg.normalization)
        samples.append({
            "image": image_t, "masks": masks_t, "boxes": masks_to_boxes(masks_t), "instance_ids": torch.arange(masks),
            "original_size": torch.tensor([size, size]), "input_size": torch.tensor([size, size]),
            "image_id": f"bench{b}",
        })
    return collate_samples(samples)


def _row(kind: str, model: str, batch_size: int, masks: int, iterations: int, steps: int, device: str,
         precision: str, seed: int, adapt_options: dict[str, Any] | None, threads: int | None,
         checkpointing: bool) -> dict[str, Any]:
    import resource
    import warnings

    import torch

    if threads:
        torch.set_num_threads(threads)

    from samtune.adapt.cache import CacheConfig, EmbeddingCache, encoder_fingerprint
    from samtune.modeling.precision import autocast, resolve_precision
    from samtune.prompts import SimulationConfig
    from samtune.tasks import OptimizerConfig, PromptableSegmentationTask

    warnings.filterwarnings("ignore", message=".*self.log.*")
    torch.manual_seed(seed)
    decoder_only = kind in ("decoder-only", "cached")
    simulation = SimulationConfig(num_iterations=iterations, num_point_iterations=max(iterations - 3, 0),
                                  random_mask_only_iteration=iterations > 2, final_mask_only_iteration=iterations > 1)
    task = PromptableSegmentationTask(
        model, _checkpoint(model), simulation=simulation, freeze_image_encoder=decoder_only,
        freeze_prompt_encoder=decoder_only, optimizer=OptimizerConfig(lr=1e-5, warmup_steps=0, schedule="constant"),
        activation_checkpointing=checkpointing and not decoder_only,
    )
    if kind in ("lora", "adapters"):
        from samtune.adapt import AdaptationConfig, apply_adaptation

        apply_adaptation(task.model, AdaptationConfig(**(adapt_options or {})))
    task.to(device)
    trainable = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    optimizer = task.configure_optimizers()["optimizer"]
    batch = _batch(model, batch_size, masks, seed)
    precision = resolve_precision(precision, device)  # type: ignore[arg-type]
    load_times: list[float] = []
    tmp = tempfile.TemporaryDirectory(prefix="samtune-bench-cache-")
    if kind == "cached":
        encoder = task.model.image_encoder
        cache = EmbeddingCache(tmp.name, CacheConfig(encoder_fingerprint(encoder), {"benchmark": model}))
        keys = [cache.key(f"bench:{i}") for i in range(batch_size)]
        with torch.no_grad():
            for key, embedding in zip(keys, encoder(batch["images"].to(device))):
                cache.save(key, embedding)
        fingerprint = cache.config.encoder_fingerprint
        base = {k: v.to(device) for k, v in batch.items() if k in ("masks", "mask_valid", "input_size")}

        def next_batch() -> dict[str, Any]:
            start = time.perf_counter()
            embeddings = torch.stack([cache.load(key) for key in keys])
            load_times.append(time.perf_counter() - start)
            return dict(base, image_embeddings=embeddings.to(device, non_blocking=True),
                        embedding_fingerprint=fingerprint)
    else:
        on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

        def next_batch() -> dict[str, Any]:
            return on_device

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def step() -> None:
        data = next_batch()
        with autocast(device, precision):
            loss = task.training_step(data, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, kernels)
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps - 1):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"times": times, "trainable": trainable, "precision": precision,
           "load_s": statistics.median(load_times[1:]) if len(load_times) > 1 else None}
    if device.startswith("cuda"):
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        out["peak_gb"] = rss_after / 2**20
        out["step_rss_growth_gb"] = (rss_after - rss_before) / 2**20
    tmp.cleanup()
    return out


def _child(queue: Any, *args: Any) -> None:
    try:
        queue.put(("ok", _row(*args)))
    except BaseException as err:  # noqa: BLE001 - reported by the parent
        queue.put(("error", f"{type(err).__name__}: {err}"))


def _run(*args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=_child, args=(queue, *args))
    proc.start()
    proc.join()
    if queue.empty():
        raise RuntimeError(f"the {args[0]} process exited with code {proc.exitcode} (-9: killed, usually out of "
                           "memory); try fewer --masks or --batch")
    status, value = queue.get()
    if status != "ok":
        raise RuntimeError(f"the {args[0]} row failed: {value}")
    return value


def adaptation_available() -> bool:
    try:
        from samtune.adapt import AdaptationConfig, apply_adaptation  # noqa: F401
    except ImportError:
        return False
    return True


def storage_accuracy(num_images: int = 4, seed: int = 0) -> list[tuple[str, float, float, float, float]]:
    """float16 / bfloat16 cache storage against float32, with LiteMedSAM (real weights when present).

    Returns:
        Rows ``(dtype, max relative error of the embeddings, fraction of mask pixels that differ from the float32
        masks, mean IoU(masks from stored, from float32), mean IoU against the ground truth)`` with box prompts on
        every instance.
    """
    import torch
    import torch.nn.functional as F

    from samtune.build import build_sam
    from samtune.data import MaskFolderDataset, collate_samples

    model = build_sam("lite_medsam", _checkpoint("lite_medsam"))
    em = ASSETS / "data" / "em_membrane"
    if em.is_dir():
        dataset = MaskFolderDataset(em / "image", em / "label", mask_type="components", connectivity=4, min_area=16,
                                    image_size=256, normalization="minmax", max_masks_per_image=32)
        batch = collate_samples([dataset[i] for i in range(num_images)])
    else:
        batch = _batch("lite_medsam", num_images, 16, seed)
    valid = batch["mask_valid"]
    image_index = torch.arange(valid.shape[0]).repeat_interleave(valid.shape[1])[valid.flatten()]
    gt = batch["masks"].flatten(0, 1)[valid.flatten()]
    boxes = batch["boxes"].flatten(0, 1)[valid.flatten()]
    with torch.no_grad():
        reference = model.encode_image(batch["images"])

        def masks_of(embeddings: torch.Tensor) -> torch.Tensor:
            logits, _ = model.decode(embeddings, image_index, boxes=boxes, multimask_output=False)
            return F.interpolate(logits, gt.shape[-2:], mode="bilinear", align_corners=False)[:, 0] > 0

        def iou(a: torch.Tensor, b: torch.Tensor) -> float:
            inter = (a & b).flatten(1).sum(1).float()
            union = (a | b).flatten(1).sum(1).float()
            return float(torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).mean())

        ref_masks = masks_of(reference)
        rows = [("float32", 0.0, 0.0, 1.0, iou(ref_masks, gt))]
        for dtype in (torch.float16, torch.bfloat16):
            stored = reference.to(dtype).float()
            rel = float(((stored - reference).abs() / reference.abs().clamp_min(1e-3)).max())
            pred = masks_of(stored)
            differ = float((pred != ref_masks).float().mean())
            rows.append((str(dtype).removeprefix("torch."), rel, differ, iou(pred, ref_masks), iou(pred, gt)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lite_medsam", "sam_vit_b"],
                        help="registry names (default: lite_medsam at 256, then sam_vit_b at 1024)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 2 at 256 px, 1 at 1024)")
    parser.add_argument("--masks", type=int, default=4, help="masks per image")
    parser.add_argument("--iterations", type=int, default=1,
                        help="simulated prompt rounds (11 in the paper: every round multiplies the decoder's share, "
                             "the same in every row, and so shrinks the ratios)")
    parser.add_argument("--activation-checkpointing", choices=["auto", "on", "off"], default="auto",
                        help="recompute encoder blocks in backward for the rows that train the encoder "
                             "(auto: on at 1024 px, where full fine-tuning needs it to fit in memory)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per process, the first untimed (default 6 at 256 px, 3 at 1024)")
    parser.add_argument("--repeats", type=int, default=1, help="processes per row (interleaved)")
    parser.add_argument("--lora-options", default=json.dumps(DEFAULT_ADAPT["lora"]),
                        help="JSON keyword arguments of AdaptationConfig for the lora row")
    parser.add_argument("--adapter-options", default=json.dumps(DEFAULT_ADAPT["adapters"]),
                        help="JSON keyword arguments of AdaptationConfig for the adapters row")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per row (default: torch's; 1 is steadier on a shared machine)")
    parser.add_argument("--skip-storage-check", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.masks, args.iterations, args.repeats) < 1:
        parser.error("--masks, --iterations and --repeats must be >= 1")

    from benchmarks.common import machine
    from samtune.build import get_config

    adapt = {"lora": json.loads(args.lora_options), "adapters": json.loads(args.adapter_options)}
    have_adaptation = adaptation_available()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(machine())
    for model in args.models:
        size = get_config(model).image_size
        batch = args.batch or (2 if size <= 256 else 1)
        checkpointing = args.activation_checkpointing == "on" or (args.activation_checkpointing == "auto" and size > 256)
        steps = args.steps or (6 if size <= 256 else 3)
        if steps < 2:
            parser.error("--steps must be >= 2 (the first step is a warm-up)")
        weights = "real weights" if _checkpoint(model) else "random weights"
        print(f"\n{model} at {size} px ({weights}), {args.device}, batch {batch} images x {args.masks} masks, "
              f"{args.iterations} prompt rounds, {steps - 1} timed steps x {args.repeats} processes, precision "
              f"{args.precision}, activation checkpointing {'on' if checkpointing else 'off'}", flush=True)
        results: dict[str, list[dict[str, Any]]] = {row: [] for row in args.rows}
        notes: dict[str, str] = {}
        for _ in range(args.repeats):
            for row in args.rows:
                if row in ("lora", "adapters") and not have_adaptation:
                    notes[row] = "skipped: samtune.adapt.apply_adaptation not available"
                    continue
                try:
                    results[row].append(_run(row, model, batch, args.masks, args.iterations, steps, args.device,
                                             args.precision, args.seed, adapt.get(row), args.threads,
                                             checkpointing))
                except RuntimeError as err:
                    notes[row] = f"failed: {err}"
                    continue
                r = results[row][-1]
                print(f"  {row}: {statistics.median(r['times']):.3f} s/step", flush=True)
        cpu = not args.device.startswith("cuda")
        memory = "peak max RSS GiB (growth during the steps)" if cpu else "peak CUDA GiB (max_memory_allocated)"
        print(f"\n| {model} | trainable params | s/step | {memory} | cache load s/batch | vs full |")
        print("|---|---|---|---|---|---|")
        full = statistics.median(t for r in results.get("full", []) for t in r["times"]) \
            if results.get("full") else None
        for row in args.rows:
            runs = results[row]
            if not runs:
                print(f"| {row} | {notes.get(row, 'not run')} | | | | |")
                continue
            seconds = statistics.median(t for r in runs for t in r["times"])
            peak = max(r["peak_gb"] for r in runs)
            mem = f"{peak:.2f} ({max(r['step_rss_growth_gb'] for r in runs):+.2f})" if cpu else f"{peak:.2f}"
            load = runs[0]["load_s"]
            ratio = f"{full / seconds:.1f}x faster" if full else "-"
            print(f"| {row} | {runs[0]['trainable'] / 1e6:.2f}M | {seconds:.3f} | {mem} | "
                  f"{'-' if load is None else f'{load:.4f}'} | {ratio} |")
        if full and results.get("cached"):
            cached = statistics.median(t for r in results["cached"] for t in r["times"])
            print(f"\ncached-embedding decoder-only vs full fine-tuning: {full / cached:.1f}x faster per step "
                  f"(target >= 10x: {'met' if full / cached >= 10 else 'NOT met'})")
    if not args.skip_storage_check:
        rows = storage_accuracy()
        source = "EM asset" if (ASSETS / "data" / "em_membrane").is_dir() else "synthetic images"
        print(f"\nCache storage dtype, LiteMedSAM ({'real' if _checkpoint('lite_medsam') else 'random'} weights), "
              f"{source}, GT-box prompts:")
        print("| storage | max rel. error | pixels differing from float32 masks | mask IoU vs float32 masks | "
              "mean IoU vs GT |")
        print("|---|---|---|---|---|")
        for dtype, rel, differ, agree, gt_iou in rows:
            print(f"| {dtype} | {rel:.1e} | {differ:.2e} | {agree:.4f} | {gt_iou:.4f} |")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
