"""A run never destroys another run; SIGTERM stops as cleanly as Ctrl-C; evaluation takes the
trained config from the checkpoint and refuses changes to what the model computes."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import pretrain
from test_pipeline import ROOT, _logged_step, overrides, run, weights
from test_pretrain import _overrides as detector_overrides, data  # noqa: F401  (module-scoped fixture)
from utils.checkpoint import CheckpointMismatchError, save_atomic
from utils.config import ConfigError


@pytest.fixture(scope="module")
def first_run(tiny):  # noqa: F811
    args = overrides(tiny[0], tiny, "EPOCHS=1", logs="first")
    run("train.py", "--config", "config/refcoco.yaml", *args)
    return tiny[0] / "first", args


def test_a_second_run_into_the_same_log_path_stops_and_keeps_the_first(first_run):
    folder, args = first_run
    best = (folder / "best.pth").read_bytes()
    out = run("train.py", "--config", "config/refcoco.yaml", *args, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "--resume" in line and "LOG_PATH=" in line and "--overwrite" in line and "best.pth" in line
    assert (folder / "best.pth").read_bytes() == best


def test_overwrite_replaces_the_run_when_asked(tiny):  # noqa: F811
    args = overrides(tiny[0], tiny, "EPOCHS=1", logs="replaced")
    run("train.py", "--config", "config/refcoco.yaml", *args)
    before = os.path.getmtime(tiny[0] / "replaced" / "last.pth")
    run("train.py", "--config", "config/refcoco.yaml", "--overwrite", *args)
    assert os.path.getmtime(tiny[0] / "replaced" / "last.pth") > before


def test_a_log_path_that_is_a_file_and_an_empty_training_split_are_one_line_errors(tiny):  # noqa: F811
    not_a_folder = tiny[0] / "a_file"
    not_a_folder.write_text("")
    out = run("train.py", "--config", "config/refcoco.yaml", *overrides(tiny[0], tiny),
              f"LOG_PATH={not_a_folder}", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"error: LOG_PATH {not_a_folder} is a file, not a folder; "
                                               "set LOG_PATH to a folder path"]
    # testA holds entries, but only one per image: a split is empty when no entry is left, as here
    # with SKIP_BAD_IMAGES on a folder without the images.
    empty = tiny[0] / "no_images"
    empty.mkdir(exist_ok=True)
    out = run("train.py", "--config", "config/refcoco.yaml",
              *overrides(tiny[0], tiny, "SKIP_BAD_IMAGES=true", logs="empty"),
              f"IMAGE_PATH={{synthetic: {empty}}}", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: the training split is empty")


def test_sigterm_saves_exits_cleanly_and_resumes(tiny):  # noqa: F811
    args = overrides(tiny[0], tiny, "EPOCHS=3", "PRINT_FREQ=1", logs="sigterm")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--config", "config/refcoco.yaml",
                             *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not _logged_step(tiny[0] / "sigterm", 6) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr
    last = tiny[0] / "sigterm" / "last.pth"
    saved = weights(last)
    assert saved["epoch"] == 1 and saved["batch_in_epoch"] > 0
    run("train.py", "--config", "config/refcoco.yaml", "--resume", str(last), *args)
    assert weights(last)["epoch"] == 3 and weights(last)["step"] == 3 * 4


def test_test_py_takes_the_config_from_the_checkpoint_and_refuses_model_changes(tiny, first_run):  # noqa: F811
    folder, args = first_run
    best = str(folder / "best.pth")
    given = run("test.py", "--config", "config/refcoco.yaml", "--eval-weights", best, *args)
    stored = run("test.py", "--eval-weights", best)
    assert len(_table(stored)) == 3 and _table(stored) == _table(given)

    out = run("test.py", "--eval-weights", best, "INPUT_SHAPE=[96, 96]", "SELECT_NUM=4", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "INPUT_SHAPE ([96, 96] here, [64, 64] in training)" in line and "SELECT_NUM" in line
    assert "--allow-config-change" in line
    allowed = run("test.py", "--eval-weights", best, "--allow-config-change", "INPUT_SHAPE=[96, 96]", "SELECT_NUM=4")
    assert len(_table(allowed)) == 3

    # A data path may differ: the same annotation file under another name.
    _, ann, images = tiny
    copy = tiny[0] / "anns_copy.json"
    copy.write_text(open(ann).read())
    moved = run("test.py", "--eval-weights", best, f"ANN_PATH={{synthetic: {copy}}}")
    assert _table(moved) == _table(stored)


def _table(out):
    return [line for line in out.stdout.splitlines() if line.startswith(("val", "testA", "testB"))]


def test_pretrain_refuses_to_replace_a_run_and_to_resume_a_foreign_checkpoint(data, tmp_path):  # noqa: F811
    log_path = tmp_path / "detector"
    save_atomic({"epoch": 1}, str(log_path / "last.pth"))
    parse = pretrain.get_args_parser().parse_args
    base = ["--config", "config/synthetic/quickstart.yaml", "--device", "cpu"]
    with pytest.raises(ConfigError, match="--resume .*last.pth.*DET_LOG_PATH=.*--overwrite"):
        pretrain.main(parse(base + detector_overrides(data, log_path)))
    with pytest.raises(CheckpointMismatchError, match="not a detector pretraining checkpoint"):
        pretrain.main(parse(base + ["--resume", str(log_path / "last.pth")] + detector_overrides(data, log_path)))
    assert torch.load(log_path / "last.pth", weights_only=True) == {"epoch": 1}
