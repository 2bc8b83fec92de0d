"""fairseq tasks of the plugin; importing this package registers them."""

from .distill_task import DPHuBERTDistillConfig, DPHuBERTDistillTask  # noqa: F401
