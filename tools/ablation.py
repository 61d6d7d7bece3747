"""Ablation of the ACCV 2024 components on one config: RefCLIP, +CMA, +FNS, +ER, full (and the CMA rows
again with CMA_CONDITION=query), FNS+ER (the quickstart's model); then APL's parts on RefCLIP:
+position, +colour, +category prompts, +recon(struction), +alignment, all of them (apl), and all of
them on the quickstart's model (apl+fns+er); the last two again with every quirk of APL's code switched to
the intended computation (apl-intended, apl+fns+er-intended); and beyond the published methods, the
quickstart's model with the anchor geometry, the within-image referent contrast, both, the
co-referent agreement, and all three (fns+er+geometry, fns+er+referent, fns+er+geometry+referent,
fns+er+agreement, fns+er+geometry+referent+agreement).

    python -m tools.ablation --config config/synthetic/quickstart.yaml [KEY=VALUE ...]

Trains each variant with train.py into LOG_PATH/ablation/<variant> (reusing finished runs), evaluates
it with test.py and prints one table of Acc@0.5 per split; the table is also written as
LOG_PATH/ablation/results.json. The detector weights (PRETRAIN_WEIGHT) must exist: run the
quickstart (or pretrain.py) first.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from utils.checkpoint import completed_epochs
from utils.cli import run_python
from utils.config import load_config

# Each variant adds one component to RefCLIP (one expression per sample, contrastive loss only);
# 'full' is the ACCV 2024 model: all three, three expressions per sample. The '-query' rows condition
# the CMA on the expression being scored instead of the image's own (CMA_CONDITION); 'fns+er' is the
# quickstart's model. The APL rows add one part of APL (ECCV 2024) each to RefCLIP, 'apl' all of them,
# 'apl+fns+er' all of them to the quickstart's model (the config's DETECTOR_CLASS_NAMES and
# APL_ALIGN_BURN_IN apply). APL's rows compute what APL's code computes, quirks included; the
# '-intended' rows switch every quirk to the computation APL's paper describes.
REFCLIP = ["USE_CMA=false", "NUM_REFS=1", "FNS_WEIGHT=0.0", "ER_WEIGHT=0.0"]
# RefCLIP + FNS + ER with three expressions per sample and no CMA: what config/synthetic/quickstart.yaml trains.
DEMO = ["USE_CMA=false", "NUM_REFS=3", "FNS_WEIGHT=0.1", "ER_WEIGHT=0.1"]
APL_ON = ["APL_POSITION_PROMPT=true", "APL_COLOUR_PROMPT=true", "APL_CATEGORY_PROMPT=true", "APL_RECON_WEIGHT=1.0",
          "APL_ALIGNMENT=true"]
APL_OFF = ["APL_POSITION_PROMPT=false", "APL_COLOUR_PROMPT=false", "APL_CATEGORY_PROMPT=false",
           "APL_RECON_WEIGHT=0.0", "APL_ALIGNMENT=false"]
# Every quirk of APL's code switched to the computation APL's paper describes (docs: APL).
APL_INTENDED = ["APL_UNNORMALIZE=per_channel", "APL_COLOUR_EMPTY_BOX=one_pixel", "APL_TAG_WORDS=tokens",
                "APL_POSITION_SIDE=0", "APL_SCATTER_ORDER=grid", "APL_RECON_ANCHOR=own", "APL_HEAD_OBJ_PRIOR=0.01",
                "APL_BURN_IN_COUNT=training_steps"]
# Beyond the published methods (docs/referents.md): an image's entries batched together, its
# referents kept off each other's anchor.
REFERENTS = ["GROUP_BY_IMAGE=true", "REFERENT_WEIGHT=1.0"]
VARIANTS = {
    "refclip": [*APL_OFF, *REFCLIP],
    "+cma": [*APL_OFF, "USE_CMA=true", "CMA_CONDITION=own", "NUM_REFS=1", "FNS_WEIGHT=0.0", "ER_WEIGHT=0.0"],
    "+fns": [*APL_OFF, "USE_CMA=false", "NUM_REFS=1", "FNS_WEIGHT=0.1", "ER_WEIGHT=0.0"],
    "+er": [*APL_OFF, "USE_CMA=false", "NUM_REFS=1", "FNS_WEIGHT=0.0", "ER_WEIGHT=0.1"],
    "full": [*APL_OFF, "USE_CMA=true", "CMA_CONDITION=own", "NUM_REFS=3", "FNS_WEIGHT=0.1", "ER_WEIGHT=0.1"],
    "+cma-query": [*APL_OFF, "USE_CMA=true", "CMA_CONDITION=query", "NUM_REFS=1", "FNS_WEIGHT=0.0",
                   "ER_WEIGHT=0.0"],
    "full-query": [*APL_OFF, "USE_CMA=true", "CMA_CONDITION=query", "NUM_REFS=3", "FNS_WEIGHT=0.1",
                   "ER_WEIGHT=0.1"],
    "fns+er": [*APL_OFF, *DEMO],
    "+position": [*APL_OFF, *REFCLIP, "APL_POSITION_PROMPT=true"],
    "+colour": [*APL_OFF, *REFCLIP, "APL_COLOUR_PROMPT=true"],
    "+category": [*APL_OFF, *REFCLIP, "APL_CATEGORY_PROMPT=true"],
    "+recon": [*APL_OFF, *REFCLIP, "APL_RECON_WEIGHT=1.0"],
    "+alignment": [*APL_OFF, *REFCLIP, "APL_ALIGNMENT=true"],
    "apl": [*REFCLIP, *APL_ON],
    "apl+fns+er": [*DEMO, *APL_ON],
    "fns+er+geometry": [*APL_OFF, *DEMO, "ANCHOR_GEOMETRY=true"],
    "fns+er+referent": [*APL_OFF, *DEMO, *REFERENTS],
    "fns+er+geometry+referent": [*APL_OFF, *DEMO, "ANCHOR_GEOMETRY=true", *REFERENTS],
    "fns+er+agreement": [*APL_OFF, *DEMO, "AGREEMENT_WEIGHT=0.1"],
    "fns+er+geometry+referent+agreement": [*APL_OFF, *DEMO, "ANCHOR_GEOMETRY=true", *REFERENTS,
                                           "AGREEMENT_WEIGHT=0.1"],
    "apl-intended": [*REFCLIP, *APL_ON, *APL_INTENDED],
    "apl+fns+er-intended": [*DEMO, *APL_ON, *APL_INTENDED],
}


def run(script: str, *args: str) -> None:
    if run_python([script, *args]) != 0:
        sys.exit(f"ablation: {script} {' '.join(args)} failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/synthetic/quickstart.yaml")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset, in order")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    unknown = [name for name in args.variants.split(",") if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    cfg = load_config(args.config, args.overrides)
    folder = os.path.join(cfg.LOG_PATH, "ablation")
    table = {}
    for name in args.variants.split(","):
        logs = os.path.join(folder, name)
        overrides = [*args.overrides, *VARIANTS[name], f"LOG_PATH={logs}"]
        last = os.path.join(logs, "last.pth")
        if completed_epochs(last) < cfg.EPOCHS:
            resume = ["--resume", last] if os.path.isfile(last) else []
            run("train.py", "--config", args.config, *resume, *overrides)
        out = os.path.join(logs, "results.json")
        run("test.py", "--config", args.config, "--eval-weights", os.path.join(logs, "best.pth"),
            "--out-json", out, *overrides)
        with open(out) as f:
            table[name] = json.load(f)
    splits = list(next(iter(table.values())))
    width = max(len("variant"), *map(len, table)) + 1
    print(f"{'variant':<{width}}" + "".join(f"{s:>9}" for s in splits))
    for name, results in table.items():
        print(f"{name:<{width}}" + "".join(f"{results[s]['acc']:>9.2f}" for s in splits))
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(table, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
