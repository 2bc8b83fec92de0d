"""The s3prl upstream (``dphubert_fairseq.formats``): a pruned dphubert checkpoint through s3prl's own
upstream interface (``s3prl.nn.S3PRLUpstream`` and ``Featurizer``), the featurizer of s3prl's SUPERB
runner, and the runner itself (``python -m dphubert_fairseq.formats.s3prl_hub``); bad checkpoints give the
plugin's errors."""

import ast
import os
import sys
from typing import List, Tuple

import helpers
import pytest
import torch
from helpers import randomise_gates

import dphubert_fairseq as dp
from dphubert_fairseq.formats import s3prl_hub
from dphubert_fairseq.formats.s3prl_upstream import UpstreamExpert

#: two utterances of unequal length, neither a multiple of the 320-sample frame step
LENGTHS = (16000, 9999)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict:
    """Tiny HuBERT teachers: Base shape (raw waveforms in) and Large shape (normalised waveforms in)."""
    folder = tmp_path_factory.mktemp("s3prl_teachers")
    return {
        "base": helpers.make_teacher(str(folder / "hubert_base.pt"), "hubert"),
        "large": helpers.make_teacher(str(folder / "hubert_large.pt"), "hubert", large_shape=True, seed=1),
    }


@pytest.fixture(scope="module", params=["base", "large"])
def checkpoint(request, teachers, tmp_path_factory) -> str:
    """A pruned dphubert checkpoint with per-layer head / FFN sizes (and CNN channels for Base)."""
    units = ("head", "interm", "attlayer", "ffnlayer") + (("conv",) if request.param == "base" else ())
    student = randomise_gates(dp.student_from_teacher(teachers[request.param], units)).eval()
    pruned = dp.prune(student)
    assert len(set(pruned.cfg.encoder_attention_heads)) > 1 or len(set(pruned.cfg.encoder_ffn_embed_dims)) > 1
    assert pruned.cfg.normalize == (request.param == "large")
    return dp.save_model(pruned, tmp_path_factory.mktemp("s3prl_ckpt") / f"{request.param}.pt")


@pytest.fixture(scope="module")
def hub():
    """``s3prl.hub`` with ``dphubert_local`` registered (skips when s3prl is not installed)."""
    pytest.importorskip("s3prl")
    return s3prl_hub.register()


def waveforms() -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [0.1 * torch.randn(n, generator=g) + 0.05 for n in LENGTHS]


def reference(path: str, wavs: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[int]]:
    """Our hidden states of the padded batch ``[h_0..h_L]`` (each ``(B, T, D)``) and each utterance's number
    of non-padding frames, from ``load_model`` and ``hidden_states`` directly. A model that expects normalised
    input gets each waveform standardised: ``(x - mean) / sqrt(var + 1e-5)``, var over the waveform."""
    model = dp.load_model(path)
    if model.cfg.normalize:
        wavs = [(w - w.mean()) / torch.sqrt(w.var(unbiased=False) + 1e-5) for w in wavs]
    source = torch.zeros(len(wavs), max(LENGTHS))
    mask = torch.ones(len(wavs), max(LENGTHS), dtype=torch.bool)
    for i, w in enumerate(wavs):
        source[i, : w.numel()] = w
        mask[i, : w.numel()] = False
    with torch.no_grad():
        hidden = model.hidden_states(source, mask)
    frame_mask = model.frame_padding_mask(mask, hidden[0].size(1))
    valid = [hidden[0].size(1)] * len(wavs) if frame_mask is None else (~frame_mask).sum(-1).tolist()
    return hidden, valid


def num_layers(path: str) -> int:
    return dp.load_model(path).cfg.encoder_layers


