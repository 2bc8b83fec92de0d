"""The reference implementation's release format, both ways: the ``{"state_dict", "config"}`` files that
the paper's reference implementation (torchaudio-based) writes for its pruned models, read into an ungated
``dphubert`` model and written from one.

- ``layout``: what a file holds: the builder's config keys, the state-dict names and shapes a config makes
  (``reference_layout``), and the config facts both directions share;
- ``reading``: the checks of a file and ``model_from_reference`` (how the reference computes, and how that
  maps to the ``dphubert`` model);
- ``writing``: ``reference_from_model`` and ``save_reference`` (what the format cannot hold exactly, and what
  the writer does about it).

Every public name of the three is importable from here.
"""

from .layout import (
    ATTENTION,
    DEFAULT_CONV_LAYERS,
    EXTRACTOR_MODES,
    HUBERT_ATTENTION_KEYS,
    LAYOUTS,
    NEUTRAL_GATE_CONST,
    PRUNE_FLAGS,
    REQUIRED_KEYS,
    WAVLM_ATTENTION_KEYS,
    Shape,
    conv_layers_of,
    is_wavlm_config,
    layer_heads,
    reference_layout,
)
from .reading import (
    check_reference_config,
    check_reference_state,
    config_from_reference,
    import_notes,
    model_from_reference,
    read_reference,
)
from .writing import ReferenceExportReport, reference_config, reference_from_model, save_reference

__all__ = [
    "ATTENTION",
    "DEFAULT_CONV_LAYERS",
    "EXTRACTOR_MODES",
    "HUBERT_ATTENTION_KEYS",
    "LAYOUTS",
    "NEUTRAL_GATE_CONST",
    "PRUNE_FLAGS",
    "REQUIRED_KEYS",
    "WAVLM_ATTENTION_KEYS",
    "Shape",
    "conv_layers_of",
    "is_wavlm_config",
    "layer_heads",
    "reference_layout",
    "check_reference_config",
    "check_reference_state",
    "config_from_reference",
    "import_notes",
    "model_from_reference",
    "read_reference",
    "ReferenceExportReport",
    "reference_config",
    "reference_from_model",
    "save_reference",
]
