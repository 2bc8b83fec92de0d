"""HuBERT's first-iteration targets: k-means clusters of MFCC features, one label per 10 ms frame."""

import os
from typing import Dict, List

import numpy as np
import soundfile as sf
import torch
import torchaudio

LABEL_RATE = 100  # Hz: Kaldi MFCC frames every 10 ms


def mfcc_with_deltas(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """Kaldi-compatible MFCC (13) with deltas and delta-deltas: ``(frames, 39)``."""
    waveform = torch.from_numpy(wav).float().unsqueeze(0)
    mfcc = torchaudio.compliance.kaldi.mfcc(waveform, sample_frequency=sample_rate, use_energy=False)
    mfcc = mfcc.transpose(0, 1)  # (13, frames)
    deltas = torchaudio.functional.compute_deltas(mfcc)
    ddeltas = torchaudio.functional.compute_deltas(deltas)
    return torch.cat([mfcc, deltas, ddeltas], dim=0).transpose(0, 1).numpy()


def _manifest_files(manifest: str) -> List[str]:
    with open(manifest) as f:
        root = f.readline().strip()
        return [os.path.join(root, line.split("\t")[0]) for line in f if line.strip()]


def write_kmeans_labels(folder: str, splits=("train", "valid"), clusters: int = 50, seed: int = 0) -> None:
    """Fit k-means on the train split's MFCCs; write ``{split}.km`` and ``dict.km.txt`` into ``folder``."""
    from sklearn.cluster import MiniBatchKMeans

    features = {
        split: [
            mfcc_with_deltas(*sf.read(path, dtype="float32"))
            for path in _manifest_files(os.path.join(folder, f"{split}.tsv"))
        ]
        for split in splits
    }
    train = np.concatenate(features["train"])
    mean, std = train.mean(0), train.std(0) + 1e-5
    kmeans = MiniBatchKMeans(n_clusters=clusters, random_state=seed, n_init=3, batch_size=4096).fit(
        (train - mean) / std
    )
    for split in splits:
        with open(os.path.join(folder, f"{split}.km"), "w") as f:
            for feats in features[split]:
                f.write(" ".join(map(str, kmeans.predict((feats - mean) / std))) + "\n")
    with open(os.path.join(folder, "dict.km.txt"), "w") as f:
        f.writelines(f"{i} 1\n" for i in range(clusters))


def label_prior(folder: str) -> Dict[str, float]:
    """How well the label prior alone predicts: the cross-entropy (bits per frame) of the valid split's labels
    under the train split's label frequencies (add-one smoothed), and the accuracy of always answering the
    most frequent train label."""

    def labels(split: str) -> np.ndarray:
        with open(os.path.join(folder, f"{split}.km")) as f:
            return np.array([int(x) for line in f for x in line.split()])

    train, valid = labels("train"), labels("valid")
    clusters = max(train.max(), valid.max()) + 1
    counts = np.bincount(train, minlength=clusters) + 1.0
    prior = counts / counts.sum()
    return {
        "bits": float(-np.log2(prior[valid]).mean()),
        "accuracy": float((valid == counts.argmax()).mean()),
    }
