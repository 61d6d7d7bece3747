"""The quickstart in miniature, as a newcomer runs it: every stage, then reuse on a second run."""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quickstart(workdir, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "quickstart.py", "--mini", "--workdir", str(workdir), "--visualize", "2",
                           *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_mini_quickstart_runs_every_stage_then_reuses_them(tmp_path):
    first = _quickstart(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    last_line = first.stdout.strip().splitlines()[-1]
    assert last_line.startswith("results: ")
    results = json.loads(open(last_line[len("results: "):]).read())
    splits = [s for s in results if s != "baselines"]
    assert set(splits) == {"val", "testA", "testB"}
    assert set(results["baselines"]) == {"random_anchor", "most_confident_anchor"}
    for split in splits:
        assert results[split]["n"] > 0 and 0 <= results[split]["acc"] <= 100
    assert (tmp_path / "yolov3_synthetic.pth").exists()
    drawn = sorted(os.listdir(tmp_path / "logs" / "vis"))
    assert len(drawn) == 3 and drawn[0] == "contact_sheet.png"
    assert drawn[1].split("_iid")[1] != drawn[2].split("_iid")[1], "two drawings of one image"
    for stage in ("== data", "== detector", "== train", "== evaluate"):
        assert stage in first.stdout

    # The diagnosis tool scores the same model on val as test.py did, and no choice of anchor beats
    # the ceiling it reports; the probe splits the quickstart made hold only their kind of expression.
    data = tmp_path / "data"
    diagnosis = subprocess.run(
        [sys.executable, "-m", "tools.diagnose_synthetic", "--eval-weights", str(tmp_path / "logs" / "best.pth"),
         "--split", "val,position,size", "--out-json", str(tmp_path / "by_kind.json"),
         f"ANN_PATH={{synthetic: {data}/anns/synthetic.json}}", f"IMAGE_PATH={{synthetic: {data}/images}}",
         "INPUT_SHAPE=[96, 96]", "SELECT_NUM=4", "BATCH_SIZE=4", "NUM_WORKER=0"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert diagnosis.returncode == 0, diagnosis.stderr[-3000:]
    tables = diagnosis.stdout.strip().split("\n\n")
    titles = [table.splitlines()[0].split("(Acc@0.5, ")[1].split(";")[0] for table in tables]
    assert titles == ["val", "position", "size"]
    assert "95 % CI: Wilson score interval" in tables[0].splitlines()[0]
    name, n, ceiling, acc, low, high = tables[0].splitlines()[-1].split()
    assert name == "all" and int(n) == results["val"]["n"]
    assert abs(float(acc) - results["val"]["acc"]) < 0.01
    assert float(low.strip("[,")) <= float(acc) <= float(high.strip("]"))
    assert float(acc) <= float(ceiling)
    assert float(ceiling) >= max(b["val"]["acc"] for b in results["baselines"].values())
    by_kind = json.loads((tmp_path / "by_kind.json").read_text())
    probes = json.loads((data / "anns" / "probe.json").read_text())
    assert set(by_kind) == {"val", "position", "size"}
    assert by_kind["val"]["all"]["n"] == results["val"]["n"]
    for split in ("position", "size"):
        assert set(by_kind[split]) == {split, "all"}
        assert by_kind[split]["all"]["n"] == len(probes[split]) > 0
        low, high = by_kind[split]["all"]["ci95"]
        assert 0 <= low <= by_kind[split]["all"]["acc"] <= high <= 100

    # RefCLIP's scheme on the quickstart's weak model: pseudo-labels, the student on them and on the
    # ground truth, one table and the breakdown by kind of expression; here with two rounds of
    # self-training and the switches of the export and of the students passed through.
    scheme_args = ("--student", "--rounds", "2", "--export-overrides", "PSEUDO_LABEL_ASSIGNMENT=joint",
                   "--student-overrides", "PSEUDO_LABEL_WEIGHTING=margin", "POSITION_WORDS=lexicon", "EPOCHS=2")
    scheme = _quickstart(tmp_path, *scheme_args)
    assert scheme.returncode == 0, scheme.stdout[-3000:] + scheme.stderr[-3000:]
    last_line = scheme.stdout.strip().splitlines()[-1]
    assert last_line.startswith("results: ")
    table = json.loads(open(last_line[len("results: "):]).read())
    assert set(table) == {"weak", "student_pseudo", "student_gt", "baselines", "by_kind", "student_rounds"}
    rounds = table["student_rounds"]
    assert [row["round"] for row in rounds] == [1, 2] and rounds[0]["scores"] == table["student_pseudo"]
    assert rounds[1]["labels"] == str(tmp_path / "logs_student" / "labels_round2.json")
    assert all(0 <= row["labels_agree"] <= 100 for row in rounds) and "student, round 2" in scheme.stdout
    assert "the joint assignment gave" in scheme.stdout
    trained = {name: torch.load(tmp_path / "logs_student" / name / "last.pth", weights_only=True)
               for name in ("student_pseudo", "student_round2", "student_gt")}
    assert all(ckpt["epoch"] == 2 for ckpt in trained.values())
    assert [ckpt["config"]["DATA"]["PSEUDO_LABEL_WEIGHTING"] for ckpt in trained.values()] == ["margin", "margin", "none"]
    assert all(ckpt["config"]["MODEL"]["POSITION_WORDS"] == "lexicon" for ckpt in trained.values())
    again = _quickstart(tmp_path, *scheme_args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "== pseudo-labels: reusing" in again.stdout and "== train student_round2: reusing" in again.stdout
    assert "--export-pseudo-labels" not in again.stdout
    assert table["weak"] == {split: results[split] for split in splits}
    for name in ("student_pseudo", "student_gt"):
        assert {split: row["n"] for split, row in table[name].items()} == {split: results[split]["n"] for split in splits}
        assert table["by_kind"][name]["all"]["n"] == results["val"]["n"]
        assert table["by_kind"][name]["all"]["ceiling"] is None
        assert abs(table["by_kind"][name]["all"]["acc"] - table[name]["val"]["acc"]) < 0.01
    pseudo = json.loads((tmp_path / "data" / "anns" / "synthetic_pseudo.json").read_text())
    original = json.loads((tmp_path / "data" / "anns" / "synthetic.json").read_text())
    assert [e["iid"] for e in pseudo["train"]] == [e["iid"] for e in original["train"]]
    assert "student, pseudo-labels" in scheme.stdout and "by kind of expression" in scheme.stdout

    second = _quickstart(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "== detector: reusing" in second.stdout and "== train: reusing" in second.stdout

    # Data newer than the detector (regenerated since): the detector and the REC model are made again.
    detector = tmp_path / "yolov3_synthetic.pth"
    later = os.path.getmtime(detector) + 10
    os.utime(tmp_path / "data" / "manifest.json", (later, later))
    third = _quickstart(tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "== detector: pretrain.py" in third.stdout and "== train: train.py" in third.stdout
    assert "--resume" not in third.stdout
    assert os.path.getmtime(detector) > later - 10
