import json
import subprocess
import sys
from pathlib import Path

import pytest

from leoclr_core.spec.models import (
    KINDS,
    MAX_TRIALS,
    EvaluateSpec,
    PretrainSpec,
    SpecError,
    flatten,
    load_spec,
    parse_spec,
    read_spec_file,
)
from leoclr_core.spec.limits import UNBOUNDED_BY_DESIGN, limits

ROOT = Path(__file__).resolve().parents[2]


def test_every_shipped_config_validates():
    configs = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "bench").glob("*.yaml"))
    assert configs, "configs/ must ship ready job specs"
    for path in configs:
        spec = load_spec(path)
        assert spec.kind in KINDS


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
    code = "import sys, leoclr_core.spec.models; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- limits (issue 17)
def _tune_raw(**changes):
    """The shipped search config with top-level fields replaced."""
    return {**read_spec_file(ROOT / "configs" / "tune-demo.yaml"), **changes}


@pytest.mark.parametrize(
    "raw,expected",
    [
        ({"optim": {"epochs": 10**12}}, "optim.epochs: Input should be less than or equal to"),
        ({"data": {"num_images": 10**12}}, "data.num_images: Input should be less than or equal to"),
        ({"model": {"proj_hidden_dim": 10**9}}, "model.proj_hidden_dim: Input should be less than or equal to"),
        ({"eval": {"knn_k": 10**12}}, "eval.knn_k: Input should be less than or equal to"),
        ({"loss": {"queue_size": 10**12}, "data": {"num_images": None, "source": "imagefolder", "path": "x"}},
         "loss.queue_size: Input should be less than or equal to"),
        ({"optim": {"batch_size": 10**12}}, "optim.batch_size: Input should be less than or equal to"),
        ({"scaling": {"num_workers": 10**6}}, "scaling.num_workers: Input should be less than or equal to"),
        ({"scaling": {"gpus_per_worker": 1000.0}}, "scaling.gpus_per_worker: Input should be less than or equal to"),
        ({"checkpoint": {"keep": 10**9}}, "checkpoint.keep: Input should be less than or equal to"),
        ({"seed": 10**30}, "seed: Input should be less than or equal to 4294967295"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"data": {"seed": 2**32}}, "data.seed: Input should be less than or equal to 4294967295"),
        ({"optim": {"weight_decay": 1e9}}, "optim.weight_decay: Input should be less than or equal to"),
        ({"augment": {"brightness": 1e9}}, "augment.brightness: Input should be less than or equal to"),
        ({"augment": {"crop_ratio": [0.5, 1e9]}}, "augment.crop_ratio.1: Input should be less than or equal to"),
        ({"eval": {"probe_lr": 1e9}}, "eval.probe_lr: Input should be less than or equal to"),
        ({"eval": {"knn_temperature": 1e9}}, "eval.knn_temperature: Input should be less than or equal to"),
        ({"data": {"mean": [0.5, 0.5, 1e9]}}, "data.mean.2: Input should be less than or equal to 1"),
    ],
)
def test_pretrain_fields_that_size_work_are_bounded(raw, expected):
    with pytest.raises(SpecError) as err:
        parse_spec({"kind": "pretrain", **raw})
    assert expected in str(err.value)


def test_seeds_take_the_whole_32_bit_range():
    # numpy's RandomState (Tune's random search is seeded with the job's seed) takes 0..2**32-1.
    spec = parse_spec({"kind": "pretrain", "seed": 2**32 - 1, "data": {"seed": 2**32 - 1}})
    assert spec.seed == 2**32 - 1 and spec.data.seed == 2**32 - 1


