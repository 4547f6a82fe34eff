"""The ``samtune`` command line.

``samtune fit | validate --config FILE [--config FRAGMENT ...] [--key value ...]`` runs Lightning through
:class:`SamtuneCLI` (a LightningCLI; ``test`` and ``predict`` are refused: the task has neither loop): every key
of the YAML files and flags is validated against the typed ``__init__`` signatures of the task, the datamodule,
the Trainer and the callbacks; repeated ``--config`` files are merged left to right (``recipes/`` holds complete
runs, ``configs/`` fragments); ``--print_config`` prints the resolved configuration. Without ``--config``, ``fit``
runs ``recipes/quickstart.yaml``.

Other subcommands: ``samtune data synth`` (synthetic SA-1B-format data), ``export`` (official .pth, safetensors,
merged LoRA, ONNX), ``evaluate`` (point / box / click protocols) and ``amg`` (automatic mask generation); each has
its own ``--help``.

Errors are one line (``samtune: error: ...``) with exit code 1 (2 for command-line usage errors); pass
``--traceback`` or set ``SAMTUNE_TRACEBACK=1`` to see the Python traceback.
"""
from __future__ import annotations

import argparse
import logging
import netrc
import os
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

import samtune.data.datamodules  # noqa: F401  (registers the datamodules for class_path short names)
import samtune.tasks  # noqa: F401  (registers PromptableSegmentationTask for class_path short names)
from samtune.bundled import bundled_folder, resolve_config_path
from samtune.callbacks import (
    FinalCheckpoint, ParameterCounts, SamtuneProgressBar, SaveConfigToLoggers, ValidationOverlays,
)
from samtune.checkpoint_io import AtomicCheckpointIO
from samtune.modeling.precision import emulates_bf16
from samtune.resumable import make_resumable

__all__ = [
    "SamtuneCLI", "SyntheticData", "main", "ensure_synthetic_data", "configure_wandb_mode", "UsageError",
    "preemption_checkpoint",
]

logger = logging.getLogger("samtune")

TRAINER_COMMANDS = ("fit", "validate")
# Tool commands: each lives in its own module with ``main(argv: list[str]) -> int`` (argparse, its own --help).
TOOL_COMMANDS = {
    "export": ("samtune.export.cli", "write official-format .pth, merged-LoRA, safetensors or ONNX weights from a checkpoint"),
    "evaluate": ("samtune.evaluation.cli", "IoU per click / NoC of a checkpoint on a dataset"),
    "amg": ("samtune.inference.amg_cli", "automatic mask generation (point grid, IoU/stability filtering, NMS) over images"),
}
QUICKSTART = (bundled_folder("recipes") or Path(__file__).resolve().parents[1] / "recipes") / "quickstart.yaml"


class UsageError(Exception):
    """A command-line problem (exit code 2). The message goes after ``samtune COMMAND: error: ``, so it does not
    name the command itself."""


@dataclass
class SyntheticData:
    """Generate the synthetic SA-1B-format dataset at ``data.init_args.root`` when that folder has no data.

    Attributes:
        num_images: number of images.
        image_size: square image side.
        seed: generation seed (same seed, same files).
    """

    num_images: int = 64
    image_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_images <= 0:
            raise ValueError(f"synthetic_data.num_images must be positive, got {self.num_images}")
        if self.image_size < 32:
            raise ValueError(f"synthetic_data.image_size must be >= 32, got {self.image_size}")


_SYNTHETIC_MARKER = ".samtune_synthetic"  # not *.json: the datamodule reads every *.json as an annotation


def _describe_synthetic(spec: SyntheticData) -> str:
    return f"num_images={spec.num_images} image_size={spec.image_size} seed={spec.seed}"


