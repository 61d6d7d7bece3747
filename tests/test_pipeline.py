"""train.py / test.py / predict.py end to end on a tiny dataset, as a user runs them."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import cv2
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.ops import box_iou

from tiny_data import tiny_cli_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, check=True, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def overrides(root, tiny, *extra, logs="logs"):
    _, ann, images = tiny
    return [*tiny_cli_overrides(str(root), ann, images), f"LOG_PATH={root / logs}", *extra]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for key in ("state_dict", "model"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}.{name} differs"


def test_train_evaluate_resume_visualize_export_predict(tiny):
    root, ann, images = tiny
    args = overrides(root, tiny, logs="e2e")
    out = run("train.py", "--config", "config/refcoco.yaml", *args)
    logs = root / "e2e"
    assert {"last.pth", "best.pth", "config.yaml"} <= set(os.listdir(logs))
    assert any(name.startswith("train_") and name.endswith(".log") for name in os.listdir(logs))
    events = EventAccumulator(str(logs / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    # Validation at the global step of each epoch's end, beside the losses; a contact sheet each time.
    assert [e.step for e in events.Scalars("val/val_acc")] == [4, 8]
    assert max(e.step for e in events.Scalars("train/loss")) == 8
    assert [e.step for e in events.Images("val/val_predictions")] == [4, 8]
    last = weights(logs / "last.pth")
    assert last["epoch"] == 2 and last["step"] == 2 * 4 and last["vocab"][:3] == ["PAD", "UNK", "CLS"]
    assert "val Acc@0.5" in out.stdout

    result_json = root / "acc.json"
    out = run("test.py", "--config", "config/refcoco.yaml", "--eval-weights", str(logs / "best.pth"),
              "--out-json", str(result_json), "--visualize", "3", "--vis-dir", str(root / "vis"),
              "--export-pseudo-labels", str(root / "pseudo.json"), "--baselines", *args)
    results = json.loads(result_json.read_text())
    data = json.loads(open(ann).read())
    baselines = results.pop("baselines")
    assert set(results) == {"val", "testA", "testB"}
    assert set(baselines) == {"random_anchor", "most_confident_anchor"}
    assert all(baselines[kind][s]["n"] == results[s]["n"] for kind in baselines for s in results)
    assert all(results[s]["n"] == len(data[s]) and 0 <= results[s]["acc"] <= 100 for s in results)
    drawn = sorted(os.listdir(root / "vis"))
    assert "testB" in out.stdout and len(drawn) == 4 and drawn[0] == "contact_sheet.png"
    pseudo = json.loads((root / "pseudo.json").read_text())
    assert len(pseudo["train"]) == len(data["train"]) and pseudo["val"] == data["val"]
    # The labels' agreement with the file's own boxes, as printed, is what the written file holds.
    printed = float(re.search(r"([\d.]+) % of them within IoU 0.5", out.stdout).group(1))
    given, labels = (torch.tensor([e["bbox"] for e in d["train"]], dtype=torch.float64) for d in (data, pseudo))
    given[:, 2:] += given[:, :2]
    labels[:, 2:] += labels[:, :2]
    overlaps = box_iou(given, labels).diagonal() > 0.5
    assert printed == pytest.approx(100 * overlaps.double().mean().item(), abs=0.01)
    assert [e["refs"] for e in pseudo["train"]] == [e["refs"] for e in data["train"]]
    assert pseudo["train"][0]["bbox"] != data["train"][0]["bbox"]
    for entry in pseudo["train"]:  # pseudo-labels lie inside their image
        h, w = cv2.imread(os.path.join(images, f"{entry['iid']}.jpg")).shape[:2]
        x, y, bw, bh = entry["bbox"]
        assert 0 <= x and 0 <= y and bw >= 0 and bh >= 0 and x + bw <= w + 1e-6 and y + bh <= h + 1e-6

    run("train.py", "--config", "config/refcoco.yaml", "--resume", str(logs / "last.pth"), *args, "EPOCHS=3")
    assert weights(logs / "last.pth")["epoch"] == 3

    out = run("predict.py", "--weights", str(logs / "last.pth"), "--image", os.path.join(images, "3.jpg"),
              "--expr", "the red square", "--out-dir", str(root / "drawn"))
    assert " box " in out.stdout and os.listdir(root / "drawn") == ["00001_3.png"]


def _train_until(args, condition, sig):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--config", "config/refcoco.yaml",
                             *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=300)
    return proc.returncode, output


def _epoch_of(path):
    try:
        return weights(path)["epoch"] if os.path.exists(path) else -1
    except Exception:
        return -1


# The last case batches an image's entries together (GROUP_BY_IMAGE) with the referent contrast and
# the anchor geometry on: the grouped order must replay as exactly as the plain one.
GROUPED = ("GROUP_BY_IMAGE=true", "REFERENT_WEIGHT=1.0", "ANCHOR_GEOMETRY=true")


@pytest.mark.parametrize("sig, extra", [(signal.SIGKILL, ()), (signal.SIGINT, ()), (signal.SIGINT, GROUPED)],
                         ids=["sigkill", "ctrl-c", "ctrl-c-grouped"])
def test_interrupted_run_resumes_to_identical_results(tiny, sig, extra):
    root, _, _ = tiny
    name = f"resume_{sig.name}{'_grouped' if extra else ''}"
    reference = overrides(root, tiny, "EPOCHS=3", "PRINT_FREQ=1", *extra, logs=f"{name}_ref")
    run("train.py", "--config", "config/refcoco.yaml", *reference)

    args = overrides(root, tiny, "EPOCHS=3", "PRINT_FREQ=1", *extra, logs=name)
    last = root / name / "last.pth"
    if sig == signal.SIGKILL:
        code, output = _train_until(args, lambda: _epoch_of(last) == 1, sig)
        assert code == -signal.SIGKILL
        assert weights(last)["epoch"] == 1 and weights(last)["batch_in_epoch"] == 0
    else:
        # Ctrl-C once step 6 (mid epoch 2) is logged: the run saves where it stopped and exits.
        code, output = _train_until(args, lambda: _logged_step(root / name, 6), sig)
        assert code == 130, output[-2000:]
        assert weights(last)["batch_in_epoch"] > 0
    run("train.py", "--config", "config/refcoco.yaml", "--resume", str(last), *args)
    assert_same_weights(weights(last), weights(root / f"{name}_ref" / "last.pth"))
    assert weights(last)["best_acc"] == weights(root / f"{name}_ref" / "last.pth")["best_acc"]


def _logged_step(folder, step):
    if not os.path.isdir(folder):
        return False
    for name in os.listdir(folder):
        if name.endswith(".log") and f"step {step}:" in open(os.path.join(folder, name)).read():
            return True
    return False


def test_two_process_ddp_train_and_exact_evaluation_count(tiny):
    root, ann, _ = tiny
    args = overrides(root, tiny, "EPOCHS=1", logs="ddp")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    subprocess.run([*torchrun, "train.py", "--config", "config/refcoco.yaml", "--device", "cpu", *args],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    result_json = root / "ddp_acc.json"
    proc = subprocess.run([*torchrun, "test.py", "--config", "config/refcoco.yaml", "--device", "cpu",
                           "--eval-weights", str(root / "ddp" / "last.pth"), "--out-json", str(result_json),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(open(ann).read())
    results = json.loads(result_json.read_text())
    assert {s: r["n"] for s, r in results.items()} == {s: len(data[s]) for s in ("val", "testA", "testB")}
    assert any(len(data[s]) % 2 for s in results), "the test needs an odd split to catch padding"
