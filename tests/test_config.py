import pytest

from utils.config import ConfigError, default_config, load_config, parse_override

CONFIGS = ["refcoco", "refcoco+", "refcocog", "referit", "refclip",
           "apl_refcoco", "apl_refcoco+", "apl_refcocog", "apl_referit"]


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
    refclip = load_config("config/refclip.yaml")
    assert (refclip.USE_CMA, refclip.NUM_REFS, refclip.FNS_WEIGHT, refclip.ER_WEIGHT) == (False, 1, 0.0, 0.0)


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
