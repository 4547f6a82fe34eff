"""The adaptation fragments compose with a recipe on the command line and train."""
from __future__ import annotations

import torch

from samtune.adapt import is_adapter_checkpoint, load_adapter_checkpoint
from tests.conftest import REPO_ROOT
from tests.test_cli import quick_args, run_cli


def test_quickstart_with_lora_fragment_trains_two_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = quick_args("--config", str(REPO_ROOT / "configs" / "adapt" / "lora.yaml"),
                      "--model.init_args.adaptation.lora_rank", "2",
                      "--model.init_args.adaptation.blocks", "[0, -1]",
                      "--trainer.limit_val_batches", "1",
                      # short simulation and validation: this test is about the fragment, not the schedule
                      "--model.init_args.simulation.num_iterations", "2",
                      "--model.init_args.simulation.num_point_iterations", "1",
                      "--model.init_args.simulation.final_mask_only_iteration", "false",
                      "--model.init_args.val_num_clicks", "1", steps=2)
    assert run_cli(args) == 0, capsys.readouterr().err[-3000:]
    last = tmp_path / "runs" / "quickstart" / "checkpoints" / "last.ckpt"
    assert is_adapter_checkpoint(last)
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    adaptation = ckpt["hyper_parameters"]["adaptation"]
    assert (adaptation["method"], adaptation["lora_rank"], adaptation["blocks"]) == ("lora", 2, [0, -1])
    lora = sorted(k for k in ckpt["state_dict"] if "lora_A" in k)
    assert lora == [f"model.image_encoder.blocks.{i}.attn.{t}.lora_A.default.weight" for i in (0, 3)
                    for t in ("proj", "qkv")]
    model = load_adapter_checkpoint(last)  # random-init quickstart base: the checkpoint holds every weight
    assert model.image_encoder.blocks[3].attn.qkv.lora_A["default"].weight.shape == (2, 96)