def test_s3prl_upstream_and_featurizer_match_our_hidden_states(hub, checkpoint):
    from s3prl.nn import Featurizer, S3PRLUpstream

    upstream = S3PRLUpstream(s3prl_hub.ENTRY, path_or_url=checkpoint).eval()  # s3prl looks it up in s3prl.hub
    wavs = waveforms()
    lengths = torch.tensor(LENGTHS)
    with torch.no_grad():
        all_hs, all_lens = upstream(torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), lengths)
    ours, valid = reference(checkpoint, wavs)

    assert upstream.num_layers == len(all_hs) == len(ours) == num_layers(checkpoint) + 1
    assert upstream.downsample_rates == [320] * upstream.num_layers
    assert upstream.hidden_sizes == [h.size(-1) for h in ours]
    for h, h_len, mine in zip(all_hs, all_lens, ours):
        assert h_len.tolist() == [(n - 1) // 320 + 1 for n in LENGTHS]  # s3prl's count from our rate
        for i, n in enumerate(valid):
            frames = min(n, int(h_len[i]))
            assert frames >= int(h_len[i]) - 2
            torch.testing.assert_close(h[i, :frames], mine[i, :frames], rtol=0, atol=1e-5)

    featurizer = Featurizer(upstream)  # untrained weights: softmax of zeros, the mean of all layers
    with torch.no_grad():
        feature, feature_len = featurizer(all_hs, all_lens)
    mean = torch.stack(ours).mean(0)
    assert featurizer.downsample_rate == 320 and featurizer.output_size == mean.size(-1)
    for i, n in enumerate(valid):
        frames = min(n, int(feature_len[i]))
        torch.testing.assert_close(feature[i, :frames], mean[i, :frames], rtol=0, atol=1e-5)


def test_superb_runner_featurizer_takes_every_layer(hub, checkpoint):
    """The featurizer of s3prl's SUPERB runner (``s3prl.upstream.interfaces.Featurizer``), on the upstream the
    runner builds from ``s3prl.hub``: a weighted sum over h_0..h_L at 320 samples per frame."""
    from s3prl.upstream.interfaces import Featurizer

    upstream = getattr(hub, s3prl_hub.ENTRY)(ckpt=checkpoint, model_config=None, refresh=False)
    assert isinstance(upstream, UpstreamExpert) and upstream.get_downsample_rates("hidden_states") == 320
    featurizer = Featurizer(upstream=upstream, upstream_device="cpu")
    assert featurizer.layer_num == num_layers(checkpoint) + 1
    assert featurizer.downsample_rate == 320

    wavs = waveforms()
    with torch.no_grad():
        features = featurizer(wavs, upstream(wavs))
    ours, valid = reference(checkpoint, wavs)
    mean = torch.stack(ours).mean(0)
    assert featurizer.output_dim == mean.size(-1)
    for i, (feature, n) in enumerate(zip(features, valid)):
        assert feature.size(0) == min(round(LENGTHS[i] / 320), mean.size(1))  # s3prl's cut, within the batch
        frames = min(n, feature.size(0))
        torch.testing.assert_close(feature[:frames], mean[i, :frames], rtol=0, atol=1e-5)


def test_teacher_or_missing_checkpoint_gives_checkpoint_error(teachers, tmp_path):
    with pytest.raises(dp.CheckpointError) as e:
        UpstreamExpert(teachers["base"])
    helpers.assert_one_line(str(e.value), starts_with=teachers["base"], contains=["'hubert'", "dphubert"])
    with pytest.raises(dp.CheckpointError) as e:
        s3prl_hub.dphubert_local(str(tmp_path / "missing.pt"))
    helpers.assert_one_line(str(e.value), starts_with=str(tmp_path / "missing.pt"))
    with pytest.raises(dp.CheckpointError) as e:
        UpstreamExpert(None)  # s3prl's runner without -k
    helpers.assert_one_line(str(e.value), contains=["-k"])


def test_model_config_is_refused():
    with pytest.raises(dp.ConfigError) as e:
        UpstreamExpert("dphubert.pt", model_config="model.yaml")  # s3prl's runner with -g model.yaml
    helpers.assert_one_line(str(e.value), starts_with="model.yaml", contains=["-g"])


def test_without_s3prl_register_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3prl", None)  # `import s3prl...` now fails as if it were not installed
    monkeypatch.setitem(sys.modules, "s3prl.hub", None)
    with pytest.raises(ImportError) as e:
        s3prl_hub.register()
    helpers.assert_one_line(
        str(e.value), starts_with="dphubert_fairseq/formats/s3prl_hub.py", contains=["pip install"]
    )


def test_launcher_names_a_missing_task_config(tmp_path, monkeypatch):
    """pip's s3prl has no downstream/<task>/config.yaml: the launcher says where to run or what to pass."""
    monkeypatch.chdir(tmp_path)
    problem = s3prl_hub.missing_task_config(["-m", "train", "-u", s3prl_hub.ENTRY, "-k", "m.pt", "-d", "asr"])
    helpers.assert_one_line(problem, starts_with="./downstream/asr/config.yaml: not found", contains=["-c"])
    assert s3prl_hub.missing_task_config(["-m", "train", "-d", "asr", "-c", "asr.yaml"]) is None
    assert s3prl_hub.missing_task_config(["-m", "evaluate", "-e", "exp/states-1.ckpt"]) is None
    (tmp_path / "downstream" / "asr").mkdir(parents=True)
    (tmp_path / "downstream" / "asr" / "config.yaml").write_text("runner: {}\n")
    assert s3prl_hub.missing_task_config(["-m", "train", "-d", "asr"]) is None


def test_the_package_imports_s3prl_only_inside_functions():
    """The plugin (formats included) imports without s3prl: no module imports it at module level."""
    package = os.path.join(helpers.REPO, "dphubert_fairseq")
    top_level = []
    for folder, _, files in os.walk(package):
        for name in (f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            in_function = {
                id(n)
                for fn in ast.walk(tree)
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                for n in ast.walk(fn)
            }
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                if any(n.split(".")[0] == "s3prl" for n in names) and id(node) not in in_function:
                    top_level.append(f"{path}:{node.lineno}")
    assert not top_level, top_level


EXAMPLE_CONFIG = """\
runner:
  total_steps: 2
  gradient_clipping: 1
  gradient_accumulate_steps: 1
  log_step: 1
  eval_step: 1000
  save_step: 2
  max_keep: 1
  eval_dataloaders: [dev]
  evaluate_ratio: 0.01
optimizer:
  name: TorchOptim
  torch_optim_name: Adam
  lr: 1.0e-4
downstream_expert:
  datarc: {train_batch_size: 2, eval_batch_size: 2, num_workers: 0}
  modelrc: {input_dim: 8}
"""


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["base"], indirect=True)
def test_superb_runner_trains_and_evaluates_with_the_entry(hub, checkpoint, tmp_path):
    """s3prl's own run_downstream.py, through the launcher, on s3prl's ``example`` downstream (random data):
    ``-u dphubert_local -k CKPT`` trains two steps and evaluates the saved state."""
    config = tmp_path / "config.yaml"
    config.write_text(EXAMPLE_CONFIG)
    launcher = [sys.executable, "-m", "dphubert_fairseq.formats.s3prl_hub"]
    common = ["-u", s3prl_hub.ENTRY, "-k", checkpoint, "-d", "example", "--device", "cpu"]
    out = helpers.run(launcher + ["-m", "train", "-c", str(config), "-p", str(tmp_path / "exp")] + common)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Take a list of {num_layers(checkpoint) + 1} features" in out.stderr
    assert "downsample rate is 320" in out.stderr
    state = tmp_path / "exp" / "states-2.ckpt"
    assert state.exists(), os.listdir(tmp_path / "exp")
    out = helpers.run(
        launcher + ["-m", "evaluate", "-e", str(state), "-t", "dev", "--device", "cpu"], cwd=str(tmp_path)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Resume from" in out.stdout and "dev:" in out.stderr  # s3prl's evaluation loop over the dev split
