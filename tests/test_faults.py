"""Fault injection: every entry point (train.py, test.py, predict.py, pretrain.py, quickstart.py and
the Python API) given bad files, paths, images, configs and checkpoints ends in one line naming what
to fix, a non-zero exit and no traceback; where the right answer is to work (a thin image, an
EXIF-rotated photo), it works. The entry points run in-process through ``run_main``, as their
``__main__`` does; one subprocess checks a loader worker's error as a user sees it."""
import io
import json
import os
import shutil
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import predict
import pretrain
import quickstart
import test as test_py
import train
from datasets import check_training_file, image_size, letterbox_image, read_image
from models import build_model
from models.reference_keys import detector_weight_file_state_dict
from test_pipeline import overrides
from utils.checkpoint import load_checkpoint, prepare_run_folder
from utils.cli import USER_ERRORS, run_main
from utils.config import ConfigError, config_from_dict
from utils.predictor import Predictor
from utils.run_lock import LOCK_NAME, RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATIN1_YAML = "# réglages\nTRAIN:\n  EPOCHS: 1\n".encode("latin-1")
LIST_SECTION_YAML = "TRAIN:\n  - EPOCHS: 1\n"


def cli(module, *argv):
    """Run ``module``'s command line in-process; (exit code, stdout, stderr)."""
    saved = sys.argv
    sys.argv = [f"{module.__name__}.py", *map(str, argv)]
    out, err = io.StringIO(), io.StringIO()
    saved_streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        with pytest.raises(SystemExit) as stop:
            run_main(module.main, module.get_args_parser())
    finally:
        sys.argv = saved
        sys.stdout, sys.stderr = saved_streams
    return stop.value.code, out.getvalue(), err.getvalue()