def ensure_synthetic_data(root: str | Path, spec: SyntheticData) -> bool:
    """Write ``spec.num_images`` synthetic images to ``root`` unless it already holds ``*.json`` annotations.

    Safe when several processes (ranks) call it at once: the data is generated in a private temporary folder
    and renamed into place; the loser of the race drops its copy. The settings are recorded in the folder
    (``.samtune_synthetic``); data generated with other settings is reused with a note saying so (delete the folder
    to regenerate).

    Returns:
        True when this call generated the data.
    """
    from samtune.data.synth import synthesize_sa1b

    root = Path(root)
    if root.is_dir() and any(root.glob("*.json")):
        marker = root / _SYNTHETIC_MARKER
        recorded = marker.read_text(encoding="utf-8").strip() if marker.is_file() else None
        if recorded is not None and recorded != _describe_synthetic(spec):
            print(f"samtune: synthetic_data: {root} already holds data generated with {recorded}, not "
                  f"{_describe_synthetic(spec)}: using it as it is (delete the folder to generate it anew)",
                  file=sys.stderr)
        return False
    if root.exists() and not root.is_dir():
        raise ValueError(f"synthetic_data: data root {root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()):
        raise ValueError(
            f"synthetic_data: data root {root} holds other files but no *.json annotations; synthetic data is only "
            "generated into a missing or empty folder: set data.init_args.root to another folder (or remove "
            "synthetic_data to train on the folder's own SA-1B-format data)"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        synthesize_sa1b(tmp, spec.num_images, spec.image_size, spec.seed)
        (tmp / _SYNTHETIC_MARKER).write_text(_describe_synthetic(spec) + "\n", encoding="utf-8")
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        try:
            os.rename(tmp, root)
        except OSError:
            if root.is_dir() and any(root.glob("*.json")):  # another process finished first
                return False
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"samtune: generated {spec.num_images} synthetic SA-1B-format images in {root}", file=sys.stderr)
    return True


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def configure_wandb_mode() -> str:
    """Make W&B runs offline when no credentials are configured, so a run never waits on the network.

    ``WANDB_MODE`` set by the user wins; otherwise, without ``WANDB_API_KEY`` and without a ``~/.netrc`` entry for
    the W&B host, sets ``WANDB_MODE=offline`` (upload later with ``wandb sync <save_dir>/wandb/offline-run-*``).

    Returns:
        The mode in effect (``WANDB_MODE`` or ``"online"``).
    """
    if "WANDB_MODE" not in os.environ and not _wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
        print("samtune: no W&B credentials (WANDB_API_KEY / ~/.netrc): logging offline; upload later with "
              "`wandb sync <save_dir>/wandb/offline-run-*`", file=sys.stderr)
    return os.environ.get("WANDB_MODE", "online")


def _class_paths(value: Any) -> list[str]:
    """class_path strings in a (possibly nested / list) config value."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _class_paths(v)]
    getter = value.get if hasattr(value, "get") else None
    if getter is not None and getter("class_path"):
        return [str(getter("class_path"))]
    return [type(value).__name__] if not isinstance(value, (str, bool, int, float)) else []


class SamtuneArgumentParser(LightningArgumentParser):
    """LightningArgumentParser that takes only whole option names (``allow_abbrev=False``).

    argparse expands a prefix to the one option it matches: ``--trainer.max_step 5`` set ``max_steps``,
    ``--model.init_args.simulation.num_iter 2`` set ``num_iterations``, and ``--conf recipes/medical.yaml`` was
    read as ``--config`` after the default recipe had been put in front of it (its settings then leaked into the
    run). jsonargparse builds the parsers of the task's and datamodule's arguments with the class of the parser
    it nests them in, so setting the default here covers those options too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


class SamtuneCLI(LightningCLI):
    """LightningCLI with samtune's defaults.

    - ``model``/``data`` in subclass mode (``class_path: PromptableSegmentationTask``, ``SA1BDataModule``, ...);
      the task builds its own optimiser and schedule (no ``optimizer:`` / ``lr_scheduler:`` keys).
    - ``seed_everything`` defaults to 0 (reproducible by default).
    - ``synthetic_data:`` (optional) generates the synthetic dataset at ``data.init_args.root`` when absent.
    - Trainer extras unless already configured: :class:`AtomicCheckpointIO`, :class:`SamtuneProgressBar`,
      :class:`ParameterCounts`, :class:`ValidationOverlays`, :class:`FinalCheckpoint` (``last.ckpt`` holds the final
      step); the training loader gets a resumable, epoch-seeded, sharded order (:mod:`samtune.resumable`).
    - W&B loggers go offline automatically without credentials.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--synthetic_data", type=SyntheticData | None, default=None,
            help="Generate synthetic SA-1B-format data at data.init_args.root when that folder has none "
                 "(num_images, image_size, seed). Needs an SA1BDataModule.",
        )

    def _subconfig(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._subconfig()
        spec = config.get("synthetic_data")
        if spec is not None:
            data = config.get("data")
            class_path = str(data.get("class_path", "")) if data is not None else ""
            if not class_path.endswith("SA1BDataModule"):
                raise ValueError(f"synthetic_data needs data.class_path SA1BDataModule, got {class_path or None!r}")
            spec = spec if isinstance(spec, SyntheticData) else SyntheticData(**dict(vars(spec)))
            ensure_synthetic_data(data["init_args"]["root"], spec)
        if any("WandbLogger" in path for path in _class_paths(config.get("trainer", {}).get("logger"))):
            configure_wandb_mode()

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        datamodule = self.datamodule
        if datamodule is None or not hasattr(datamodule, "train_dataloader"):
            return
        seed = self._subconfig().get("seed_everything")
        seed = 0 if isinstance(seed, bool) or seed is None else int(seed)
        original: Callable[[], Any] = datamodule.train_dataloader

        def train_dataloader() -> Any:
            return make_resumable(original(), seed)

        train_dataloader.__doc__ = original.__doc__
        datamodule.train_dataloader = train_dataloader  # type: ignore[method-assign]

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
        configured = list(config.get("callbacks") or []) + list(callbacks)
        extras: list[Callback] = []
        if config.get("enable_progress_bar", True) is not False and not any(
                isinstance(c, ProgressBar) for c in configured):
            extras.append(SamtuneProgressBar())
        for cls in (ParameterCounts, ValidationOverlays, FinalCheckpoint):
            if not any(isinstance(c, cls) for c in configured):
                extras.append(cls())
        config["precision"] = cpu_precision(config.get("precision"), config.get("accelerator"))
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        config["plugins"] = plugins
        return super()._instantiate_trainer(config, list(callbacks) + extras)

    def before_fit(self) -> None:
        """``--ckpt_path last`` also considers Lightning's SLURM pre-emption checkpoint (see
        :func:`preemption_checkpoint`): a re-queued job continues from the save made at the signal."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            newer = preemption_checkpoint(self.trainer)
            if newer is not None:
                config["ckpt_path"] = newer


