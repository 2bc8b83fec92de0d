"""One exception family: every error the plugin raises for bad input is a ``DPHuBERTError`` (a ValueError) of
the kind that names what went wrong; fairseq's patches report whether they applied."""

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dphubert_fairseq as dp
from dphubert_fairseq import errors, fairseq_patches
from dphubert_fairseq.criterions.distill_loss import parse_layer_groups
from dphubert_fairseq.data.manifest_check import check_manifest
from dphubert_fairseq.models.dphubert import DPHuBERTConfig, DPHuBERTModel
from dphubert_fairseq.safe_loading import TRUST_ENV

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ERRORS = [
    errors.CheckpointError,
    errors.CheckpointLayoutError,
    errors.ManifestError,
    errors.ConfigError,
    errors.UnsupportedTeacherError,
]


def _run(script: str, env_extra=None):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.path.dirname(__file__))
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: e.__name__)
def test_every_error_is_a_value_error_and_a_dphubert_error(error):
    assert issubclass(error, errors.DPHuBERTError) and issubclass(error, ValueError)
    assert getattr(dp, error.__name__) is error and error.__name__ in dp.__all__


def test_the_family_is_exported():
    assert issubclass(dp.DPHuBERTError, ValueError) and "DPHuBERTError" in dp.__all__


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(dp.CheckpointError, match="no such checkpoint file"):
        dp.load_teacher(str(tmp_path / "missing.pt"))


def test_bad_manifest_is_a_manifest_error(tmp_path):
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{tmp_path}\nmissing.wav\t16000\n")
    with pytest.raises(dp.ManifestError, match="missing.wav does not exist"):
        check_manifest(str(manifest), 16000)


def test_repeated_distill_layer_is_a_config_error():
    with pytest.raises(dp.ConfigError, match="criterion.distill_layers: layer.*4.*more than once"):
        parse_layer_groups("0;4,4")


def test_unknown_prune_unit_is_a_config_error():
    with pytest.raises(dp.ConfigError, match="model.prune_units: unknown unit.*'heads'"):
        DPHuBERTModel(DPHuBERTConfig(prune_units=["heads"]))


def test_a_cnn_that_does_not_match_the_encoder_without_a_projection_is_a_config_error():
    """Without post_extract_proj the CNN's last channels are the encoder's input: a mismatch is refused when
    the model is built, not at its first forward."""
    from helpers import assert_one_line, tiny_student_config

    with pytest.raises(dp.ConfigError) as err:
        DPHuBERTModel(tiny_student_config(post_extract_proj=False))
    assert_one_line(str(err.value), starts_with="model.post_extract_proj is false")
    assert "24 channels and model.encoder_embed_dim is 32" in str(err.value)
    matching = tiny_student_config(
        post_extract_proj=False, conv_feature_layers="[(24,10,5)] + [(24,3,2)] * 4 + [(32,2,2)] * 2"
    )
    model = DPHuBERTModel(matching).eval()
    with torch.no_grad():
        assert model.hidden_states(torch.randn(1, 4000))[0].shape[-1] == 32


def test_malformed_trust_variable_fails_the_first_load_not_the_import(tiny_teachers):
    path = tiny_teachers["hubert_base"]
    out = _run(
        f"""
        import dphubert_fairseq as dp
        print("imported")
        dp.load_teacher({path!r})
        """,
        {TRUST_ENV: "eval"},
    )
    assert out.returncode != 0 and "imported" in out.stdout, out.stderr[-1500:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("dphubert_fairseq.errors.ConfigError: ") and TRUST_ENV in last and "eval" in last


def test_cpu_gradients_are_clipped_on_the_cpu_where_cuda_is_available(monkeypatch):
    """fairseq's clip_grad_norm_ takes the norm on the GPU whenever CUDA is available; with the patch, CPU
    gradients are clipped on the CPU there, to the same result as on a machine without a GPU."""
    from fairseq import utils

    def parameters():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
        for p in params:
            p.grad = torch.randn_like(p) * 10
        return params

    expected = parameters()
    norm = utils.clip_grad_norm_(expected, 1.0)  # no CUDA claimed: the CPU path either way
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as fairseq sees it
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(RuntimeError):  # fairseq's own: the norm sent to the GPU
        inspect.unwrap(utils.clip_grad_norm_)(parameters(), 1.0)
    clipped = parameters()
    assert torch.equal(utils.clip_grad_norm_(clipped, 1.0), norm) and norm.device.type == "cpu"
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(clipped, expected))
    assert utils.torch is torch  # fairseq's module is as it was
    assert abs(sum(p.grad.norm() ** 2 for p in clipped) ** 0.5 - 1.0) < 1e-4


def test_every_patch_applies_on_this_fairseq():
    status = fairseq_patches.install()
    assert list(status) == [patch.name for patch in fairseq_patches.PATCHES]
    assert all(status.values()), status
    assert fairseq_patches.install() == status  # idempotent: nothing is wrapped twice
    for patch in fairseq_patches.PATCHES:
        assert patch.written_for == fairseq_patches.WRITTEN_FOR and patch.target.startswith(
            ("fairseq", "torch")
        )
