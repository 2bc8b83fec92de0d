"""fairseq models of the plugin; importing this package registers them."""

from .dphubert import DPHuBERTConfig, DPHuBERTModel  # noqa: F401