def cpu_precision(precision: Any, accelerator: Any) -> Any:
    """The Trainer precision to use: ``precision``, except bf16 on a CPU without native bf16 becomes ``"32-true"``.

    The recipes ask for ``bf16-mixed`` (GPUs, and CPUs with AVX512-BF16 / AMX); elsewhere PyTorch emulates bf16 on
    the CPU, about 16x slower than fp32 (LiteMedSAM's encoder forward and backward on two 256 px crops: 115 s
    against 7 s on a Zen 3 EPYC). A warning says so.
    """
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available()
                                      and not torch.backends.mps.is_available())
    if not on_cpu or not emulates_bf16(precision, "cpu"):
        return precision
    warnings.warn(
        f"trainer.precision {precision!r} on a CPU without native bf16 (no AVX512-BF16 / AMX-BF16 in /proc/cpuinfo): "
        "PyTorch would emulate bf16, about 16x slower than fp32, so this run trains in '32-true' (the saved "
        "config still shows the requested precision)", stacklevel=2,
    )
    return "32-true"


_HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def preemption_checkpoint(trainer: L.Trainer) -> str | None:
    """Lightning's SLURM pre-emption checkpoint when it is newer than every ``last`` checkpoint, else None.

    On the pre-emption signal (``SLURMEnvironment(auto_requeue=True)``) Lightning saves
    ``<default_root_dir>/hpc_ckpt_<n>.ckpt``, not ``last.ckpt``, and restores it on its own only without
    ``ckpt_path``; with ``--ckpt_path last`` it takes the ModelCheckpoints' ``last*.ckpt`` and the steps since the
    last periodic save would be trained again. The newest of Lightning's candidates (highest ``n``, as Lightning
    picks) wins when its file is newer than all of them.
    """
    root = Path(trainer.default_root_dir)
    versions = [(int(m.group(1)), p) for p in root.glob("hpc_ckpt_*.ckpt") if (m := _HPC_CHECKPOINT.fullmatch(p.name))]
    if not versions:
        return None
    hpc = max(versions)[1]
    lasts: set[str] = set()
    for callback in trainer.checkpoint_callbacks:
        find = getattr(callback, "_find_last_checkpoints", None)  # Lightning's own "last" candidates
        if callable(find):
            lasts |= set(find(trainer))
    newest = max((os.path.getmtime(p) for p in lasts if os.path.isfile(p)), default=float("-inf"))
    if os.path.getmtime(hpc) <= newest:
        return None
    logger.info("resuming from the pre-emption checkpoint %s (newer than %s)", hpc,
                ", ".join(sorted(lasts)) or "any last checkpoint")
    return str(hpc)


