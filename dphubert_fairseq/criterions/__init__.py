"""fairseq criterions of the plugin; importing this package registers them."""

from .distill_criterion import DPHuBERTDistillCriterion, DPHuBERTDistillCriterionConfig  # noqa: F401
