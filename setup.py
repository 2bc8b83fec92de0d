"""dphubert-fairseq: DPHuBERT structured pruning + distillation of HuBERT / wav2vec2 as a fairseq plugin."""

import glob
import os
import re
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithConfigs(build_py):
    """Ship the recipe's ``configs/**/*.yaml`` inside the package (``dphubert_fairseq/configs``), where
    ``dphubert_fairseq.config_dir()`` finds them in a non-editable install. ``configs/`` at the top level stays
    the source of truth; an editable install reads it directly."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "dphubert_fairseq", "configs")
        source = os.path.join(HERE, "configs")
        for path in sorted(glob.glob(os.path.join(source, "**", "*.yaml"), recursive=True)):
            copy = os.path.join(target, os.path.relpath(path, source))
            os.makedirs(os.path.dirname(copy), exist_ok=True)
            shutil.copy2(path, copy)


# What the plugin needs. On Python >= 3.11 the official fairseq 0.12.2 does not install (old hydra/omegaconf
# pins); ve-fairseq 0.12.3 is a prebuilt build of fairseq's main branch that provides the same `fairseq` package.
REQUIRES = [
    # 2.4: the device-generic autocast queries (torch.is_autocast_enabled(device), get_autocast_dtype) the
    # model reads in every training forward, and the fused AdamW on CPU
    "torch>=2.4",
    "torchaudio>=2.4",
    "soundfile",
    "numpy",
    "omegaconf>=2.1",
    "tensorboardX",  # fairseq writes the training curves (common.tensorboard_logdir) through it
    "ve-fairseq==0.12.3; python_version >= '3.11'",
    "fairseq>=0.12.2; python_version < '3.11'",
]

# The set the test suite and CI run on (Python 3.11): torch and torchaudio must come from the same release.
TESTED = [
    "torch==2.9.1",
    "torchaudio==2.9.1",
    "ve-fairseq==0.12.3",
    "hydra-core==1.3.*",
    "omegaconf==2.3.*",
    "numpy>=2,<3",
    "soundfile>=0.12",
]

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    # links into the checkout (docs/, benchmarks/, ...) lead nowhere on a package index: their text stays
    LONG_DESCRIPTION = re.sub(r"\[([^\]]+)\]\((?![a-z]+:|#)[^)]*\)", r"\1", f.read())

setup(
    name="dphubert-fairseq",
    version="0.1.0",
    description="DPHuBERT (joint distillation and structured pruning of HuBERT / wav2vec2) as a fairseq plugin",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/markdown",
    # the plugin only: examples/ (the quickstart), benchmarks/, tests/ and fairseq_runs/ (their shared helpers
    # for running fairseq) belong to the checkout
    packages=find_packages(include=["dphubert_fairseq", "dphubert_fairseq.*"]),
    cmdclass={"build_py": BuildWithConfigs},
    python_requires=">=3.8",
    install_requires=REQUIRES,
    extras_require={
        "tested": TESTED,
        # editdistance: WER in fairseq's CTC validation; ruff: the format and lint check of tests/run.sh (ruff.toml),
        # pinned because formatting changes between releases
        "test": ["pytest>=7", "editdistance", "ruff==0.17.6"],
        "quickstart": ["matplotlib", "scikit-learn"],  # figures; k-means of MFCC features
        # dphubert-export --onnx (dphubert_fairseq/formats/onnx_export.py): the ONNX file and its check with
        # onnxruntime (tested: onnx 1.23.2, onnxruntime 1.32.0 with torch 2.9.1's TorchScript-based exporter)
        "onnx": ["onnx>=1.15", "onnxruntime>=1.17"],
        # hydra's submitit launcher: `fairseq-hydra-train -m ... hydra/launcher=submitit_slurm` (README, "On a
        # SLURM cluster"); submitit_local runs the same job on this machine. >=1.2: the release made for
        # hydra-core 1.2/1.3 (tested: 1.2.0 with hydra-core 1.3.8, submitit 1.5.4)
        "slurm": ["hydra-submitit-launcher>=1.2"],
        # SUPERB with s3prl's runner (dphubert_fairseq/formats/s3prl_hub.py): its run_downstream.py and
        # downstream/runner.py import HfFolder and Repository, gone from huggingface_hub 1.0, which transformers 5
        # requires; pandas and editdistance: the asr downstream, librosa: voxceleb1 (SID)
        "superb": [
            "s3prl==0.4.18",
            "huggingface_hub<1",
            "transformers<5",
            "pandas",
            "editdistance",
            "librosa",
        ],
    },
    entry_points={
        "console_scripts": [
            "dphubert-export=dphubert_fairseq.export:main",
            "dphubert-import=dphubert_fairseq.import_reference:main",
            "dphubert-profile=dphubert_fairseq.latency_profile:main",
        ]
    },
    license="MIT",
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
