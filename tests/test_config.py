import pytest

from tools.ablation import VARIANTS
from utils.config import ConfigError, default_config, load_config, parse_override

DATASETS = ["refcoco", "refcoco+", "refcocog", "referit"]
# The ACCV model keeps the reference's file names; every other method has a folder of one file per dataset.
CONFIGS = DATASETS + [f"{method}/{dataset}" for method in ("refclip", "apl") for dataset in DATASETS]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_load(name):
    cfg = load_config(f"config/{name}.yaml")
    assert cfg.HIDDEN_SIZE == 512
    assert cfg.INPUT_SHAPE == [416, 416]


def test_reference_hyperparameters():
    coco = load_config("config/refcoco.yaml")
    assert (coco.LR, coco.BATCH_SIZE, coco.EPOCHS, coco.SEED) == (1e-4, 64, 25, 1234)
    assert (coco.N_SA, coco.SELECT_NUM, coco.CLASS_NUM, coco.MAX_TOKEN) == (3, 17, 80, 15)
    assert coco.SPP_KERNELS == [5, 9, 13]
    referit = load_config("config/referit.yaml")
    assert (referit.N_SA, referit.SELECT_NUM, referit.CLASS_NUM, referit.MAX_TOKEN) == (1, 34, 100, 20)
    assert referit.SEED == 123456
    for dataset in DATASETS:
        refclip, accv = load_config(f"config/refclip/{dataset}.yaml"), load_config(f"config/{dataset}.yaml")
        assert (refclip.USE_CMA, refclip.NUM_REFS, refclip.FNS_WEIGHT, refclip.ER_WEIGHT) == (False, 1, 0.0, 0.0)
        assert (refclip.DATASET, refclip.SELECT_NUM, refclip.CLASS_NUM) == (dataset, accv.SELECT_NUM, accv.CLASS_NUM)


def test_overrides_are_parsed_as_yaml():
    cfg = load_config("config/refcoco.yaml", ["LR=2e-4", "USE_CMA=false", "INPUT_SHAPE=[320, 320]"])
    assert cfg.LR == 2e-4 and cfg.USE_CMA is False and cfg.INPUT_SHAPE == [320, 320]