def _uses_config(args: Sequence[str]) -> bool:
    """Whether the arguments bring their own configuration, so that ``fit`` does not run the default recipe.

    That is a config file (``--config`` / ``-c``) or a whole ``model`` / ``data`` section (``--model CLASS_OR_FILE``,
    ``--data.class_path CLASS``). Overrides of single settings (``--data.init_args.batch_size 2``,
    ``--trainer.max_steps 10``) and ``--print_config`` apply on top of the default recipe.
    """
    sections = ("--model", "--data")
    return any(
        a in ("-c", "--config") or a.startswith(("--config=", "-c="))
        or a in sections or a.startswith(tuple(f"{s}=" for s in sections))
        or a.startswith(tuple(f"{s}.class_path" for s in sections))
        for a in args
    )


_YAML_NULLS = ("null", "Null", "NULL", "~")


def _bundled_configs(args: Sequence[str]) -> list[str]:
    """``--config recipes/X.yaml`` / ``configs/...`` (also ``-c``, ``--config=``) missing from the working directory
    name samtune's bundled copy (:func:`samtune.bundled.resolve_config_path`): an installed samtune runs its
    recipes and fragments without a checkout."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg in ("-c", "--config") and i + 1 < len(out):
            out[i + 1] = resolve_config_path(out[i + 1])
        elif arg.startswith(("--config=", "-c=")):
            flag, value = arg.split("=", 1)
            out[i] = f"{flag}={resolve_config_path(value)}"
    return out


def _null_overrides(args: Sequence[str]) -> list[str]:
    """Rewrite ``--model[.init_args].GROUP.FIELD null`` as ``--model[.init_args].GROUP '{"FIELD": null}'``.

    jsonargparse (4.53) rejects null for a field of a dataclass-typed argument (``loss.focal_alpha``,
    ``adaptation.last_k``) given as a dotted flag: it arrives as the string 'None' and fails the ``float | None``
    check. The same value given as a one-key mapping of the group parses, and merges with the group's other
    settings from the config files. The same holds for an argument of a class nested in the datamodule (the
    datamodule that ``CachedEmbeddingDataModule`` wraps): ``--data.init_args.data.init_args.train_split null``
    becomes ``--data.init_args.data '{"init_args": {"train_split": null}}'`` (given to ``...data.init_args`` the
    mapping, like the dotted flag, yields the string 'None'). Other flags, and nulls for the task's or datamodule's
    own arguments (``--data.init_args.train_region null``), which parse as they are, pass through unchanged.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, value, width = arg, None, 1
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
        elif arg.startswith("--") and i + 1 < len(args):
            value, width = args[i + 1], 2
        parts = key[2:].split(".") if key.startswith(("--model.", "--data.")) else []
        fields = parts[2:] if len(parts) > 1 and parts[1] == "init_args" else parts[1:]
        if value is not None and value.strip() in _YAML_NULLS and len(fields) >= 2 and all(fields):
            group, mapping = key.rsplit(".", 1)[0], f'{{"{fields[-1]}": null}}'
            if group.endswith(".init_args") and len(fields) >= 3:  # a nested class's argument
                group, mapping = group.removesuffix(".init_args"), f'{{"init_args": {mapping}}}'
            out += [group, mapping]
            i += width
        else:
            out.append(arg)
            i += 1
    return out


