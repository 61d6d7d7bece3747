"""Bad input gets a clear error and loses nothing."""
import argparse
import errno
import os
import pickle
import sys

import pytest
import torch

from models import build_model
from models.reference_keys import reference_state_dict
from test_pipeline import overrides, run
from utils import checkpoint as ckpt_utils
from utils.cli import run_main
from utils.config import load_config
from utils.checkpoint import model_for_evaluation


@pytest.fixture(scope="module")
def trained(tiny):  # noqa: F811
    root = tiny[0]
    run("train.py", "--config", "config/refcoco.yaml", *overrides(root, tiny, "EPOCHS=1", logs="bad"))
    return root / "bad" / "last.pth"


def test_checkpoint_from_another_config_names_the_shapes(tiny, trained):  # noqa: F811
    out = run("test.py", "--config", "config/refcoco.yaml", "--eval-weights", str(trained), "--allow-config-change",
              *overrides(tiny[0], tiny, "HIDDEN_SIZE=16", "FF_SIZE=32"), check=False)
    assert out.returncode == 2
    assert "shape mismatch" in out.stderr and "(32,) in" in out.stderr and "Traceback" not in out.stderr


def test_missing_checkpoint_and_unknown_key_end_in_one_line(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="evaluation weights not found"):
        model_for_evaluation(str(tmp_path / "absent.pth"), load_config(None), ["PAD"], torch.device("cpu"))

    def bad_config(args):
        return load_config("config/refcoco.yaml", ["BATCH_SIZ=2"])

    sys_argv = sys.argv
    sys.argv = ["train.py"]
    try:
        with pytest.raises(SystemExit) as stop:
            run_main(bad_config, argparse.ArgumentParser())
    finally:
        sys.argv = sys_argv
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'BATCH_SIZ'; did you mean 'BATCH_SIZE'") and "Traceback" not in err


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoints_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Exploit()}, f)
    with pytest.raises(ckpt_utils.CheckpointMismatchError, match="only those are loaded"):
        ckpt_utils.load_checkpoint(str(path))


def test_reference_checkpoint_evaluates_with_test_py(tiny, trained):  # noqa: F811
    """A checkpoint as the reference code writes it: {epoch, state_dict, optimizer, scheduler, lr},
    reference key names, saved from DDP."""
    ours = torch.load(trained, map_location="cpu", weights_only=True)
    cfg = load_config("config/refcoco.yaml", overrides(tiny[0], tiny))
    model = build_model(cfg, None, len(ours["vocab"]))
    model.load_state_dict(ours["state_dict"])
    reference = {"epoch": 1, "lr": 1e-4, "optimizer": {}, "scheduler": {},
                 "state_dict": {f"module.{k}": v for k, v in reference_state_dict(model).items()}}
    path = tiny[0] / "reference.pth"
    torch.save(reference, path)
    ours_out = run("test.py", "--config", "config/refcoco.yaml", "--eval-weights", str(trained),
                   *overrides(tiny[0], tiny))
    ref_out = run("test.py", "--config", "config/refcoco.yaml", "--eval-weights", str(path),
                  *overrides(tiny[0], tiny))
    table = [line for line in ref_out.stdout.splitlines() if line.startswith(("val", "testA", "testB"))]
    assert len(table) == 3
    assert table == [line for line in ours_out.stdout.splitlines() if line.startswith(("val", "testA", "testB"))]


def test_nan_loss_stops_and_names_the_step(tiny):  # noqa: F811
    out = run("train.py", "--config", "config/refcoco.yaml",
              *overrides(tiny[0], tiny, "LR=1e30", "WARMUP=0", "GRAD_NORM_CLIP=0.0", "PRINT_FREQ=1", logs="nan"),
              check=False)
    assert out.returncode == 1
    assert "at step" in out.stdout and "the last checkpoint is kept" in out.stdout
    assert not os.path.exists(tiny[0] / "nan" / "last.pth")


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    ckpt_utils.save_atomic({"epoch": 1}, str(path))

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_utils.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        ckpt_utils.save_atomic({"epoch": 2}, str(path))
    monkeypatch.undo()
    assert ckpt_utils.load_checkpoint(str(path))["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pth"]
