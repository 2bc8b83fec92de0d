"""The encoder's convolutional positional embedding, in both of fairseq's forms."""

import torch.nn as nn
from fairseq.models.wav2vec.wav2vec2 import make_conv_pos
from fairseq.modules import LayerNorm, SamePad, TransposeLast


def positional_conv(embed_dim: int, kernel: int, groups: int, batch_norm: bool, depth: int) -> nn.Module:
    """``(B, D, T) -> (B, D, T)``, added to the encoder's input.

    ``depth`` 1: wav2vec2 / HuBERT's one weight-normalised grouped conv (fairseq's own builder, so that state
    dicts match stock checkpoints), BatchNorm first in its batch-norm variant. ``depth`` > 1: data2vec's stack
    (fairseq builds it inside ``TransformerEncoder.__init__``; the same modules in the same order here, so the
    names match): ``depth`` blocks of grouped conv of ``kernel``, trimmed to length, LayerNorm over channels
    without affine parameters, GELU.
    """
    if depth == 1:
        return make_conv_pos(embed_dim, kernel, groups, is_batch_norm=batch_norm)
    return nn.Sequential(
        *[
            nn.Sequential(
                nn.Conv1d(embed_dim, embed_dim, kernel_size=kernel, padding=kernel // 2, groups=groups),
                SamePad(kernel),
                TransposeLast(),
                LayerNorm(embed_dim, elementwise_affine=False),
                TransposeLast(),
                nn.GELU(),
            )
            for _ in range(depth)
        ]
    )