def run_lightning(args: list[str], run: bool = True) -> SamtuneCLI:
    """``fit`` / ``validate`` through :class:`SamtuneCLI`.

    Args:
        args: command-line arguments starting with the subcommand.
        run: False parses and instantiates (model, datamodule, trainer) without running the subcommand.

    Returns:
        The CLI object (``.model``, ``.datamodule``, ``.trainer``).
    """
    if args[0] == "fit" and not _uses_config(args[1:]) and not any(a in ("-h", "--help") for a in args[1:]):
        if not QUICKSTART.is_file():
            raise UsageError("no --config given and recipes/quickstart.yaml was not found; "
                             "pass --config RECIPE.yaml")
        print(f"samtune: no --config given: running {QUICKSTART}", file=sys.stderr)
        args = [args[0], "--config", str(QUICKSTART), *args[1:]]
    args = _null_overrides(_bundled_configs(args))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
        return SamtuneCLI(
            model_class=L.LightningModule,
            subclass_mode_model=True,
            datamodule_class=L.LightningDataModule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_callback=SaveConfigToLoggers,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            parser_class=SamtuneArgumentParser,
            # prog: the usage line says `samtune fit`, not `__main__.py` (python -m samtune, torchrun -m samtune)
            parser_kwargs={"prog": "samtune", "exit_on_error": False, "env_prefix": "SAMTUNE", "default_env": False},
            args=args if run else args[1:],
            run=run,
        )


def _tool_command(name: str, args: list[str]) -> int:
    """Run a tool command: import its module only now (keeps ``samtune --help`` and ``fit`` start-up light)."""
    import importlib

    module_name, _ = TOOL_COMMANDS[name]
    return int(importlib.import_module(module_name).main(args) or 0)


