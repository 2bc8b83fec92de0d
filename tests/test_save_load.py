"""save_model writes a fairseq checkpoint that stock fairseq loads back, bit for bit."""

import os
import sys
import textwrap

import helpers
import pytest
import torch
from fairseq import checkpoint_utils
from helpers import padded_batch, randomise_gates

import dphubert_fairseq as dp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pruned(tiny_teachers):
    return dp.prune(
        randomise_gates(
            dp.student_from_teacher(
                tiny_teachers["hubert_base"], ("conv", "head", "interm", "attlayer", "ffnlayer")
            )
        ).eval()
    )


def test_stock_loader_reproduces_hidden_states(pruned, unequal_batch, tmp_path):
    path = dp.save_model(pruned, tmp_path / "pruned.pt")
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path])
    loaded = models[0].eval()
    assert type(loaded) is dp.DPHuBERTModel
    assert cfg.task._name == "audio_pretraining"
    source, mask = padded_batch(unequal_batch)
    with torch.no_grad():
        for a, b in zip(pruned.hidden_states(source, mask), loaded.hidden_states(source, mask)):
            assert torch.equal(a, b)
    assert dp.count_params(loaded) == dp.count_params(pruned)
    assert list(os.listdir(tmp_path)) == ["pruned.pt"]  # no temporary file left behind


def test_gated_model_round_trips_with_its_gates(tiny_teachers, tmp_path):
    model = randomise_gates(dp.student_from_teacher(tiny_teachers["wav2vec2_large"])).eval()
    loaded = dp.load_model(dp.save_model(model, tmp_path / "gated.pt"))
    assert set(loaded.gates()) == set(model.gates())
    source = torch.randn(2, 8000)
    with torch.no_grad():
        for a, b in zip(model.hidden_states(source), loaded.hidden_states(source)):
            assert torch.equal(a, b)


def test_fresh_process_loads_with_stock_fairseq_only(pruned, tmp_path):
    """A new Python process, in an empty folder, with no teacher and no data: import the plugin, then use
    fairseq's own loader; plain torch.load with weights_only (the default) works too."""
    path = dp.save_model(pruned, tmp_path / "pruned.pt")
    expected = pruned.hidden_states(torch.ones(1, 4000) * 0.1)[-1]
    torch.save(expected, tmp_path / "expected.bin")
    script = textwrap.dedent(
        f"""
        import torch, dphubert_fairseq
        from fairseq import checkpoint_utils
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([{str(path)!r}])
        m = models[0].eval()
        got = m.hidden_states(torch.ones(1, 4000) * 0.1)[-1]
        assert torch.equal(got, torch.load({str(tmp_path / "expected.bin")!r})), "hidden states differ"
        state = torch.load({str(path)!r})
        assert state["cfg"]["model"]["_name"] == "dphubert"
        print("ok", type(m).__name__)
        """
    )
    workdir = tmp_path / "empty"
    workdir.mkdir()
    out = helpers.run([sys.executable, "-c", script], cwd=str(workdir))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok DPHuBERTModel" in out.stdout


def test_failed_save_keeps_the_previous_file(pruned, tmp_path):
    path = tmp_path / "model.pt"
    dp.save_model(pruned, path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        dp.save_model(pruned, path, extra_state={"unpicklable": lambda: None})
    assert path.read_bytes() == before
    assert list(os.listdir(tmp_path)) == ["model.pt"]
