import json
import subprocess
import sys
from pathlib import Path

import pytest

from leoclr_core.spec import EvaluateSpec, PretrainSpec, SpecError, flatten, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]


def test_every_shipped_config_validates():
    configs = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "bench").glob("*.yaml"))
    assert configs, "configs/ must ship ready job specs"
    for path in configs:
        spec = load_spec(path)
        assert spec.kind in ("pretrain", "evaluate", "tune")


def test_defaults_follow_leoclr_md():
    spec = parse_spec({"kind": "pretrain"})
    assert isinstance(spec, PretrainSpec)
    assert spec.method == "leoclr"
    assert spec.loss.temperature == 0.2 and spec.loss.enqueue == "both"
    assert spec.augment.crop_scale == (0.2, 1.0)
    assert (spec.augment.jitter_p, spec.augment.grayscale_p, spec.augment.blur_p) == (0.8, 0.2, 0.5)


def test_yaml_and_json_load_the_same_spec(tmp_path):
    raw = {"kind": "pretrain", "name": "x", "optim": {"epochs": 3, "batch_size": 64}}
    (tmp_path / "a.json").write_text(json.dumps(raw))
    (tmp_path / "a.yaml").write_text("kind: pretrain\nname: x\noptim: {epochs: 3, batch_size: 64}\n")
    assert load_spec(tmp_path / "a.json") == load_spec(tmp_path / "a.yaml")


def test_overrides_set_nested_fields_with_yaml_values():
    spec = parse_spec({"kind": "pretrain"}, ["loss.temperature=0.1", "data.synthetic.object_size=[10, 20]",
                                             "augment.batched=true", "method=mocov2"])
    assert spec.loss.temperature == 0.1
    assert spec.data.synthetic.object_size == (10, 20)
    assert spec.augment.batched is True and spec.method == "mocov2"


@pytest.mark.parametrize(
    "raw,overrides,expected",
    [
        ({}, ["optim.lr=-0.1"], "optim.lr: Input should be greater than 0"),
        ({}, ["loss.queue_size=6000"], "loss.queue_size (6000) exceeds data.num_images (5000)"),
        ({}, ["data.image_size=0"], "data.image_size: Input should be greater than or equal to 8"),
        ({}, ["model.backbone=vgg"], "model.backbone: Input should be 'tiny', 'resnet18', 'resnet34' or 'resnet50'"),
        ({}, ["optim.epochs_typo=3"], "optim.epochs_typo: unknown field"),
        ({"nonsense": 1}, [], "nonsense: unknown field"),
        ({}, ["augment.crop_scale=[0.9, 0.1]"], "augment.crop_scale: crop_scale must satisfy"),
        ({}, ["data.source=cifar10"], "data: path is required for source 'cifar10'"),
        ({}, ["data.synthetic.object_size=[10, 90]"], "object_size must satisfy"),
        ({}, ["loss.key_bn=split", "optim.batch_size=100", "loss.bn_splits=8"], "divisible by loss.bn_splits"),
        ({"kind": "train"}, [], "kind: unknown kind 'train'"),
    ],
)
def test_invalid_specs_name_the_field_and_the_reason(raw, overrides, expected):
    with pytest.raises(SpecError) as err:
        parse_spec({"kind": "pretrain", **raw}, overrides)
    assert expected in str(err.value)


def test_bad_override_syntax_and_non_section_paths():
    with pytest.raises(SpecError, match="must look like section.field=value"):
        parse_spec({}, ["loss.temperature"])
    with pytest.raises(SpecError, match="loss.temperature is not a section"):
        parse_spec({"loss": {"temperature": 0.2}}, ["loss.temperature.x=1"])
    with pytest.raises(SpecError, match="loss.temperature: Input should be a valid number"):
        parse_spec({}, ["loss.temperature.x=1"])


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec file"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="top level must be a mapping"):
        load_spec(top)


def test_evaluate_spec_needs_exactly_one_encoder_source():
    spec = parse_spec({"kind": "evaluate", "encoder": {"checkpoint": "runs/demo"}})
    assert isinstance(spec, EvaluateSpec)
    with pytest.raises(SpecError, match="give exactly one of checkpoint or model_uri"):
        parse_spec({"kind": "evaluate", "encoder": {}})


def test_specs_are_immutable_and_flatten_to_dotted_params():
    spec = parse_spec({"kind": "pretrain"})
    with pytest.raises(Exception):
        spec.loss.temperature = 1.0  # type: ignore[misc]
    flat = flatten(spec)
    assert flat["loss.temperature"] == 0.2 and flat["data.synthetic.num_classes"] == 10


def test_spec_module_does_not_import_torch():
    # The API process validates specs and must stay light: importing spec must not pull in torch.
    code = "import sys, leoclr_core.spec; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