def test_unknown_key_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'HIDDEN_SIZE'"):
        load_config("config/refcoco.yaml", ["HIDEN_SIZE=256"])


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="'USE_CMA' must be a bool"):
        load_config(None, ["USE_CMA=1"])
    with pytest.raises(ConfigError, match="'LR' must be a float"):
        load_config(None, ["LR=fast"])


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  LR: 0.1\n")
    with pytest.raises(ConfigError, match="belongs in section TRAIN"):
        load_config(str(bad))
    bad.write_text("TRAINING:\n  LR: 0.1\n")
    with pytest.raises(ConfigError, match="unknown section 'TRAINING'"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_invalid_values_are_rejected():
    with pytest.raises(ConfigError, match="INPUT_SHAPE"):
        load_config(None, ["INPUT_SHAPE=[416, 320]"])
    with pytest.raises(ConfigError, match="SELECT_NUM \\(17\\) exceeds the 9 cells"):
        load_config(None, ["INPUT_SHAPE=[96, 96]"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("LR")
    with pytest.raises(ConfigError, match="CMA_CONDITION must be 'own' or 'query'"):
        load_config(None, ["CMA_CONDITION=pairwise"])
    for key in ("VIS_MIN_CHANNELS=-8", "DET_CLS_WEIGHT=-1.0"):
        with pytest.raises(ConfigError, match=f"{key.split('=')[0]} must not be negative"):
            load_config(None, [key])
    for kernels in ("[5, 9]", "[5, 8, 13]", "[0, 1, 1]"):
        with pytest.raises(ConfigError, match="SPP_KERNELS must be three odd positive sizes"):
            load_config(None, [f"SPP_KERNELS={kernels}"])


def test_dump_round_trip(tmp_path):
    cfg = load_config("config/referit.yaml", ["LR=3e-4"])
    cfg.dump(str(tmp_path / "c.yaml"))
    again = load_config(str(tmp_path / "c.yaml"))
    assert again.to_dict() == cfg.to_dict()
    assert default_config().to_dict() != again.to_dict()


def test_config_files_follow_the_naming_scheme():
    import glob
    import os
    found = {os.path.relpath(path, "config") for path in glob.glob("config/**/*", recursive=True)
             if os.path.isfile(path)}
    folders = {method: [f"{method}/{dataset}.yaml" for dataset in DATASETS]
               for method in ("refclip", "apl", "student")}
    expected = {"base.yaml", *(f"{dataset}.yaml" for dataset in DATASETS),
                *(path for paths in folders.values() for path in paths),
                *(f"{method}/README.md" for method in folders),
                "synthetic/quickstart.yaml", "synthetic/apl.yaml", "synthetic/student.yaml", "synthetic/referents.yaml",
                "synthetic/referents_student.yaml", "synthetic/README.md"}
    assert found == expected


def test_config_files_start_from_a_base_and_state_only_what_differs():
    import glob
    import os
    import yaml
    assert load_config("config/base.yaml").to_dict() == default_config().to_dict()
    for path in sorted(glob.glob("config/**/*.yaml", recursive=True)):
        with open(path) as f:
            own = yaml.safe_load(f)
        if path == "config/base.yaml":
            continue
        base = load_config(os.path.join(os.path.dirname(path), own.pop("_BASE_")))
        cfg = load_config(path)
        for keys in own.values():
            for key, value in keys.items():
                assert cfg[key] == value
                if key not in ("DATASET", "LOG_PATH"):  # stated for the reader even where equal
                    assert base[key] != value, f"{path} repeats {key} from its _BASE_"


def test_base_chain_replaces_keys_and_reports_loops(tmp_path):
    (tmp_path / "a.yaml").write_text("TRAIN:\n  LR: 0.5\n  EPOCHS: 7\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\nTRAIN:\n  LR: 0.25\n")
    cfg = load_config(str(tmp_path / "b.yaml"))
    assert (cfg.LR, cfg.EPOCHS) == (0.25, 7)
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(str(tmp_path / "b.yaml"))
    (tmp_path / "c.yaml").write_text("_BASE_: missing.yaml\n")
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(str(tmp_path / "c.yaml"))


def test_a_reference_yaml_with_removed_keys_names_what_to_delete(tmp_path):
    for section, key in (("MODEL", "VIS_ENC: darknet"), ("MODEL", "LANG_ENC: lstm"), ("DATA", "MASK_PATH: {}")):
        path = tmp_path / "reference.yaml"
        path.write_text(f"{section}:\n  {key}\n")
        with pytest.raises(ConfigError, match=f"'{key.split(':')[0]}' was removed: .*delete the line"):
            load_config(str(path))


def test_the_loaded_config_is_frozen_and_replace_checks():
    cfg = load_config("config/refcoco.yaml")
    with pytest.raises(ConfigError, match="frozen"):
        cfg.LR = 1.0
    cfg.ANCHORS.append([1, 1])  # a copy: the config itself does not change
    assert len(cfg.ANCHORS) == 9
    assert cfg.replace(LR=0.5).LR == 0.5 and cfg.LR == 1e-4
    with pytest.raises(ConfigError, match="BATCH_SIZE must be at least 1"):
        cfg.replace(BATCH_SIZE=0)


@pytest.mark.parametrize("override,message", [
    ("BATCH_SIZE=0", "BATCH_SIZE must be at least 1, got 0"),
    ("DET_BATCH_SIZE=0", "DET_BATCH_SIZE must be at least 1"),
    ("EPOCHS=0", "EPOCHS must be at least 1"),
    ("DET_EPOCHS=0", "DET_EPOCHS must be at least 1"),
    ("LR=-1e-4", "LR must be positive"),
    ("DET_LR=0.0", "DET_LR must be positive"),
    ("NUM_WORKER=-1", "NUM_WORKER must not be negative"),
    ("GRAD_NORM_CLIP=-0.1", "GRAD_NORM_CLIP must not be negative"),
    ("DET_GRAD_NORM_CLIP=-1.0", "DET_GRAD_NORM_CLIP must not be negative"),
    ("FNS_WEIGHT=-0.1", "FNS_WEIGHT must not be negative"),
    ("WEIGHT_DECAY=-0.1", "WEIGHT_DECAY must not be negative"),
    ("DROPOUT_R=1.5", "DROPOUT_R must be between 0 and 1"),
    ("EMA_DECAY=1.1", "EMA_DECAY must be between 0 and 1"),
    ("DET_IGNORE_IOU=2.0", "DET_IGNORE_IOU must be between 0 and 1"),
    ("DET_OBJECTNESS_PRIOR=0.0", "DET_OBJECTNESS_PRIOR must be between 0 and 1"),
    ("MAX_TOKEN=0", "MAX_TOKEN must be positive, or -1"),
    ("STD=[0.2, 0.0, 0.2]", "STD must hold three values"),
    ("OPT=SGD", "OPT must be 'Adam' or 'AdamW', got 'SGD'"),
    ("DET_OPT=SGD", "DET_OPT must be 'Adam' or 'AdamW'"),
    ("DIST_BACKEND=mpi", "DIST_BACKEND must be 'auto', 'nccl' or 'gloo'"),
])
def test_values_out_of_range_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("config/refcoco.yaml", [override])


def test_the_configuration_reference_page_is_current():
    from utils.config import reference_page
    with open("docs/config.md", encoding="utf-8") as f:
        assert f.read() == reference_page(), "docs/config.md is stale: run python -m tools.config_reference"


def test_the_reference_page_lists_every_key_with_its_rules():
    from utils.config import MODEL_KEYS, SCHEMA, reference_page
    page = reference_page()
    for keys in SCHEMA.values():
        for key, rules in keys.items():
            row = next(line for line in page.splitlines() if line.startswith(f"| `{key}` |"))
            assert ("| yes |" in row) == rules.changes_model == (key in MODEL_KEYS)
            for choice in rules.choices or ():
                assert f"`{choice}`" in row
    assert "| `LR` | `0.0001` | float | > 0 |" in page
    assert "| `DROPOUT_R` | `0.1` | float | 0 to 1 |" in page


def test_every_ablation_row_is_a_valid_config_and_rows_differ():
    loaded = {name: load_config("config/synthetic/quickstart.yaml", overrides) for name, overrides in VARIANTS.items()}
    keys = ("USE_CMA", "CMA_CONDITION", "NUM_REFS", "FNS_WEIGHT", "ER_WEIGHT", "APL_POSITION_PROMPT",
            "APL_COLOUR_PROMPT", "APL_CATEGORY_PROMPT", "APL_RECON_WEIGHT", "APL_ALIGNMENT", "APL_UNNORMALIZE",
            "APL_COLOUR_EMPTY_BOX", "APL_TAG_WORDS", "APL_POSITION_SIDE", "APL_SCATTER_ORDER", "APL_RECON_ANCHOR",
            "APL_HEAD_OBJ_PRIOR", "APL_BURN_IN_COUNT", "GROUP_BY_IMAGE", "REFERENT_WEIGHT", "AGREEMENT_WEIGHT",
            "ANCHOR_GEOMETRY")
    settings = {name: tuple(cfg[key] for key in keys) for name, cfg in loaded.items()}
    assert len(set(settings.values())) == len(settings), "two ablation rows train the same model"
    demo = load_config("config/synthetic/quickstart.yaml")
    assert settings["fns+er"] == tuple(demo[key] for key in keys), "fns+er is not the quickstart's model"
    assert loaded["apl+fns+er"].NUM_REFS == 3 and loaded["apl"].NUM_REFS == 1
