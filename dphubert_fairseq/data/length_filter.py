"""Leaving out utterances longer than the maximum, as the reference recipe does, instead of fairseq's cropping.

fairseq's ``FileAudioDataset`` drops utterances shorter than ``min_sample_size`` when it reads the manifest
but keeps longer ones and crops a random ``max_sample_size`` window out of them in every batch. The DPHuBERT
reference drops both, so its stage 1 never sees a cropped utterance.
"""

from dataclasses import dataclass

import numpy as np
from fairseq.data.audio.raw_audio_dataset import FileAudioDataset

from ..errors import ConfigError


@dataclass
class LeftOut:
    """What a length filter removed from one split: ``count`` utterances of ``samples`` samples in all."""

    count: int
    samples: int

    def seconds(self, sample_rate: int) -> float:
        return self.samples / sample_rate


def drop_long_utterances(dataset: FileAudioDataset, max_samples: int) -> LeftOut:
    """Remove the utterances longer than ``max_samples`` from ``dataset`` in place; returns what was removed.

    The removed manifest lines join ``dataset.skipped_indices`` (fairseq's record of the lines it left out, as
    for the short ones), and the size buckets are rebuilt from the remaining sizes.
    """
    if not isinstance(dataset, FileAudioDataset):
        raise ConfigError(
            f"task.long_utterances=drop needs manifest-based audio (FileAudioDataset), not "
            f"{type(dataset).__name__}; use task.long_utterances=crop"
        )
    sizes = np.asarray(dataset.sizes)
    long = sizes > max_samples
    if not long.any():
        return LeftOut(0, 0)
    # manifest line of each item: the lines fairseq kept, in order
    kept_lines = [
        i for i in range(len(sizes) + len(dataset.skipped_indices)) if i not in dataset.skipped_indices
    ]
    dataset.skipped_indices.update(kept_lines[i] for i in np.flatnonzero(long))
    keep = np.flatnonzero(~long)
    if isinstance(dataset.fnames, list):
        dataset.fnames = [dataset.fnames[i] for i in keep]
    else:  # a pyarrow array when pyarrow is installed
        dataset.fnames = dataset.fnames.take(keep)
    dataset.sizes = sizes[keep]
    dataset.set_bucket_info(dataset.num_buckets)
    return LeftOut(int(long.sum()), int(sizes[long].sum()))
