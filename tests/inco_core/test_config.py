from __future__ import annotations

import pytest

from inco_core.config import OptimConfig, load_spec, parse_ratio, preset_config
from inco_core.errors import ConfigError

BASE = {"data": {"path": "/data"}}


def test_presets_follow_the_protocol() -> None:
    paper, cpu, smoke = (preset_config(p) for p in ("paper", "cpu", "smoke"))
    assert (paper.image_size, paper.pretrain.epochs, paper.finetune.epochs, paper.linear.epochs) == (200, 200, 200, 200)
    assert (cpu.image_size, cpu.pretrain.epochs, cpu.finetune.epochs) == (64, 30, 50)
    assert smoke.image_size == 32 and smoke.pretrain.epochs <= 2
    assert paper.pretrain.batch_size == 64 and paper.pretrain.inco.views == 5
    assert paper.pretrain.inco.ramp(200) == (30.0, 150.0) and paper.pretrain.inco.a_f == 1.0
    with pytest.raises(ConfigError, match="unknown preset"):
        preset_config("huge")


def test_overrides_nested_and_dotted_and_paper_literal() -> None:
    spec = load_spec(
        {**BASE, "optimizer": "paper-literal", "overrides": {"pretrain.epochs": 3, "pretrain": {"inco": {"a_f": 0}}}}
    )
    cfg = spec.resolve()
    assert cfg.pretrain.epochs == 3 and cfg.pretrain.inco.a_f == 0
    assert cfg.pretrain.optim == OptimConfig.paper_literal()
    assert (cfg.pretrain.optim.name, cfg.pretrain.optim.lr) == ("adam", 0.3)
    assert load_spec(BASE).resolve().pretrain.optim.name == "sgd"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"ratios": ["16"]}, "ratio must look like 1:16 (got '16')"),
        ({"ratios": ["1:0"]}, "between 1 and 256"),
        ({"ratios": ["1:1000"]}, "between 1 and 256"),
        ({"ratios": ["1:2", "1:2"]}, "repeated"),
        ({"method": "byol"}, "method"),
        ({"preset": "huge"}, "preset"),
        ({"overrides": {"pretrain.epocs": 3}}, "overrides.pretrain.epocs: unknown field"),
        ({"overrides": {"pretrain.epochs": 10**9}}, "overrides.pretrain.epochs"),
        ({"overrides": {"pretrain.inco.views": 0}}, "overrides.pretrain.inco.views"),
        ({"overrides": {"pretrain.inco.temperature": -1}}, "temperature"),
        ({"overrides": {"pretrain.inco.t1": 50, "pretrain.inco.t2": 10}}, "t2 must be greater than t1"),
        ({"method": "supervised", "evals": ["linear"]}, "no pretrained backbone"),
        ({"resources": {"workers": 10**6}}, "resources.workers"),
        ({"surprise": 1}, "surprise: unknown field"),
    ],
)
def test_bad_specs_name_the_field(patch: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_spec({**BASE, **patch})
    assert message in str(info.value)


def test_parse_ratio() -> None:
    assert parse_ratio("1:32") == 32 and parse_ratio(" 1 : 2 ") == 2
    for bad in ("32", "2:3", "1:", "1:x", "1:-4"):
        with pytest.raises(ConfigError):
            parse_ratio(bad)


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("augment", None, "no image is augmented"),
        ("backbone_lr_scale", 1.0, "the backbone has no learning rate"),
    ],
)
def test_linear_evaluation_refuses_fine_tuning_fields(field: str, value: object, why: str) -> None:
    for overrides in ({f"linear.{field}": value}, {"linear": {field: value}}):
        with pytest.raises(ConfigError, match=rf"linear\.{field} does not apply: .*{why}.*set finetune\.{field}"):
            load_spec({**BASE, "evals": ["linear"], "overrides": overrides})
    assert load_spec({**BASE, "overrides": {f"finetune.{field}": value}}).resolve()  # fine-tuning takes it


@pytest.mark.parametrize("preset", ["paper", "cpu", "smoke"])
def test_every_preset_validates_with_both_evaluations(preset: str) -> None:
    cfg = load_spec({**BASE, "preset": preset, "evals": ["finetune", "linear"]}).resolve()
    assert cfg == preset_config(preset)
    assert "augment" not in cfg.linear.model_dump() and "backbone_lr_scale" not in cfg.linear.model_dump()
    assert type(cfg).model_validate(cfg.model_dump(mode="json")) == cfg  # a stored config reads back


def test_supervised_refuses_a_backbone_learning_rate_scale() -> None:
    with pytest.raises(ConfigError, match=r"finetune\.backbone_lr_scale does not apply to supervised"):
        load_spec({**BASE, "method": "supervised", "overrides": {"finetune": {"backbone_lr_scale": 0.5}}})
    assert load_spec({**BASE, "method": "inco", "overrides": {"finetune.backbone_lr_scale": 0.5}}).resolve()