def _top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # whole option names only: a prefix must not silently stand for an option
        prog="samtune",
        description="Train and adapt the Segment Anything Model with PyTorch Lightning.",
        epilog="Run `samtune COMMAND --help` for the options of a command. Errors print one line; add "
               "--traceback (or set SAMTUNE_TRACEBACK=1) for the Python traceback.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    helps = {
        "fit": "train a task (default recipe: recipes/quickstart.yaml)",
        "validate": "run validation of a task (--ckpt_path)",
    }
    for name, text in helps.items():
        sub.add_parser(name, help=text, add_help=False)
    data = sub.add_parser("data", help="dataset tools (synth)")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data_sub.add_parser("synth", help="write synthetic SA-1B-format images (--out DIR --num-images N)", add_help=False)
    for name, (_, text) in TOOL_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _dispatch(args: list[str]) -> int:
    parser = _top_level_parser()
    if not args or args[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if args else 2
    command = args[0]
    if command in TRAINER_COMMANDS:
        run_lightning(args)
        return 0
    if command in ("test", "predict"):  # Lightning's other loops: the task defines neither
        raise UsageError(
            f"the SAM task has no {command} loop; score a checkpoint on a dataset with "
            "`samtune evaluate` (IoU per click, NoC), segment images with `samtune amg` or samtune.Predictor"
        )
    if command == "data":
        if len(args) < 2 or args[1] in ("-h", "--help"):
            try:
                parser.parse_args(["data", "--help"])  # prints the help of `samtune data` and exits
            except SystemExit:
                pass
            return 0 if len(args) > 1 else 2  # as `samtune` without a command: help, usage error
        if args[1] != "synth":
            raise UsageError(f"unknown command {args[1]!r}; available: synth")
        from samtune.data.synth import main as synth_main

        synth_main(args[2:])
        return 0
    if command in TOOL_COMMANDS:
        return _tool_command(command, args[1:])
    raise UsageError(f"unknown command {command!r}; available: {', '.join([*TRAINER_COMMANDS, 'data', *TOOL_COMMANDS])}")


_PACKAGE_DIR = os.path.dirname(os.path.realpath(__file__)) + os.sep


def _raised_in_samtune(err: BaseException) -> bool:
    """Whether ``err`` was raised by samtune's own code (the innermost frame of its traceback)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.realpath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR)


def _root_cause(err: BaseException) -> BaseException:
    """The error to report: the first one down the chain that samtune raised, else the innermost.

    jsonargparse and Lightning wrap errors raised while instantiating classes or running hooks in messages that
    bury them; those wrappers are skipped. An error that samtune raised from a lower-level one already names the
    file / annotation / key the lower-level message lacks (``invalid JSON``, ``compressed RLE counts end inside a
    value``), so the chain stops there.
    """
    seen = {id(err)}
    while not _raised_in_samtune(err):
        inner = err.__cause__ or err.__context__
        if inner is None or id(inner) in seen:
            return err
        seen.add(id(inner))
        err = inner
    return err


_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process (\d+)\.")


def _worker_message(lines: list[str]) -> list[str]:
    """The original message of an error re-raised from a DataLoader worker.

    torch re-raises a worker's exception in the main process with the message ``Caught X in DataLoader worker
    process N. Original Traceback ...`` followed by the traceback; the useful part (for a SampleError: the file
    and the problem) is the traceback's last entry, ``X: message``.
    """
    caught = _WORKER_ERROR.match(lines[0]) if lines else None
    if caught is None:
        return lines
    last_entry = re.compile(rf"([\w.]+\.)?{re.escape(caught.group(1))}: ")  # qualified: samtune.data.errors.X
    for i in range(len(lines) - 1, 0, -1):
        if last_entry.match(lines[i]):
            message = " ".join(lines[i:]).split(": ", 1)[1].strip()
            return [f"{message} (in DataLoader worker process {caught.group(2)})"]
    return lines


def _one_line(err: BaseException) -> str:
    err = _root_cause(err)
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = " ".join(_worker_message(lines))
    if len(text) > 600:
        text = text[:600] + " ..."
    name = type(err).__name__
    return f"{name}: {text}" if text else name


# Lines of jsonargparse's union-type errors that never say what is wrong: the list of alternatives, the
# alternatives that a value with a class_path could not be anyway (null, bool), and the value given back.
_UNION_NOISE = re.compile(
    r"Does not validate against any of the Union subtypes|Subtypes: .*|Errors:|Given value type: .*"
    r"|Expected a <class 'NoneType'>"
)
# ... and, once the error names the class_path that was given, the other ways a class could have been given.
_CLASS_PATH_NOISE = re.compile(
    r"Not a valid subclass of .*|Subclass types expect one of:|a class path \(str\)|a dict with class_path entry"
    r"|a dict without class_path but with init_args entry.*|a dict with parameters accepted by the base class.*"
    r"|Expected a <class 'bool'>|Given value: .*"
)


def _usage_error_text(err: BaseException) -> str:
    """A jsonargparse message on one line, without the lines of its union-type errors that say nothing.

    A misspelt key in a class's ``init_args`` (``save_dri`` in a logger fragment, ``lora_rnak`` in
    ``adaptation``) is reported as one of several failed alternatives, after the list of types, and followed by the
    whole value given: cut to one line of 600 characters, the message lost the key. Kept: the keys, the class paths
    given, and what was wrong (``Parser key "trainer.logger": Problem with given class_path '...CSVLogger':
    Option 'save_dri' is not accepted``).
    """
    lines = [line.strip(" -") for line in str(err).strip().splitlines() if line.strip(" -")]
    noise = [_UNION_NOISE]
    if any(line.startswith("Problem with given class_path") for line in lines):
        noise.append(_CLASS_PATH_NOISE)
    kept = [line for line in lines if not any(n.fullmatch(line) for n in noise)] or lines
    text = "".join(line + (" " if line.endswith(":") else "; ") for line in kept).rstrip("; ")
    return text[:600] + (" ..." if len(text) > 600 else "")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``samtune`` console script and ``python -m samtune``."""
    args = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in args or os.environ.get("SAMTUNE_TRACEBACK", "") not in ("", "0")
    args = [a for a in args if a != "--traceback"]
    from jsonargparse import ArgumentError

    # Tool commands that print their own one-line errors (amg) see --traceback as SAMTUNE_TRACEBACK=1.
    saved = os.environ.get("SAMTUNE_TRACEBACK")
    if show_traceback:
        os.environ["SAMTUNE_TRACEBACK"] = "1"
    try:
        code = _dispatch(args)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("samtune: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ArgumentError, UsageError) as err:
        if show_traceback:
            raise
        command = f"samtune {args[0]}" if args else "samtune"
        print(f"{command}: error: {_usage_error_text(err)}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # noqa: BLE001  (one clear line instead of a traceback)
        if show_traceback:
            cause = _root_cause(err)
            if cause is not err:
                raise cause from err
            raise
        print(f"samtune: error: {_one_line(err)}", file=sys.stderr)
        print("samtune: run again with --traceback (or SAMTUNE_TRACEBACK=1) for the full traceback", file=sys.stderr)
        sys.exit(1)
    finally:
        if saved is None:
            os.environ.pop("SAMTUNE_TRACEBACK", None)
        else:
            os.environ["SAMTUNE_TRACEBACK"] = saved
    if code:
        sys.exit(code)