def one_line(result, *words):
    """The last line on stderr: the error, naming ``words``; a non-zero exit and no traceback."""
    code, out, err = result
    assert code not in (0, None), (out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    for word in words:
        assert str(word) in last, last
    return last


def tiny_args(tiny, *extra, logs="logs"):  # noqa: F811
    return overrides(tiny[0], tiny, "EPOCHS=1", *extra, logs=logs)


@pytest.fixture(scope="module")
def trained(tiny):  # noqa: F811
    code, out, err = cli(train, "--config", "config/refcoco.yaml", *tiny_args(tiny, logs="trained"))
    assert code == 0, err
    return tiny[0] / "trained" / "last.pth"


def latin1_copy(path, folder):
    """``path``'s text saved in latin-1 with an accented word added where it stays valid."""
    text = open(path, encoding="utf-8").read().replace("the red square", "the rouge carré")
    out = os.path.join(folder, "latin1_" + os.path.basename(path))
    with open(out, "wb") as f:
        f.write(text.encode("latin-1"))
    return out


# Configs: every entry point reads one the same way.

@pytest.mark.parametrize("content, words", [(LATIN1_YAML, ["is not UTF-8", "line 1", "save it as UTF-8"]),
                                            (LIST_SECTION_YAML.encode(), ["section TRAIN", "got a list"])])
def test_a_bad_config_is_one_line_from_every_entry_point(tmp_path, trained, content, words):
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    image = tmp_path / "a.jpg"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    for module, argv in ((train, []), (pretrain, []), (quickstart, []),
                         (test_py, ["--eval-weights", trained]),
                         (predict, ["--weights", trained, "--image", image, "--expr", "red"])):
        one_line(cli(module, "--config", config, *argv), config, *words)


def test_a_latin1_config_is_refused_by_the_python_api(tmp_path, trained):
    config = tmp_path / "bad.yaml"
    config.write_bytes(LATIN1_YAML)
    with pytest.raises(ConfigError, match="is not UTF-8"):
        Predictor.from_checkpoint(str(trained), "cpu", str(config))


# Text files: annotations, pseudo-labels, prediction input lists.

def test_latin1_annotation_and_pseudo_label_files_are_refused(tiny, tmp_path):  # noqa: F811
    root, ann, images = tiny
    bad = latin1_copy(ann, tmp_path)
    one_line(cli(train, "--config", "config/refcoco.yaml", *tiny_args(tiny, f"ANN_PATH={{synthetic: {bad}}}")),
             bad, "annotation file", "not UTF-8")
    one_line(cli(train, "--config", "config/refcoco.yaml", *tiny_args(tiny, f"TRAIN_ANN_PATH={bad}")),
             bad, "not UTF-8")


def test_latin1_prediction_inputs_are_refused(tiny, tmp_path, trained):  # noqa: F811
    images = tiny[2]
    exprs = tmp_path / "exprs.tsv"
    exprs.write_bytes("1.jpg\tle carré rouge\n".encode("latin-1"))
    one_line(cli(predict, "--weights", trained, "--image-dir", images, "--exprs-file", exprs), exprs, "line 1")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(json.dumps({"image": f"{images}/1.jpg", "expression": "carré"}, ensure_ascii=False)
                      .encode("latin-1"))
    one_line(cli(predict, "--weights", trained, "--input", pairs), pairs, "not UTF-8")


def test_latin1_detection_annotations_are_refused(tiny, tmp_path):  # noqa: F811
    det = tmp_path / "instances.json"
    det.write_bytes('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "carré"}]}'
                    .encode("latin-1"))
    one_line(cli(pretrain, "--config", "config/synthetic/quickstart.yaml", *tiny_args(tiny, f"DET_ANN_PATH={det}",
                                                                           f"DET_VAL_ANN_PATH={det}",
                                                                           f"DET_LOG_PATH={tmp_path / 'det'}",
                                                                           f"DET_OUTPUT={tmp_path / 'd.pth'}")),
             det, "not UTF-8")


# Paths of the wrong kind.

def test_paths_of_the_wrong_kind_are_named_before_anything_runs(tiny, tmp_path, trained):  # noqa: F811
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    one_line(cli(train, "--config", "config/refcoco.yaml", *tiny_args(tiny), f"LOG_PATH={a_file}/run"),
             "LOG_PATH", a_file)
    one_line(cli(pretrain, "--config", "config/synthetic/quickstart.yaml", f"DET_LOG_PATH={a_file}",
                 f"DET_OUTPUT={tmp_path / 'd.pth'}"), "DET_LOG_PATH")
    one_line(cli(pretrain, "--config", "config/synthetic/quickstart.yaml", f"DET_OUTPUT={a_file}/d.pth"), "DET_OUTPUT")
    one_line(cli(quickstart, "--workdir", a_file), "--workdir", a_file)
    one_line(cli(test_py, "--eval-weights", trained, "--out-json", tmp_path), "--out-json", "is a folder")
    one_line(cli(test_py, "--eval-weights", trained, "--export-pseudo-labels", f"{a_file}/p.json"),
             "--export-pseudo-labels", a_file)
    image = f"{tiny[2]}/1.jpg"
    one_line(cli(predict, "--weights", trained, "--image", image, "--expr", "red", "--out-json", tmp_path),
             "--out-json", "is a folder")
    one_line(cli(predict, "--weights", trained, "--image", image, "--expr", "red", "--out-dir", a_file),
             "--out-dir", a_file)


# Images.

def test_a_thin_image_is_letterboxed_and_predicted(trained):
    for shape in ((1, 600, 3), (600, 1, 3)):
        square, (h, w, nh, nw, dx, dy) = letterbox_image(np.full(shape, 200, np.uint8), 64)
        assert square.shape == (64, 64, 3) and min(nh, nw) == 1 and max(nh, nw) == 64
        assert (square[dy:dy + nh, dx:dx + nw] == 200).all()
    predictor = Predictor.from_checkpoint(str(trained), "cpu")
    [prediction] = predictor.predict(np.full((1, 600, 3), 200, np.uint8), "red")
    x1, y1, x2, y2 = prediction.box
    assert 0 <= x1 <= x2 <= 600 and 0 <= y1 <= y2 <= 1


def exif_jpeg(path, pixels, orientation):
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, "PNG" if str(path).endswith(".png") else "JPEG", exif=exif.tobytes(), quality=100)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied_as_pillow_shows_the_photo(tmp_path, suffix):
    pixels = np.zeros((6, 10, 3), np.uint8)
    pixels[:3, :2] = 255  # a mark in the top-left corner tells every orientation apart
    for orientation in range(1, 9):
        path = tmp_path / f"o{orientation}{suffix}"
        exif_jpeg(path, pixels, orientation)
        with Image.open(path) as raw:
            expected = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))[..., ::-1]
        image = read_image(path)
        assert image.shape == expected.shape and image_size(path) == (image.shape[1], image.shape[0])
        # JPEG blurs the mark's edge; the tolerance is half the range.
        assert np.abs(image.astype(int) - expected.astype(int)).max() < 128, orientation


