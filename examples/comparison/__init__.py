"""The comparison: DPHuBERT against the baselines it claims to beat (a DistilHuBERT-style student, a uniformly
thinned student, DPHuBERT's structure with random weights), all at one parameter count, trained on the same
audio for the same number of updates from a small HuBERT teacher pretrained by stock fairseq, and measured on
held-out audio (layer similarity, keyword and speaker probes, size and cost). Run it with
``python -m examples.comparison --out OUT`` from the repository root; ``plan.py`` says what is compared.
"""
