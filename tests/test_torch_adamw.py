"""``torch_adamw`` (optim/torch_adamw.py): torch's AdamW as a fairseq optimizer, the recipe's. Its update is the
reference's formula, the configs' groups get it fused, and runs saved with fairseq's ``adam`` resume with it."""

import os

import pytest
import torch
from fairseq import optim
from helpers import REPO, compose
from omegaconf import OmegaConf

from dphubert_fairseq.optim.torch_adamw import TorchAdamW

LR, BETAS, EPS, DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.1


def config(name: str = "torch_adamw", **extra):
    return OmegaConf.create(
        {
            "_name": name,
            "lr": [LR],
            "adam_betas": list(BETAS),
            "adam_eps": EPS,
            "weight_decay": DECAY,
            **extra,
        }
    )


def params_with_grads(seed: int = 0, scale: float = 1.0):
    """Three parameters of assorted shapes and fixed gradients (``scale`` times unit normals)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((4, 3), (5,), (2, 2, 2))]
    grads = [scale * torch.randn(p.shape, generator=g) for p in params]
    return params, grads


def adamw_by_hand(values, grads, steps: int, start=None):
    """The reference's AdamW written out (float64): decoupled decay, eps after the bias correction. ``start``:
    (m, v, t) to continue from."""
    b1, b2 = BETAS
    out = []
    for i, (p, g) in enumerate(zip(values, grads)):
        p, g = p.double(), g.double()
        m, v, t = (torch.zeros_like(p), torch.zeros_like(p), 0) if start is None else start[i]
        m, v = m.double(), v.double()
        for _ in range(steps):
            t += 1
            p = p * (1 - LR * DECAY)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p = p - LR / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + EPS)
        out.append(p)
    return out


def take_steps(opt, params, grads, steps: int) -> None:
    for _ in range(steps):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("scale", [1.0, 1e-7])
def test_the_update_is_the_references_adamw(scale):
    """Three steps equal AdamW written out, at ordinary gradients and at gradients near eps (where fairseq's
    ``adam``, eps before the bias correction, moves the weights visibly less)."""
    params, grads = params_with_grads(scale=scale)
    start = [p.detach().clone() for p in params]
    opt = optim.build_optimizer(config(), params)
    assert isinstance(opt, TorchAdamW) and opt.fused  # the CPU has torch's fused kernel
    take_steps(opt, params, grads, 3)
    expected = adamw_by_hand(start, grads, 3)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-6, atol=1e-9)

    fairseqs = [torch.nn.Parameter(s.clone()) for s in start]
    take_steps(optim.build_optimizer(config("adam", tpu=False), fairseqs), fairseqs, grads, 3)
    moved = lambda ps: sum((p.detach() - s * (1 - LR * DECAY) ** 3).abs().sum() for p, s in zip(ps, start))  # noqa: E731
    ratio = float(moved(fairseqs) / moved(params))
    assert ratio == pytest.approx(1.0, abs=1e-3) if scale == 1.0 else ratio < 0.5


def test_fused_is_chosen_and_can_be_refused():
    params, _ = params_with_grads()
    assert optim.build_optimizer(config(fused=False), params).optimizer.param_groups[0]["fused"] is None
    assert optim.build_optimizer(config(fused=True), params).optimizer.param_groups[0]["fused"] is True
    meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    assert not optim.build_optimizer(config(), meta).fused  # no fused kernel there: torch's other path
    with pytest.raises(
        ValueError,
        match=r"^optimizer.fused=true: torch has no fused AdamW for parameters on meta/torch.float32$",
    ):
        optim.build_optimizer(config(fused=True), meta)


@pytest.mark.parametrize("name", ["dphubert", "dphubert_final"])
def test_the_recipes_configs_use_it_fused_in_every_group(name):
    card = ["task.data=D", "task.teacher_path=T", "checkpoint.save_dir=O", "optimization.max_update=10"]
    cfg = compose(
        os.path.join(REPO, "configs"), name, card + (["task.student_path=S"] if "final" in name else [])
    )
    params = []
    for group in ("default", "gates", "lagrangian"):
        p = torch.nn.Parameter(torch.ones(3))
        p.param_group = group
        params.append(p)
    opt = optim.build_optimizer(cfg.optimizer, params if name == "dphubert" else params[:1])
    inner = opt.optimizers if name == "dphubert" else {"default": opt}
    assert set(inner) == ({"default", "gates", "lagrangian"} if name == "dphubert" else {"default"})
    for group, o in inner.items():
        assert isinstance(o, TorchAdamW) and o.fused, group
        assert o.optimizer.param_groups[0]["betas"] == BETAS and o.optimizer.param_groups[0]["eps"] == EPS
    if name == "dphubert":
        assert {g: o.cfg.lr[0] for g, o in inner.items()} == {
            "default": 2e-4,
            "gates": 0.02,
            "lagrangian": 0.02,
        }


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_a_run_saved_with_fairseqs_adam_resumes_with_it(tmp_path, device):
    """fairseq's ``adam`` state (integer step counts on the CPU, no kernel or decay-mode keys), read back
    weights-only as checkpoints are, continues in torch_adamw: the moments and counts carry over (the counts
    onto the parameters' device, where the fused kernel reads them), the kernel stays fused, the decay stays
    decoupled, and the next steps follow AdamW from there; its own state round-trips the same way."""
    params, grads = params_with_grads(seed=1)
    params = [torch.nn.Parameter(p.detach().to(device)) for p in params]
    grads = [g.to(device) for g in grads]
    old = optim.build_optimizer(config("adam", tpu=False), params)
    take_steps(old, params, grads, 2)
    torch.save(old.state_dict(), tmp_path / "adam.pt")
    moments = [
        (old.optimizer.state[p]["exp_avg"].clone(), old.optimizer.state[p]["exp_avg_sq"].clone(), 2)
        for p in params
    ]
    at_two = [p.detach().clone() for p in params]

    opt = optim.build_optimizer(config(), params)
    opt.load_state_dict(torch.load(tmp_path / "adam.pt", weights_only=True))
    group = opt.optimizer.param_groups[0]
    assert group["fused"] is True and group["decoupled_weight_decay"] is True
    assert all(opt.optimizer.state[p]["step"].dtype == torch.float32 for p in params)
    assert all(opt.optimizer.state[p]["step"].device == p.device for p in params)
    take_steps(opt, params, grads, 2)
    for p, e in zip(params, adamw_by_hand(at_two, grads, 2, start=moments)):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-6, atol=1e-9)

    torch.save(opt.state_dict(), tmp_path / "torch_adamw.pt")
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    again = optim.build_optimizer(config(), twins)
    again.load_state_dict(torch.load(tmp_path / "torch_adamw.pt", weights_only=True))
    take_steps(opt, params, grads, 1)
    take_steps(again, twins, grads, 1)
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