def test_evaluate_fields_are_bounded():
    raw = {"kind": "evaluate", "encoder": {"checkpoint": "runs/demo"}, "eval": {"probe_epochs": 10**12}}
    with pytest.raises(SpecError, match=r"eval\.probe_epochs: Input should be less than or equal to"):
        parse_spec(raw)


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({"num_samples": 10**9}, "num_samples: Input should be less than or equal to"),
        ({"max_concurrent_trials": 10**9}, "max_concurrent_trials: Input should be less than or equal to"),
        ({"scheduler": {"type": "asha", "grace_period": 10**12}},
         "scheduler.grace_period: Input should be less than or equal to"),
        ({"base": {"kind": "pretrain", "optim": {"epochs": 10**12}}},
         "base.optim.epochs: Input should be less than or equal to"),
    ],
)
def test_tune_fields_that_size_work_are_bounded(changes, expected):
    with pytest.raises(SpecError) as err:
        parse_spec(_tune_raw(**changes))
    assert expected in str(err.value)


def test_a_search_of_more_trials_than_the_limit_is_refused():
    grid = {"type": "grid", "values": [0.1, 0.2, 0.3, 0.4]}
    space = {"loss.temperature": grid, "optim.lr": grid}  # 16 grid points, each repeated num_samples times
    with pytest.raises(SpecError, match=r"num_samples .* trials"):
        parse_spec(_tune_raw(space=space, num_samples=MAX_TRIALS // 16 + 1))
    spec = parse_spec(_tune_raw(space=space, num_samples=MAX_TRIALS // 16))
    assert spec.num_samples == MAX_TRIALS // 16


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize(
    "body,path",
    [
        ('{"optim": {"lr": %s}}', "optim.lr"),
        ('{"loss": {"temperature": %s}}', "loss.temperature"),
        ('{"optim": {"weight_decay": %s}}', "optim.weight_decay"),
        ('{"scaling": {"cpus_per_worker": %s}}', "scaling.cpus_per_worker"),
        ('{"data": {"mean": [0.5, %s, 0.5]}}', "data.mean.1"),
    ],
)
def test_non_finite_floats_are_refused(text, body, path):
    # Python's json (and so FastAPI) reads NaN and Infinity; a spec must never carry them.
    with pytest.raises(SpecError) as err:
        parse_spec(json.loads(body % text))
    assert f"{path}: Input should be a finite number" in str(err.value)


def test_non_finite_floats_from_yaml_overrides_are_refused():
    with pytest.raises(SpecError, match=r"optim\.weight_decay: Input should be a finite number"):
        parse_spec({}, ["optim.weight_decay=.nan"])
    with pytest.raises(SpecError, match=r"augment\.blur_sigma\.1: Input should be a finite number"):
        parse_spec({}, ["augment.blur_sigma=[0.1, .inf]"])


@pytest.mark.parametrize(
    "dim,expected",
    [
        ('{"type": "choice", "values": [0.1, NaN]}', "space.loss.temperature.values: "),
        ('{"type": "grid", "values": [[0.1, Infinity]]}', "space.loss.temperature.values: "),
        ('{"type": "uniform", "low": 0.1, "high": Infinity}', "space.loss.temperature.high: Input should be a finite"),
        ('{"type": "loguniform", "low": NaN, "high": 0.5}', "space.loss.temperature.low: Input should be a finite"),
    ],
)
def test_a_search_space_of_non_finite_values_is_refused_naming_the_dimension(dim, expected):
    raw = _tune_raw(space={"loss.temperature": json.loads(dim)})
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    assert expected in str(err.value) and "finite" in str(err.value)


def test_a_choice_of_too_many_values_is_refused():
    raw = _tune_raw(space={"loss.temperature": {"type": "choice", "values": [0.2] * 100_000}})
    with pytest.raises(SpecError, match=r"space\.loss\.temperature\.values: List should have at most"):
        parse_spec(raw)


def test_every_numeric_spec_field_has_an_upper_bound_in_the_json_schema():
    # "Every spec field that sizes work has a documented upper bound": the API's OpenAPI document
    # carries the JSON schema, so the bound must be in it, not only in a validator.
    rows = [row for kind in ("pretrain", "evaluate", "tune") for row in limits(kind)]
    assert {r.path for r in rows} >= {"optim.epochs", "data.num_images", "seed", "num_samples", "space.<field>.low"}
    missing = [f"{r.kind}: {r.path}" for r in rows if not r.upper and r.path not in UNBOUNDED_BY_DESIGN]
    assert not missing, f"numeric spec fields without an upper bound: {missing}"
