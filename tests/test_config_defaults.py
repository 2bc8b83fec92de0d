"""The recipe's yaml configs and the plugin's dataclass defaults agree wherever they are meant to, and differ
only where the recipe deliberately sets something else: a silent drift of either side fails here."""

import os
from typing import Dict, Tuple

import helpers
import pytest
import yaml
from omegaconf import OmegaConf

from dphubert_fairseq.criterions.distill_criterion import DPHuBERTDistillCriterionConfig
from dphubert_fairseq.models.dphubert import DPHuBERTConfig
from dphubert_fairseq.tasks.distill_task import DPHuBERTDistillConfig

SECTIONS = {
    "task": DPHuBERTDistillConfig,
    "criterion": DPHuBERTDistillCriterionConfig,
    "model": DPHuBERTConfig,
}

#: task keys both stages set to the dataclass default
TASK_KEYS = (
    "data",
    "teacher_path",
    "sample_rate",
    "normalize",
    "long_utterances",
    "enable_padding",
    "check_audio_files",
    "check_audio_content",
)

#: criterion keys both stages set to the dataclass default
DISTILL_KEYS = (
    "distill_layers",
    "l1_weight",
    "cos_weight",
    "mse_weight",
    "prediction_heads",
    "prediction_head",
)

#: keys whose yaml value is the dataclass default: the recipe and a bare ``--task dphubert_distill`` agree
MEANT_TO_AGREE: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "dphubert": {
        "task": TASK_KEYS,
        "criterion": DISTILL_KEYS
        + (
            "lagrangian",
            "target_sparsity",
            "target_metric",
            "latency_table",
            "sparsity_warmup_updates",
            "target_projection_start",
            "skip_inactive_units",
            "inactive_threshold",
            "inactive_checks",
            "inactive_check_interval",
            "inactive_compute",
        ),
        "model": (
            "dropout",
            "attention_dropout",
            "activation_dropout",
            "feature_grad_mult",
            "gate_init_importance",
            "conv_gate_init_drop_rate",
        ),
    },
    "dphubert_final": {
        "task": TASK_KEYS,
        "criterion": DISTILL_KEYS,
        "model": ("prune_units", "dropout", "attention_dropout", "activation_dropout", "feature_grad_mult"),
    },
}

#: keys the recipe sets differently from the default, on purpose: (section, key) -> (yaml value, reason)
DELIBERATE = {
    "dphubert": {
        ("task", "max_sample_size"): (250000, "the reference's 15.6 s limit; the task's default is no limit"),
        ("task", "min_sample_size"): (32000, "the reference's 2 s minimum; the task's default is none"),
        ("model", "prune_units"): (["conv", "head", "interm"], "stage 1 prunes; a bare model prunes nothing"),
        ("model", "dropout_input"): (
            0.1,
            "the reference's dropout on the feature projection; fairseq's is 0",
        ),
    },
    "dphubert_final": {
        ("task", "student_path"): ("???", "stage 2 must be given the stage-1 export"),
        ("task", "max_sample_size"): (250000, "as stage 1"),
        ("task", "min_sample_size"): (32000, "as stage 1"),
        ("criterion", "lagrangian"): (False, "stage 2 distils a fixed structure: no sparsity constraint"),
        ("model", "dropout_input"): (0.1, "as stage 1"),
    },
}


def yaml_config(name: str) -> dict:
    with open(os.path.join(helpers.CONFIGS, f"{name}.yaml")) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("name", sorted(MEANT_TO_AGREE))
def test_every_yaml_key_is_listed_as_agreeing_or_deliberate(name):
    """Each task/criterion/model key of the yaml is in exactly one list: a new key needs a decision."""
    config = yaml_config(name)
    for section in SECTIONS:
        keys = set(config[section]) - {"_name"}
        agree = set(MEANT_TO_AGREE[name][section])
        deliberate = {key for sec, key in DELIBERATE[name] if sec == section}
        assert not agree & deliberate, (section, agree & deliberate)
        assert keys == agree | deliberate, (section, keys ^ (agree | deliberate))


@pytest.mark.parametrize("name", sorted(MEANT_TO_AGREE))
def test_yaml_values_agree_with_the_dataclass_defaults(name):
    """The keys meant to agree hold the dataclass default; the deliberate ones hold the recorded value, which
    is not the default."""
    config = yaml_config(name)
    for section, cls in SECTIONS.items():
        defaults = OmegaConf.to_container(OmegaConf.structured(cls), resolve=False)
        for key in MEANT_TO_AGREE[name][section]:
            assert config[section][key] == defaults[key], (
                name,
                section,
                key,
                config[section][key],
                defaults[key],
            )
    for (section, key), (value, reason) in DELIBERATE[name].items():
        defaults = OmegaConf.to_container(OmegaConf.structured(SECTIONS[section]), resolve=False)
        assert config[section][key] == value, (name, section, key)
        assert defaults.get(key) != value, f"{name}: {section}.{key} now equals the default ({reason})"
