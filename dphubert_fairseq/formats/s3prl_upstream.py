"""A ``dphubert`` checkpoint as an s3prl upstream (the SUPERB benchmark's interface): ``UpstreamExpert``.

The expert is a plain ``nn.Module`` with the interface s3prl's runner, ``s3prl.nn.S3PRLUpstream`` and both
s3prl featurizers call: built as ``UpstreamExpert(ckpt, model_config=None, **kwargs)``, ``forward(wavs)`` on a
list of unpadded 16 kHz waveforms returns ``{"hidden_states": [h_0, ..., h_L]}`` and
``get_downsample_rates(key)`` the number of samples per frame. It does not subclass s3prl's ``UpstreamBase``
(whose only addition is forward hooks, unused here), so importing it needs no s3prl; ``s3prl_hub`` adds it to
``s3prl.hub`` for s3prl's runner.
"""

import math
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint_io import load_model
from ..conv_spec import parse_conv_layers
from ..errors import CheckpointError, ConfigError
from ..models.dphubert import pad_waveforms


class UpstreamExpert(nn.Module):
    """s3prl upstream for a ``dphubert`` checkpoint (a trained student or its export).

    ``ckpt``: path of the checkpoint (s3prl's ``-k``); ``model_config`` (s3prl's ``-g``) must be None, the
    checkpoint holds the whole configuration; other keyword arguments s3prl passes (``refresh``) are ignored.
    """

    def __init__(self, ckpt: Optional[str], model_config: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__()
        if not ckpt:
            raise CheckpointError(
                "dphubert upstream: no checkpoint given; pass the dphubert checkpoint (-k PATH)"
            )
        if model_config:
            raise ConfigError(
                f"{model_config}: the dphubert upstream takes no model config (-g); "
                f"its checkpoint {ckpt} holds the configuration"
            )
        self.model = load_model(str(ckpt))
        self.normalize = bool(self.model.cfg.normalize)
        self.downsample_rate = math.prod(
            stride for _, _, stride in parse_conv_layers(self.model.cfg.conv_feature_layers)
        )

    def get_downsample_rates(self, key: str) -> int:
        """Waveform samples per frame of every output (320 for HuBERT / wav2vec2's CNN: 20 ms at 16 kHz)."""
        return self.downsample_rate

    def forward(self, wavs: List[torch.Tensor]) -> Dict[str, List[torch.Tensor]]:
        """``wavs``: B unpadded waveforms ``(L_i,)`` at 16 kHz -> ``{"hidden_states": [h_0, ..., h_L]}``,
        each ``(B, T, D)`` for the batch padded to ``max L_i`` (frames past an utterance's end are padding).
        When the model expects normalised input (``cfg.normalize``), each waveform is first normalised on its
        own to zero mean and unit variance (a LayerNorm over the waveform, as s3prl's HuBERT expert does)."""
        if self.normalize:
            wavs = [F.layer_norm(wav, wav.shape) for wav in wavs]
        source, padding_mask = pad_waveforms(wavs)
        return {"hidden_states": self.model.hidden_states(source, padding_mask)}