def test_pseudo_labels_of_a_rotated_photo_pass_their_check(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    exif_jpeg(images / "1.jpg", np.zeros((200, 40, 3), np.uint8), 6)  # stored 40 wide, shown 200 wide
    entry = {"iid": 1, "bbox": [150.0, 5.0, 45.0, 30.0], "cat_id": 0, "refs": ["right"], "mask_id": 0}
    original = tmp_path / "anns.json"
    original.write_text(json.dumps({"train": [dict(entry, bbox=[0.0, 0.0, 1.0, 1.0])], "val": [entry]}))
    pseudo = tmp_path / "pseudo.json"
    pseudo.write_text(json.dumps({"train": [entry], "val": [entry]}))
    check_training_file(str(pseudo), str(original), "train", "synthetic", str(images))


def test_an_undecodable_image_in_a_loader_worker_is_one_line(tiny, tmp_path):  # noqa: F811
    root, ann, images = tiny
    copy = tmp_path / "images"
    shutil.copytree(images, copy)
    (copy / "3.jpg").write_bytes(b"not a jpeg")
    argv = ["--config", "config/refcoco.yaml",
            *tiny_args(tiny, f"IMAGE_PATH={{synthetic: {copy}}}", "NUM_WORKER=1", f"LOG_PATH={tmp_path / 'logs'}")]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    one_line((proc.returncode, proc.stdout, proc.stderr), copy / "3.jpg", "of entry train[", ann)
    assert "Original" not in proc.stderr and proc.stderr.count("error:") == 1, proc.stderr


def test_a_missing_training_image_stops_the_pseudo_label_export_first(tiny, tmp_path, trained):  # noqa: F811
    root, ann, images = tiny
    copy = tmp_path / "images"
    shutil.copytree(images, copy)
    os.remove(copy / "1.jpg")  # a training image
    out = tmp_path / "pseudo.json"
    code, stdout, err = cli(test_py, "--eval-weights", trained, "--export-pseudo-labels", out,
                            f"IMAGE_PATH={{synthetic: {copy}}}", "SKIP_BAD_IMAGES=true")
    one_line((code, stdout, err), "entries of 'train'", copy / "1.jpg", "lack their image")
    assert "Acc@0.5" not in stdout and not out.exists()


# A device that is not there.

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tiny, trained, tmp_path):  # noqa: F811
    one_line(cli(train, "--config", "config/refcoco.yaml", "--device", "cuda", *tiny_args(tiny)), "--device cuda")
    one_line(cli(test_py, "--eval-weights", trained, "--device", "cuda"), "--device cuda", "--device cpu")
    one_line(cli(predict, "--weights", trained, "--image", f"{tiny[2]}/1.jpg", "--expr", "red", "--device",
                 "cuda:0"), "--device cuda:0")
    with pytest.raises(ConfigError, match="no usable CUDA"):
        Predictor.from_checkpoint(str(trained), "cuda")


# Resumes, locks and checkpoints.

def test_resume_with_another_model_names_each_changed_key(tiny, trained):  # noqa: F811
    resume = ["--config", "config/refcoco.yaml", "--resume", trained]
    last = one_line(cli(train, *resume, *tiny_args(tiny, "SELECT_NUM=2", "HIDDEN_SIZE=16", logs="trained")),
                    "SELECT_NUM (2 here, 3 in training)", "HIDDEN_SIZE (16 here, 32 in training)",
                    "--allow-config-change")
    assert "vocabulary" not in last
    one_line(cli(train, *resume, *tiny_args(tiny, "ARCH=student", logs="trained")), "ARCH 'student'",
             "'weak' model")


def test_a_run_folder_is_owned_by_one_run(tmp_path, tiny):  # noqa: F811
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                "started": "now", "command": "train.py --config x"}))
    last = one_line(cli(train, "--config", "config/refcoco.yaml", *tiny_args(tiny), f"LOG_PATH={folder}"),
                    "in use by another run", f"pid {os.getpid()}", "train.py --config x")
    assert str(folder / LOCK_NAME) in last and (folder / LOCK_NAME).exists()

    with RunLock(str(tmp_path / "free"), "LOG_PATH") as lock:
        os.makedirs(lock.folder)
        lock.acquire()
        with pytest.raises(ConfigError, match="in use by another run"):
            RunLock(lock.folder, "LOG_PATH").acquire()
    assert not os.path.exists(lock.path)


def test_a_stale_lock_and_partial_checkpoints_are_cleared_with_a_message(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    (folder / "last.pth").write_bytes(b"complete")
    partial = folder / "last.pth.abc123.tmp"
    partial.write_bytes(b"partial")
    with prepare_run_folder(str(folder), "LOG_PATH", [str(folder / "last.pth")], str(folder / "last.pth"), False):
        owner = json.loads((folder / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"taking over {folder / LOCK_NAME}" in err and f"pid {dead.pid}" in err
    assert f"removed {partial}" in err and not partial.exists()
    assert (folder / "last.pth").read_bytes() == b"complete" and not (folder / LOCK_NAME).exists()


def test_a_detector_weight_file_given_as_a_model_is_named(tiny, trained, tmp_path):  # noqa: F811
    ckpt = load_checkpoint(str(trained))
    cfg = config_from_dict(ckpt["config"])
    model = build_model(cfg, None, len(ckpt["vocab"]))
    detector = tmp_path / "yolov3.pth"
    torch.save(detector_weight_file_state_dict(model.visual_encoder), detector)
    one_line(cli(test_py, "--config", "config/refcoco.yaml", "--eval-weights", detector, *tiny_args(tiny)),
             detector, "detector weights only", "PRETRAIN_WEIGHT")
    for result in (cli(predict, "--weights", detector, "--image", f"{tiny[2]}/1.jpg", "--expr", "red"),
                   cli(test_py, "--eval-weights", detector)):
        one_line(result, detector, "detector weights only")


def test_damaged_and_missing_checkpoints_are_one_line(tiny, trained, tmp_path):  # noqa: F811
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(trained.read_bytes()[:1000])
    one_line(cli(test_py, "--eval-weights", damaged), damaged, "damaged")
    one_line(cli(train, "--config", "config/refcoco.yaml", "--resume", damaged, *tiny_args(tiny)), damaged)
    one_line(cli(predict, "--weights", tmp_path / "absent.pth", "--image", f"{tiny[2]}/1.jpg", "--expr", "red"),
             "absent.pth")
    with pytest.raises(USER_ERRORS, match="damaged"):
        Predictor.from_checkpoint(str(damaged))
