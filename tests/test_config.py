import pytest

from resmem_ray.config import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 3\n"), ("train.lr=0.1", "resmem.k=7",
                                                               "evaluate.knn_ks=[1,5]", "data.limit=50"))
    assert (cfg.train.epochs, cfg.train.lr, cfg.resmem.k) == (3, 0.1, 7)
    assert cfg.evaluate.knn_ks == [1, 5] and cfg.data.limit == 50
    assert cfg.model.name == "small_cnn"
    assert load_config(None, ("train.weight_decay=5e-4",)).train.weight_decay == 5e-4


@pytest.mark.parametrize("text,overrides,message", [
    ("trian:\n  epochs: 3\n", (), "unknown config key trian"),
    ("train:\n  epohcs: 3\n", (), "unknown config key train.epohcs"),
    ("train:\n  epochs: three\n", (), "config key train.epochs must be int"),
    ("train:\n  use_gpu: 1\n", (), "config key train.use_gpu must be bool"),
    ("", ("data.name=mnist2",), "config key data.name: unknown value 'mnist2'"),
    ("", ("model.name=vgg",), "config key model.name: unknown value 'vgg'"),
    ("", ("resmem.k=0",), "config key resmem.k must be positive"),
    ("", ("resmem.knn_tau=0",), "config key resmem.knn_tau must be positive"),
    ("", ("resmem.knn_lambda=1.5",), "config key resmem.knn_lambda must be in [0, 1], got 1.5"),
    ("", ("resmem.knn_lambda=-0.1",), "config key resmem.knn_lambda must be in [0, 1]"),
    ("", ("tune.knn_lambda=[0.5,2]",), "config key tune.knn_lambda must be in [0, 1], got 2.0"),
    ("", ("tune.knn_lambda=[]",), "config key tune.knn_lambda must be a non-empty list"),
    ("", ("tune.knn_tau=[0.1,0]",), "config key tune.knn_tau must be positive, got 0.0"),
    ("", ("data.name=imagefolder",), "data.root is required"),
    ("", ("train.epochs",), "must look like section.key=value"),
    ("", ("serve.port=0",), "config key serve.port must be in (0, 65535], got 0"),
    ("", ("serve.max_batch_size=0",), "config key serve.max_batch_size must be positive"),
    ("", ("serve.open_memorize=1",), "config key serve.open_memorize must be bool"),
    ("- a\n- b\n", (), "mapping at the top level"),
])
def test_bad_config_names_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(write(tmp_path, text), overrides)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_shipped_configs_load():
    import glob

    paths = sorted(glob.glob("jobs/configs/*.yaml"))
    assert paths
    for p in paths:
        load_config(p)


def test_every_numeric_key_declares_its_range():
    """The rules live on the schema's fields; a number with no range would go unchecked
    ("(-inf, inf)" declares any finite value)."""
    import typing

    from resmem_ray.config import RANGES
    from resmem_ray.schema import RULES

    def numeric(tp) -> bool:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return tp in (int, float) or (typing.get_origin(tp) in (list, typing.Union) and numeric(args[0]))

    keys = [key for key, rules in RULES.items() if numeric(rules.type)]
    assert len(keys) > 70 and "tune.k" in keys and "data.limit" in keys and "seed" in keys
    assert [key for key in keys if key not in RANGES] == []
    assert set(RANGES) == set(keys)  # and only numbers have one


def test_choices_apply_to_each_element_of_a_list():
    with pytest.raises(ConfigError, match=r"config key tune.distance: unknown value 'l3' \(choose from l2, "):
        load_config(None, ("tune.distance=[l2,l3]",))
