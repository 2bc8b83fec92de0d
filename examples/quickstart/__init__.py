"""The quickstart: the whole DPHuBERT pipeline on an embedded default, on a laptop, in minutes.

Real speech (pocketsphinx-testdata's LibriVox clips and espeak-ng sentences), a small HuBERT teacher pretrained
by stock fairseq on MFCC k-means labels, then stage 1, export, stage 2, export with the same commands a user
runs at full scale, and a report. Run it with ``bash examples/quickstart.sh [OUT]`` or
``python -m examples.quickstart --out OUT`` from the repository root.
"""
