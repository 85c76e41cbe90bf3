import dataclasses

import pytest

from conftest import REPO
from llmx import config as config_lib
from llmx import models
from llmx.errors import ConfigError

# sweep_*.yaml add a sweep: section that only llmx.sweep reads (tests/test_sweep.py loads them)
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("sweep_"))


def test_configs_exist():
    assert any(p.name == "tiny.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = config_lib.load(path)
    assert cfg.model.d_model % cfg.model.n_heads == 0
    # The resolved YAML round-trips to the same config.
    assert config_lib.from_dict(__import__("yaml").safe_load(cfg.to_yaml())) == cfg


def test_overrides_are_typed():
    cfg = config_lib.load(None, ["train.steps=7", "optim.lr=1e-3", "model.tie_embeddings=true", "train.run_dir=x/y"])
    assert cfg.train.steps == 7 and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.tie_embeddings is True and cfg.train.run_dir == "x/y"
    assert isinstance(config_lib.load(None, ["optim.lr=1"]).optim.lr, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.d_modle=64", "unknown config key 'model.d_modle'"),
        ("modle.d_model=64", "unknown config section 'modle'"),
        ("train.steps=ten", "train.steps='ten' has the wrong type; expected int"),
        ("model.n_layers=0", "model.n_layers=0 is out of range"),
        ("model.n_heads=5", "model.n_heads=5 does not divide model.d_model=256"),
        ("model.n_kv_heads=3", "model.n_kv_heads=3 must divide model.n_heads=4"),
        ("optim.schedule=warmup", "optim.schedule='warmup' is not allowed; choose one of"),
        ("model.family=gpt2", "model.family='gpt2' is not allowed; choose one of"),
        ("train.steps", "is not of the form section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.load(None, [override])


def test_readme_config_reference_is_current():
    readme = (REPO / "README.md").read_text()
    table = readme.split("<!-- config-reference:start -->\n")[1].split("\n<!-- config-reference:end -->")[0]
    assert table == config_lib.reference_markdown(), "regenerate the README table from llmx.config.reference_markdown()"


def test_model_family_choices_are_the_registrys_families():
    """config.py cannot import the models (they import it), so its choices are a copy kept equal here."""
    (field,) = [f for f in dataclasses.fields(config_lib.ModelConfig) if f.name == "family"]
    assert tuple(field.metadata["choices"]) == tuple(models.FAMILIES)
    assert field.default in models.FAMILIES
