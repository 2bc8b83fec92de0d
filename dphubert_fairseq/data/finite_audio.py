"""Leaving audio with non-finite samples (NaN, inf) out of the batches, at run time.

One such file among thousands makes the teacher's targets and the loss NaN: fairseq then stops training with
a dump of NaN tensors that does not name the file, and a validation loss of NaN means no checkpoint_best.pt.
The check runs on CPU in the collater (in the data loader's workers), so it costs no GPU synchronisation.
"""

import logging
import os
from typing import Any, Dict, List

import torch
from fairseq.data import BaseWrapperDataset, FairseqDataset

logger = logging.getLogger(__name__)


class FiniteAudioDataset(BaseWrapperDataset):
    """``dataset`` (fairseq's ``FileAudioDataset``, ``manifest`` its manifest path) whose collater leaves out
    items whose ``source`` holds a NaN or inf sample and logs their files. A batch that loses every item is
    the empty batch ``{}``, which fairseq's trainer runs as a dummy batch whose gradient is multiplied by 0.

    Indices, sizes and batching are those of ``dataset``; reading an attribute the wrapper lacks (``fnames``,
    ``skipped_indices``, ``root_dir``, ``buckets``, ...) reads the wrapped dataset's.
    """

    def __init__(self, dataset: FairseqDataset, manifest: str) -> None:
        super().__init__(dataset)
        self.manifest = manifest

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found on the wrapper; "dataset" itself is absent while unpickling
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def file_name(self, index: int) -> str:
        """The audio file of item ``index``: manifest root + the relative path the manifest lists."""
        fnames = getattr(self.dataset, "fnames", None)
        if fnames is None or not hasattr(self.dataset, "root_dir"):
            return f"item {index}"
        name = fnames[index]
        name = name if isinstance(fnames, list) else name.as_py()  # a pyarrow array when pyarrow is installed
        return os.path.join(self.dataset.root_dir, self.dataset.text_compressor.decompress(name))

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        """The wrapped collater's batch of the items of ``samples`` whose (L,) ``source`` is finite (a (B, L)
        ``net_input["source"]``); ``{}`` if there are none."""
        finite, left_out = [], []
        for sample in samples:
            source = sample.get("source")
            if source is not None and not bool(torch.isfinite(source).all()):
                left_out.append(sample["id"])
            else:
                finite.append(sample)
        if left_out:
            logger.warning(
                "%s: left out of this batch (%d of %d items): audio with non-finite samples (NaN or inf): "
                "%s; task.check_audio_content=true lists all such files before training",
                self.manifest,
                len(left_out),
                len(samples),
                ", ".join(self.file_name(i) for i in left_out),
            )
        if not finite:
            return {}
        return self.dataset.collater(finite)
