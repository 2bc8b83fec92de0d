"""Configs that would silently do something else are refused, each with a one-line error naming the key."""

import pytest
from omegaconf import OmegaConf

from dphubert_fairseq.criterions import DPHuBERTDistillCriterion, DPHuBERTDistillCriterionConfig
from dphubert_fairseq.models.dphubert import DPHuBERTConfig
from dphubert_fairseq.tasks import DPHuBERTDistillConfig, DPHuBERTDistillTask


@pytest.fixture(scope="module")
def task(tiny_teachers, tmp_path_factory):
    cfg = DPHuBERTDistillConfig(
        data=str(tmp_path_factory.mktemp("none")), teacher_path=tiny_teachers["hubert_base"], tpu=False
    )
    return DPHuBERTDistillTask.setup_task(OmegaConf.structured(cfg))


def criterion(task, **kw) -> DPHuBERTDistillCriterion:
    cfg = OmegaConf.merge(
        OmegaConf.structured(DPHuBERTDistillCriterionConfig),
        {"max_update": 100, "distill_layers": "0;1,2,3", **kw},
    )
    return DPHuBERTDistillCriterion(cfg, task)


def test_nothing_to_prune_with_the_lagrangian_on_is_refused(task):
    task.build_model(OmegaConf.structured(DPHuBERTConfig(_name="dphubert", prune_units=[])))
    with pytest.raises(ValueError) as err:
        criterion(task, target_sparsity=0.5)
    message = str(err.value)
    assert "\n" not in message and message.startswith("criterion.lagrangian: model.prune_units=[]")
    assert "criterion.target_sparsity=0.5" in message and "criterion.lagrangian=false" in message
    criterion(task, lagrangian=False)  # plain distillation of an ungated student is fine
    task.build_model(OmegaConf.structured(DPHuBERTConfig(_name="dphubert", prune_units=["head"])))
    criterion(task, target_sparsity=0.5)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("inactive_threshold", 0.0, "must be in (0, 1), got 0.0"),
        ("inactive_threshold", 1.5, "must be in (0, 1), got 1.5"),
        ("inactive_checks", 0, "must be at least 1, got 0"),
        ("inactive_check_interval", -5, "must be at least 1, got -5"),
    ],
)
def test_inactive_unit_settings_are_checked(task, key, value, expected):
    task.build_model(OmegaConf.structured(DPHuBERTConfig(_name="dphubert", prune_units=["head"])))
    with pytest.raises(ValueError) as err:
        criterion(task, **{key: value})
    assert str(err.value) == f"criterion.{key} {expected}"


@pytest.mark.parametrize("spec, repeated", [("0;4,4,12", "4"), ("0;2,3;3", "3"), ("1;1", "1")])
def test_a_layer_listed_twice_is_refused(task, spec, repeated):
    with pytest.raises(
        ValueError, match=f"criterion.distill_layers: layer\\(s\\) {repeated} appear more than once"
    ):
        criterion(task, distill_layers=spec)


def test_stage2_layers_must_be_the_stage1_ones(task):
    task.initial_distill_layers, task.initial_prediction_heads = "0;1,2,3", False
    try:
        criterion(task, distill_layers="0; 1,2,3", lagrangian=False)  # the same layers, spelled otherwise
        with pytest.raises(ValueError) as err:
            criterion(task, distill_layers="0;1,2", lagrangian=False)
        message = str(err.value)
        assert (
            "\n" not in message and "criterion.distill_layers='0;1,2'" in message and "'0;1,2,3'" in message
        )
        with pytest.raises(
            ValueError, match="criterion.prediction_heads=True differs from the stage-1 run's False"
        ):
            criterion(task, prediction_heads=True, lagrangian=False)
        # an export made with DistilHuBERT's heads (one made before the key existed records None: linear)
        task.initial_prediction_heads, task.initial_prediction_head = True, "distilhubert"
        criterion(task, prediction_heads=True, prediction_head="distilhubert", lagrangian=False)
        with pytest.raises(
            ValueError, match="criterion.prediction_head=linear differs from the stage-1 run's distilhubert"
        ):
            criterion(task, prediction_heads=True, lagrangian=False)
        task.initial_prediction_head = None
        criterion(task, prediction_heads=True, lagrangian=False)
    finally:
        task.initial_distill_layers = task.initial_prediction_heads = task.initial_prediction_head = None


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        (
            "model",
            "prune_units",
            "conv",
            "model.prune_units: got 'conv', a single value, but it takes a list; "
            "write model.prune_units=[conv]",
        ),
        (
            "model",
            "dropout",
            "abc",
            "model.dropout: Value 'abc' of type 'str' could not be converted to Float",
        ),
    ],
)
def test_a_value_of_the_wrong_type_names_the_key(section, key, value, expected):
    """What fairseq-hydra-train does with each config section (fairseq's add_defaults -> merge_with_parent)."""
    from fairseq.dataclass.initialize import add_defaults

    cfg = OmegaConf.create({section: {"_name": "dphubert", key: value}})
    with pytest.raises(ValueError) as err:
        add_defaults(cfg)
    assert str(err.value) == expected or str(err.value).startswith(expected)
    assert "\n" not in str(err.value)
