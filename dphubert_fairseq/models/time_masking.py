"""Time and channel masking for fine-tuning (wav2vec2 / HuBERT style); off during distillation."""

from typing import Optional

import torch
import torch.nn as nn
from fairseq.data.data_utils import compute_mask_indices


class TimeChannelMasking(nn.Module):
    """Replaces spans of frames with a learned ``mask_emb`` and zeroes spans of channels, as fairseq's
    ``HubertModel.apply_mask`` does. ``(B, T, D)`` -> ``(B, T, D)``; identity unless training with a mask
    probability above 0 (stock ``wav2vec_ctc`` / ``hubert_ctc`` set them through their ``mask_*`` options).

    ``mask_emb`` always exists, so that every checkpoint can be fine-tuned with masking; while the mask
    probability is 0 it takes no gradient (and so stays out of the optimizer and of DDP).
    """

    def __init__(self, cfg, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.mask_emb = nn.Parameter(torch.empty(embed_dim).uniform_())
        self.mask_emb.requires_grad_(cfg.mask_prob > 0)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        cfg = self.cfg
        if not self.training:
            return x
        batch, time, channels = x.shape
        if cfg.mask_prob > 0:
            spans = compute_mask_indices(
                (batch, time),
                padding_mask,
                cfg.mask_prob,
                cfg.mask_length,
                cfg.mask_selection,
                cfg.mask_other,
                min_masks=2,
                no_overlap=cfg.no_mask_overlap,
                min_space=cfg.mask_min_space,
            )
            spans = torch.from_numpy(spans).to(x.device)
            x = torch.where(spans.unsqueeze(-1), self.mask_emb.to(x.dtype), x)
        if cfg.mask_channel_prob > 0:
            channels_masked = compute_mask_indices(
                (batch, channels),
                None,
                cfg.mask_channel_prob,
                cfg.mask_channel_length,
                cfg.mask_channel_selection,
                cfg.mask_channel_other,
                no_overlap=cfg.no_mask_channel_overlap,
                min_space=cfg.mask_channel_min_space,
            )
            x = x.masked_fill(torch.from_numpy(channels_masked).to(x.device).unsqueeze(1), 0.0)
        return x
