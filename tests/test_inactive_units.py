"""Inactive units (models/inactive_units.py), and units whose gate sample is 0 at an update: left out of the
forward and backward passes, exactly as if their gates were closed; no gradient, no compute, inactive sets
kept across checkpoints and agreed on by every worker. Or, where the device does that faster
(models/gather_policy.py), computed at full width and masked: the same result."""

import os
import subprocess
import sys
import types

import pytest
import torch
from helpers import free_port, randomise_gates, tiny_student_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from dphubert_fairseq.macs import count_macs
from dphubert_fairseq.models import gather_policy, inactive_units
from dphubert_fairseq.models.dphubert import DPHuBERTModel
from dphubert_fairseq.models.gather_policy import FRACTIONS, BreakEven
from dphubert_fairseq.models.hard_concrete import HardConcrete
from dphubert_fairseq.models.inactive_units import update_active_sets

ALL_UNITS = ["conv", "head", "interm", "attlayer", "ffnlayer"]
#: (pre-LN with LayerNorms in the CNN: the Large shape, WavLM's relative position bias)
KINDS = {"base": (False, False), "large": (True, False), "wavlm": (False, True)}
SAMPLES = 4000


def tiny_student(kind: str = "base", units=ALL_UNITS) -> DPHuBERTModel:
    """A tiny gated student with random weights and gates, every dropout off (the skipped and the masked
    computations then draw the same random numbers)."""
    large, wavlm = KINDS[kind]
    config = dict(
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        dropout_input=0.0,
        prune_units=list(units),
    )
    if large:
        config.update(extractor_mode="layer_norm", layer_norm_first=True)
    if wavlm:
        config.update(
            relative_position_buckets=16, relative_position_max_distance=64, relative_position_heads=4
        )
    torch.manual_seed(0)
    model = DPHuBERTModel(tiny_student_config(**config))
    with torch.no_grad():  # LayerNorms and biases away from 1 / 0, so that a wrong slice shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return randomise_gates(model)


def chosen_inactive(model: DPHuBERTModel, seed: int = 1):
    """{gate name: (n,) bool active set}: about 40% of every gate vector's units, plus the corner cases: every
    head of layer 1, every FFN unit of layer 2, the attention block of layer 0, the FFN block of layer 1."""
    g = torch.Generator().manual_seed(seed)
    chosen = {
        name: torch.rand(gate.n, generator=g) > 0.4 for name, gate in model.gates().items() if gate.n > 1
    }
    gates = model.gates()
    for name in (
        "encoder.layers.1.self_attn.head_gate",
        "encoder.layers.2.ffn.unit_gate",
        "encoder.layers.0.self_attn.layer_gate",
        "encoder.layers.1.ffn.layer_gate",
    ):
        if name in gates:
            chosen[name] = torch.zeros(gates[name].n, dtype=torch.bool)
    return chosen


def pair(kind: str, units=ALL_UNITS):
    """(skipping, closed): the same model twice, the chosen units inactive in the first and kept active with
    gates that can never open (log_alpha -60: every sample and the eval mask are exactly 0) in the second."""
    skipping, closed = tiny_student(kind, units), tiny_student(kind, units)
    closed.load_state_dict(skipping.state_dict())
    chosen = chosen_inactive(skipping)
    with torch.no_grad():
        for name, active in chosen.items():
            skipping.gates()[name].set_active(active)
            closed.gates()[name].log_alpha.masked_fill_(~active, -60.0)
    return skipping, closed, chosen


def batch():
    g = torch.Generator().manual_seed(3)
    source = torch.randn(2, SAMPLES, generator=g)
    padding = torch.zeros(2, SAMPLES, dtype=torch.bool)
    padding[1, 3000:] = True
    return source, padding


def loss_of(model, source, padding):
    states = model(source, padding)["hidden_states"]
    return sum(h.pow(2).mean() for h in states) + model.expected_size() / 1e5, states


@pytest.mark.parametrize("kind", list(KINDS))
def test_inactive_units_compute_what_closed_gates_compute(kind):
    """Outputs, gradients, expected and eval counts, eval masks: as with gates that can never open."""
    skipping, closed, _ = pair(kind)
    source, padding = batch()
    for model in (skipping, closed):
        model.eval()
    with torch.no_grad():
        for a, b in zip(skipping.hidden_states(source, padding), closed.hidden_states(source, padding)):
            assert (a - b).abs().max() <= 1e-5
    assert skipping.eval_mask_params() == closed.eval_mask_params()
    for name, gate in skipping.gates().items():
        assert torch.equal(gate.deterministic_mask(), closed.gates()[name].deterministic_mask()), name
    for model in (skipping, closed):
        model.train()
    torch.manual_seed(5)  # the same gate samples for both
    loss_s, states_s = loss_of(skipping, source, padding)
    torch.manual_seed(5)
    loss_c, states_c = loss_of(closed, source, padding)
    for a, b in zip(states_s, states_c):
        assert (a - b).abs().max() <= 1e-5
    assert skipping.expected_size().item() == pytest.approx(closed.expected_size().item(), abs=1e-3)
    loss_s.backward()
    loss_c.backward()
    unused = {"masking.mask_emb", "encoder.layer_norm.weight", "encoder.layer_norm.bias"}  # not in this loss
    for (name, p), q in zip(skipping.named_parameters(), closed.parameters()):
        if name in unused:
            continue
        assert p.grad is not None, f"{name} left the graph"  # DDP without find_unused_parameters needs it
        assert (p.grad - q.grad).abs().max() <= 1e-5 * max(1.0, q.grad.abs().max()), name


def inactive_slices(model, chosen):
    """(parameter, index tensor, dim) of every slice that belongs to an inactive unit."""
    slices = []
    gates = model.gates()
    for i, block in enumerate(model.feature_extractor.blocks):
        gate = block.gate
        if gate is None:
            continue
        off = (~gates[f"feature_extractor.blocks.{i}.gate"].active).nonzero().flatten()
        if block.norm_kind != "layer":  # a LayerNorm over channels needs every output channel
            slices.append((block.conv.weight, off, 0))
        if i + 1 < len(model.feature_extractor.blocks):
            slices.append((model.feature_extractor.blocks[i + 1].conv.weight, off, 1))
    for layer in model.encoder.layers:
        attn, ffn = layer.self_attn, layer.ffn
        off = (~attn.head_gate.active).nonzero().flatten()
        rows = (off.unsqueeze(1) * attn.head_dim + torch.arange(attn.head_dim)).flatten()
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            slices += [(proj.weight, rows, 0), (proj.bias, rows, 0)]
        slices.append((attn.out_proj.weight, rows, 1))
        off = (~ffn.unit_gate.active).nonzero().flatten()
        slices += [(ffn.fc1.weight, off, 0), (ffn.fc1.bias, off, 0), (ffn.fc2.weight, off, 1)]
        for block in (attn, ffn):
            if block.skipped:
                slices += [(p, torch.arange(p.shape[0]), 0) for p in block.parameters() if p.dim() > 0]
    for gate in gates.values():
        slices.append((gate.log_alpha, (~gate.active).nonzero().flatten(), 0))
    return [(p, index, dim) for p, index, dim in slices if index.numel()]


@pytest.mark.parametrize("kind", ["base", "large"])
def test_inactive_units_get_no_gradient_and_are_untouched_by_an_update(kind):
    model, _, chosen = pair(kind)
    model.train()
    slices = inactive_slices(model, chosen)
    assert len(slices) > 20
    before = [p.index_select(dim, index).clone() for p, index, dim in slices]
    everything = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss, _ = loss_of(model, *batch())
    loss.backward()
    for p, index, dim in slices:
        assert p.grad.index_select(dim, index).abs().max() == 0
    learning = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    optimizer.step()
    for (p, index, dim), old in zip(slices, before):
        assert torch.equal(p.index_select(dim, index), old)
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, everything[name])}
    assert moved == learning and len(moved) > 40  # the rest of the model did learn


class ShapeRecorder(TorchDispatchMode):
    """The shapes of the weights of every matrix product and convolution dispatched."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("addmm", "mm", "convolution"):
            self.weights.append((name, tuple(args[2 if name == "addmm" else 1].shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", list(KINDS))
def test_inactive_units_are_not_computed(kind):
    """torch's FLOP counter sees exactly ``active_macs``: the MACs of the active units alone."""
    model, _, _ = pair(kind)
    with torch.no_grad():  # the eval mask keeps every active unit (it leaves its zeros out too)
        for gate in model.gates().values():
            gate.log_alpha.fill_(10.0)
    model.eval()
    source = batch()[0][:1]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.hidden_states(source)
    assert counter.get_total_flops() == 2 * model.active_macs(SAMPLES)
    full = count_macs(model.cfg, SAMPLES).total
    assert model.active_macs(SAMPLES) < (0.7 if kind == "large" else 0.6) * full
    fractions = model.active_fractions()
    assert set(fractions) == {"heads", "ffn_units", "conv_channels"} and max(fractions.values()) < 0.75
    with torch.no_grad(), ShapeRecorder() as recorder:
        model.hidden_states(source)
    # every FFN and attention projection runs narrower than the layer it belongs to
    linear = [shape for name, shape in recorder.weights if name != "convolution"]
    assert (64, 32) not in linear and (32, 64) not in linear  # fc1 (transposed weight), fc2 in full
    assert (32, 32) not in linear  # q, k, v, out_proj in full (the positional conv is a convolution)
    convs = [shape for name, shape in recorder.weights if name == "convolution" and shape[0] == 24]
    assert len(convs) == (7 if kind == "large" else 0)  # Large's LayerNorm blocks compute every channel


def test_every_unit_active_computes_what_it_computed_before():
    """With every unit active the model takes the same path as without active sets: loading a checkpoint
    written before they existed (no active-set buffers) gives bitwise the same outputs and gradients."""
    model = tiny_student()
    old = {
        k: v for k, v in model.state_dict().items() if not k.endswith(("active", "below_threshold_checks"))
    }
    loaded = tiny_student()
    with torch.no_grad():
        for gate in loaded.gates().values():
            gate.set_active(torch.zeros(gate.n, dtype=torch.bool))
    loaded.load_state_dict(old)  # strict: the missing buffers default to every unit active
    assert all(g.all_active and g.num_active == g.n for g in loaded.gates().values())
    source, padding = batch()
    results = []
    for m in (model, loaded):
        m.train()
        torch.manual_seed(7)
        loss, states = loss_of(m, source, padding)
        loss.backward()
        results.append((states, [p.grad for p in m.parameters()]))
    (states_a, grads_a), (states_b, grads_b) = results
    assert all(torch.equal(a, b) for a, b in zip(states_a, states_b))
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert model.active_macs(SAMPLES) == count_macs(model.cfg, SAMPLES).total


def test_the_default_threshold_leaves_out_gates_floating_where_closed_gates_settle():
    """The criterion's default leaves out a unit whose P(gate > 0) floats at about 0.01 (where the gates the
    eval mask closes settle after the ramp, benchmarks/gate_decay.py) and keeps one at 0.05 (still moving)."""
    from dphubert_fairseq.criterions.distill_criterion import DPHuBERTDistillCriterionConfig
    from dphubert_fairseq.models.hard_concrete import prob_open

    threshold = DPHuBERTDistillCriterionConfig().inactive_threshold
    assert threshold == inactive_units.THRESHOLD
    gate = HardConcrete(3, 0.5)
    with torch.no_grad():
        for unit, p in enumerate((0.01, 0.015, 0.05)):  # logits with these probabilities of opening
            gate.log_alpha[unit] = torch.logit(torch.tensor(p)) - torch.logit(prob_open(torch.zeros(1)))[0]
        assert torch.allclose(prob_open(gate.log_alpha), torch.tensor([0.01, 0.015, 0.05]), atol=1e-6)
        closed = [update_active_sets([gate], threshold) for _ in range(inactive_units.CHECKS)]
    assert closed == [0] * (inactive_units.CHECKS - 1) + [2]
    assert gate.active.tolist() == [False, False, True]


def test_the_rule_needs_consecutive_checks_below_the_threshold():
    gate = HardConcrete(4, 0.5)
    closed, open_ = -20.0, 0.0  # P(gate > 0) about 4e-9 and 0.83
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([closed, closed, open_, closed]))
        assert update_active_sets([gate], 1e-4, checks=2) == 0  # one check below: not yet
        gate.log_alpha[3] = open_  # unit 3 comes back: its streak restarts
        assert update_active_sets([gate], 1e-4, checks=2) == 2
        assert gate.active.tolist() == [False, False, True, True] and gate.num_active == 2
        assert gate.below_threshold_checks.tolist() == [2, 2, 0, 0]
        gate.log_alpha[0] = open_  # an inactive unit stays inactive whatever its logit does
        gate.log_alpha[3] = closed
        assert update_active_sets([gate], 1e-4, checks=2) == 0
        assert update_active_sets([gate], 1e-4, checks=2) == 1
    assert gate.active.tolist() == [False, False, True, False]
    assert gate.prob_open()[[0, 1, 3]].tolist() == [0.0, 0.0, 0.0]  # closed in every count
    assert gate.sample()[[0, 1, 3]].tolist() == [0.0, 0.0, 0.0]
    assert gate.active_index(torch.device("cpu")).tolist() == [2]


def test_active_sets_travel_with_the_state_dict():
    """What a checkpoint and a resume carry: the active sets and the streaks, and the forward uses them."""
    model, _, chosen = pair("base")
    with torch.no_grad():
        model.gates()["encoder.layers.0.ffn.unit_gate"].below_threshold_checks.fill_(2)
    restored = tiny_student()
    restored.load_state_dict(model.state_dict())
    for name, gate in restored.gates().items():
        assert torch.equal(gate.active, model.gates()[name].active), name
        assert torch.equal(gate.below_threshold_checks, model.gates()[name].below_threshold_checks), name
        assert gate.num_active == model.gates()[name].num_active
    model.eval()
    restored.eval()
    source = batch()[0]
    with torch.no_grad():
        for a, b in zip(model.hidden_states(source), restored.hidden_states(source)):
            assert torch.equal(a, b)
    assert restored.active_macs() == model.active_macs() < tiny_student().active_macs()


@pytest.mark.parametrize("kind", ["base", "large"])
def test_a_conv_layer_keeps_one_channel_whatever_its_gates(kind):
    """Every channel of a conv layer below the threshold: the one with the largest logit stays active, so
    that the block is still computed (a 0-channel conv cannot be); the other layers' units close as usual."""
    model = tiny_student(kind)
    block = model.feature_extractor.blocks[2]
    with torch.no_grad():
        for gate in model.gates().values():
            gate.log_alpha.fill_(5.0)
        block.gate.log_alpha.copy_(-30.0 - torch.arange(block.gate.n, dtype=torch.float32))
        block.gate.log_alpha[7] = -20.0
    heads = model.gates()["encoder.layers.1.self_attn.head_gate"]
    with torch.no_grad():
        heads.log_alpha.fill_(-30.0)
    closed = model.update_active_sets(1e-4, checks=1)
    source, padding = batch()
    model.train()
    loss_of(model, source, padding)[0].backward()
    model.eval()
    assert all(torch.isfinite(h).all() for h in model(source, padding)["hidden_states"])
    assert block.gate.active.nonzero().flatten().tolist() == [7]
    assert heads.num_active == 0  # attention runs with no head: only its bias
    assert closed == block.gate.n - 1 + heads.n


# ----- two workers (torch DDP over gloo, as a launcher starts them) -----


def _worker(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of 2: the tiny student in torch's DDP without ``find_unused_parameters`` (the configs'
    setting), with skipped blocks and partly inactive gates; rank 1's logits are nudged so that, alone, it
    would close a unit rank 0 keeps. Each rank measures where its blocks' gathering pays on its own batch
    shape, on a device skewed its own way (rank 0's masked blocks, rank 1's gathered ones timed 50x slower: alone,
    one would always gather, the other never). Two checks and updates; writes its active sets, break-evens,
    decisions and parameters."""
    import torch.distributed as dist

    from dphubert_fairseq.models import gather_policy

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model, _, _ = pair("large")
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    gate = model.gates()["encoder.layers.0.ffn.unit_gate"]
    nudged = int(gate.active.nonzero()[0])
    heads = model.gates()["encoder.layers.2.self_attn.head_gate"]
    with torch.no_grad():
        gate.log_alpha[nudged] = -30.0 if rank == 1 else 0.0
        heads.log_alpha[heads.active.nonzero()[:2].flatten()] = -30.0  # both ranks: below
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    timed = gather_policy._time_probe

    def skewed(probe):
        masked, gathered = timed(probe)
        return (masked * 50, gathered) if rank == 0 else (masked, [t * 50 for t in gathered])

    gather_policy._time_probe = skewed
    closed = []
    for step in range(2):
        closed.append(model.update_active_sets(1e-4, checks=1))
        model.choose_gathering("measure", batch_shape=(2, SAMPLES) if rank == 0 else (3, SAMPLES + 800))
        torch.manual_seed(100 + rank)  # each rank its own batch and gate samples
        result = ddp(torch.randn(2, SAMPLES))
        loss = sum(h.pow(2).mean() for h in result["hidden_states"]) + model.expected_size() / 1e5
        loss = loss + result["x"][..., :0].sum()  # as the criterion: the final LayerNorm stays in the graph
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        gate.log_alpha[nudged] = 0.0  # the one value the ranks were given apart
    torch.save(
        {
            "closed": closed,
            "break_evens": model.break_evens(),
            "gather_below": {name: g.gather_below for name, g in model.gates().items()},
            "active": {name: g.active.clone() for name, g in model.gates().items()},
            "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        },
        out,
    )
    dist.destroy_process_group()


def test_two_workers_agree_on_the_active_sets(tmp_path):
    port = free_port()
    outs = [str(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(port), out],
            env=env,
            cwd=os.path.dirname(__file__),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank, out in zip((0, 1), outs)
    ]
    for w in workers:
        text = w.communicate(timeout=300)[0]
        assert w.returncode == 0, text[-3000:]
    first, second = (torch.load(out) for out in outs)
    assert first["closed"] == second["closed"] and first["closed"][0] == 2  # the two heads, not rank 1's unit
    for name in first["active"]:
        assert torch.equal(first["active"][name], second["active"][name]), name
    # one decision per kind of block from the times summed over the workers, whatever each measured alone
    assert first["break_evens"] and first["break_evens"] == second["break_evens"]
    assert first["gather_below"] == second["gather_below"]
    for name in first["params"]:  # DDP kept the replicas identical through updates with skipped blocks
        assert torch.equal(first["params"][name], second["params"][name]), name


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])


# ----- leaving inactive units out or computing them masked (models/gather_policy.py) -----


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["base", "large", "wavlm"])
def test_masked_and_gathered_blocks_compute_the_same(kind):
    """Outputs and every gradient: the masked computation of the inactive units equals leaving them out."""
    gathered, masked_model, _ = pair(kind)
    masked_model.load_state_dict(gathered.state_dict())  # the same active sets, as buffers
    gathered.choose_gathering("gather")
    masked_model.choose_gathering("mask")
    source, padding = batch()
    results = []
    for model in (gathered, masked_model):
        model.train()
        torch.manual_seed(5)  # the same gate samples (dropout is off in these students)
        loss, states = loss_of(model, source, padding)
        loss.backward()
        results.append((states, grads(model)))
    (states_g, grads_g), (states_m, grads_m) = results
    for a, b in zip(states_g, states_m):
        assert (a - b).abs().max() <= 1e-5
    assert grads_g.keys() == grads_m.keys()
    for name, g in grads_g.items():
        assert (g - grads_m[name]).abs().max() <= 1e-5 * max(1.0, g.abs().max()), name


def test_a_masked_block_computes_at_full_width_and_a_closed_block_is_still_skipped():
    model, _, _ = pair("base")
    model.choose_gathering("mask")
    model.eval()
    source = batch()[0][:1]
    with torch.no_grad(), ShapeRecorder() as recorder:
        model.hidden_states(source)
    linear = [shape for name, shape in recorder.weights if name != "convolution"]
    assert linear.count((64, 32)) == 1  # fc1 at full width in layer 0; layer 1's FFN block is closed
    assert linear.count((32, 64)) == 1
    convs = [shape[:2] for name, shape in recorder.weights if name == "convolution" and shape[0] == 24]
    assert convs == [(24, 1)] + [(24, 24)] * 6  # every channel computed, the closed ones masked
    model.choose_gathering("gather")
    with torch.no_grad(), ShapeRecorder() as recorder:
        model.hidden_states(source)
    assert (64, 32) not in [shape for name, shape in recorder.weights if name != "convolution"]


@pytest.mark.parametrize(
    "gathered, masked, below",
    [
        ((0.3, 0.6, 0.9, 1.14), 0.75, 0.59375),  # t = 1.2 f: meets 0.95 x 0.75 at 0.59375 (0.75 at 0.625)
        ((0.5, 0.75, 1.0, 1.2), 2.0, 0.95),  # cheaper at every fraction measured: gather up to the last one
        ((1.1, 1.2, 1.3, 1.38), 1.0, 0.0),  # the copies alone cost more than the block: never
        ((0.4, 0.4, 0.4, 0.4), 0.5, 0.95),  # flat and cheaper by more than the margin
        ((0.49, 0.49, 0.49, 0.49), 0.5, 0.0),  # flat and cheaper by 2%: within the margin, masked
        ((0.6, 0.6, 0.6, 0.6), 0.5, 0.0),  # flat and dearer
    ],
)
def test_the_break_even_is_where_the_gathered_line_meets_the_masked_time(gathered, masked, below):
    """Where the line through the gathered times crosses the masked time less the margin, and never above the
    largest fraction measured (0.95): the line is not extrapolated towards 1, where a draw leaves out only a
    few units."""
    assert FRACTIONS == (0.25, 0.5, 0.75, 0.95)
    assert BreakEven(masked, gathered).below == pytest.approx(below)
    assert gather_policy.GATHER_MARGIN == 0.05


def test_a_gate_of_few_units_is_fitted_on_the_fractions_it_was_timed_at():
    """Probes compute whole units: a gate of 4 heads is timed at 1, 2, 3 and 3 of them, one of 2 units at 1
    unit four times (no line to fit: flat)."""
    assert gather_policy.probed_fractions(4) == (0.25, 0.5, 0.75, 0.75)
    assert gather_policy.probed_fractions(2) == (0.5,) * 4
    assert BreakEven(1.0, (0.5,) * 4, (0.5,) * 4).below == 0.5  # cheaper: gather, up to what was measured
    assert BreakEven(1.0, (0.99,) * 4, (0.5,) * 4).below == 0.0


class SyntheticDevice:
    """A device whose block times are known: masked costs ``masked[kind]``, gathered ``a + b * fraction``;
    counts the probes it times."""

    def __init__(self, monkeypatch, lines, masked):
        self.lines, self.masked, self.timed = lines, masked, []
        real = gather_policy.model_probes

        def probes(model, shape, autocast=None):
            out = []
            for probe in real(model, shape, autocast):
                out.append(gather_policy.Probe(probe.gate, probe.key, self.timer(probe)))
            return out

        monkeypatch.setattr(gather_policy, "model_probes", probes)
        monkeypatch.setattr(gather_policy, "_seconds", lambda run, device, warmup, repeat: run())

    def timer(self, probe):
        kind = probe.key[0]

        def run():
            gate = probe.gate
            self.timed.append((probe.key, gate.num_active / gate.n, gate.compute_index(torch.device("cpu"))))
            if gate.compute_index(torch.device("cpu")) is None:
                return self.masked[kind]
            a, b = self.lines[kind]
            return a + b * gate.num_active / gate.n

        return run


def test_measure_gathers_below_each_kinds_measured_break_even(monkeypatch):
    """On a synthetic device (FFN: gathering saves 5% below 0.75 active, attention below 0.35, conv never), each
    gate gathers or masks from its own active fraction; each kind is timed once per run, masked with half the
    units active and gathered at each of FRACTIONS (rounded to whole units), and the active sets are put back."""
    device = SyntheticDevice(
        monkeypatch,
        lines={"ffn": (0.2, 1.0), "attention": (0.6, 1.0), "conv": (2.0, 0.0)},
        masked={"ffn": 1.0, "attention": 1.0, "conv": 1.0},
    )
    model, _, chosen = pair("base")
    before = {name: gate.active.clone() for name, gate in model.gates().items()}
    model.choose_gathering("measure", batch_shape=(2, SAMPLES))
    for name, gate in model.gates().items():
        assert torch.equal(gate.active, before[name]), name
    assert model.break_evens()[("ffn", 32, 64)] == pytest.approx(0.75)
    assert model.break_evens()[("attention", "PrunableSelfAttention", 32, 4, 8)] == pytest.approx(0.35)
    assert all(v == 0.0 for k, v in model.break_evens().items() if k[0] == "conv")
    for name, gate in model.gates().items():
        if not 0 < gate.num_active < gate.n:
            continue
        kind = "ffn" if "ffn" in name else "attention" if "attn" in name else "conv"
        gathers = gate.compute_index(torch.device("cpu")) is not None
        assert gathers == (gate.num_active / gate.n < {"ffn": 0.75, "attention": 0.35, "conv": 0.0}[kind]), (
            name
        )
    ffn = [(f, index is None) for key, f, index in device.timed if key[0] == "ffn"]
    # one kind, one measurement for 3 layers; at whole units (61 of 64 for 0.95)
    assert ffn == [(0.5, True)] + [(f, False) for f in gather_policy.probed_fractions(64)]
    assert gather_policy.probed_fractions(64) == (0.25, 0.5, 0.75, 61 / 64)
    timed = len(device.timed)
    model.choose_gathering("measure", batch_shape=(2, SAMPLES))  # nothing new to measure
    assert len(device.timed) == timed


def test_measuring_leaves_the_run_as_it_was():
    """A real measurement (on the CPU, where measure times blocks): the random stream, the active sets and
    streaks, every ``.grad`` and the model's outputs are as before; every break-even is a fraction."""
    device = "cpu"
    model, _, _ = pair("base")
    model.to(device).train()
    source, padding = (t.to(device) for t in batch())
    loss, _ = loss_of(model, source, padding)  # a training batch: its shape is what the probes run on
    loss.backward()
    before_grads = grads(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(11)
    rng = torch.get_rng_state()
    model.choose_gathering("measure")
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    after = grads(model)
    assert after.keys() == before_grads.keys() and all(torch.equal(after[k], before_grads[k]) for k in after)
    evens = model.break_evens()
    assert {k[0] for k in evens} == {"conv", "attention", "ffn"}
    assert all(0.0 <= v <= 1.0 for v in evens.values())


def test_measure_masks_without_timing_on_a_gpu():
    """On a device type measure does not time (a GPU), every gate computes masked and no probe is built."""
    on_gpu = [
        types.SimpleNamespace(
            log_alpha=types.SimpleNamespace(device=torch.device("cuda", 0)),
            n=8,
            num_active=4,
            gather_below=1.0,
        )
        for _ in range(3)
    ]

    def probes():
        raise AssertionError("measure timed blocks on a GPU")

    cache = {}
    gather_policy.choose(on_gpu, "measure", probes, cache)
    assert [g.gather_below for g in on_gpu] == [0.0] * 3 and cache == {}
    gather_policy.choose(on_gpu, "gather", probes, cache)  # asked for, it still gathers there
    assert [g.gather_below for g in on_gpu] == [1.0] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_measure_on_cuda_masks_and_leaves_the_run_as_it_was():
    model, _, _ = pair("base")
    model.to("cuda").train()
    source, padding = (t.to("cuda") for t in batch())
    loss, _ = loss_of(model, source, padding)
    loss.backward()
    device_rng = torch.cuda.get_rng_state()
    model.choose_gathering("measure")
    assert torch.equal(torch.cuda.get_rng_state(), device_rng)
    assert model.break_evens() == {}
    assert all(g.gather_below == 0.0 for g in model.gate_set.gates)


def test_an_unknown_mode_is_refused():
    model, _, _ = pair("base")
    with pytest.raises(ValueError, match="inactive_compute must be one of measure, gather, mask, got 'fast'"):
        model.choose_gathering("fast")


def test_the_criterion_measures_once_at_the_first_update(tiny_teachers, tmp_path, caplog):
    """Through the task and the criterion, as fairseq's trainer calls them: after the first update every kind
    of gated block is timed ('measure', the recipe's default: any unit may sample 0 at any update) on the
    training batch's shape and its break-even logged; later updates and checks measure nothing new, and
    training goes on with the chosen computation."""
    from helpers import landing_student

    task, model, criterion = landing_student(
        tmp_path,
        tiny_teachers["hubert_base"],
        ["conv", "head", "interm"],
        inactive_check_interval=1,
        inactive_checks=1,
    )
    assert criterion.cfg.inactive_compute == "measure"
    with torch.no_grad():  # half of every layer's FFN units and one head per layer can no longer open
        for layer in model.encoder.layers:
            layer.ffn.unit_gate.log_alpha[::2] = -20.0
            layer.self_attn.head_gate.log_alpha[0] = -20.0
    optimizer = types.SimpleNamespace(backward=lambda loss: loss.backward())  # no step: the gates stay put
    sample = {"net_input": {"source": torch.randn(2, 8000), "padding_mask": None}}
    model.train()
    with caplog.at_level("INFO", logger="dphubert_fairseq.models.gather_policy"):
        for update in range(2):
            model.zero_grad()
            task.train_step(sample, model, criterion, optimizer, update_num=update)
            criterion.after_optimizer_step(model, update)
            if update == 0:
                measured = dict(model.break_evens())
                assert measured and all(0.0 <= v <= 1.0 for v in measured.values())
                assert {key[0] for key in measured} == {"ffn", "attention", "conv"}
    assert model.break_evens() == measured
    lines = [r.getMessage() for r in caplog.records if "gathered below" in r.getMessage()]
    conv = [b for b in model.feature_extractor.blocks if b.gate is not None]
    assert (
        len(lines) == len(measured) == len(conv) + 2
    )  # each conv layer, then all attention / FFN blocks alike
    unit_gate = model.gates()["encoder.layers.0.ffn.unit_gate"]
    key = ("ffn", model.cfg.encoder_embed_dim, unit_gate.n)
    assert unit_gate.num_active == unit_gate.n // 2 and unit_gate.gather_below == measured[key]


# ----- units whose gate sample is 0 at an update -----


@pytest.mark.parametrize("kind", list(KINDS))
def test_units_whose_sample_is_zero_are_not_computed(kind):
    """In training, units that are active but sample exactly 0 at this update are left out as inactive ones
    are: with logits of +-60 (samples exactly 1 or 0) the FLOP counter sees the MACs of a twin whose
    zero-sampled units are inactive, and both give the same hidden states."""
    sampling, twin, chosen = pair(kind)
    twin.load_state_dict(sampling.state_dict())
    with torch.no_grad():
        for name, gate in sampling.gates().items():
            gate.set_active(torch.ones(gate.n, dtype=torch.bool))
            gate.log_alpha.fill_(60.0)
            if name in chosen:
                gate.log_alpha.masked_fill_(~chosen[name], -60.0)
        for gate in twin.gates().values():
            gate.log_alpha.fill_(60.0)
    sampling.choose_gathering("gather")
    twin.choose_gathering("gather")
    source = batch()[0][:1]
    counted, states = [], []
    for model in (sampling, twin):
        model.train()
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            states.append(model.hidden_states(source))
        counted.append(counter.get_total_flops())
    assert sampling.active_macs(SAMPLES) == count_macs(sampling.cfg, SAMPLES).total  # every unit active
    assert counted[0] == counted[1] == 2 * twin.active_macs(SAMPLES)
    for a, b in zip(*states):
        assert (a - b).abs().max() <= 1e-5


def test_the_eval_mask_zeros_are_not_computed():
    """In eval mode the units the deterministic mask zeros are left out (when gathering): the same hidden
    states as computing them masked, fewer FLOPs."""
    gathered, masked_model, _ = pair("base")
    masked_model.load_state_dict(gathered.state_dict())
    for gate in gathered.gates().values():
        gate.set_active(torch.ones(gate.n, dtype=torch.bool))
    for gate in masked_model.gates().values():
        gate.set_active(torch.ones(gate.n, dtype=torch.bool))
    gathered.choose_gathering("gather")
    masked_model.choose_gathering("mask")
    source, padding = batch()
    counted, states = [], []
    for model in (gathered, masked_model):
        model.eval()
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            states.append(model.hidden_states(source, padding))
        counted.append(counter.get_total_flops())
    for a, b in zip(*states):
        assert (a - b).abs().max() <= 1e-5
    assert counted[0] < 0.8 * counted[1]


def test_masking_draws_no_index():
    """With every block masking ('mask': the reference's computation) a forward pass reads nothing back to
    the host: no gate gets the indices of its non-zero units."""
    model, _, _ = pair("base")
    model.choose_gathering("mask")
    seen = []
    ffn = model.encoder.layers[0].ffn
    ffn.register_forward_pre_hook(lambda module, args: seen.append(module.unit_gate.drawn_open))
    model.train()
    model.hidden_states(batch()[0])
    model.choose_gathering("gather")
    model.hidden_states(batch()[0])
    assert seen[0] is None and seen[1] is not None
    index, count = seen[1]
    assert count == index.numel() and ffn.unit_gate.drawn_open is None  # reset after the pass


def test_what_a_gate_computes_at_an_update():
    """``compute_index`` within a drawn pass: the non-zero units when fewer than ``gather_below`` of them,
    else None (every unit, masked); an empty index for a gate that may lose every unit, None (a mask of
    zeros) for one that keeps one (a conv layer)."""
    gate = HardConcrete(8, 0.5)
    cpu = torch.device("cpu")
    gate.drawn_open = (torch.tensor([1, 4, 6]), 3)
    gate.gather_below = 0.5
    assert gate.compute_index(cpu).tolist() == [1, 4, 6] and gate.num_open == 3
    gate.gather_below = 0.3
    assert gate.compute_index(cpu) is None
    gate.drawn_open = (torch.arange(8), 8)
    gate.gather_below = 1.0
    assert gate.compute_index(cpu) is None
    gate.drawn_open = (torch.zeros(0, dtype=torch.long), 0)
    gate.gather_below = 0.0
    assert gate.compute_index(cpu).numel() == 0 and gate.num_open == 0
    conv = HardConcrete(8, 0.5, min_active=1)
    conv.drawn_open = (torch.zeros(0, dtype=torch.long), 0)
    assert conv.compute_index(cpu) is None


def test_a_pass_that_skips_every_attention_keeps_the_relative_bias_in_the_graph():
    """WavLM: when every attention block is 0 at an update, the relative position bias table still gets a
    (zero) gradient, as DDP without find_unused_parameters needs of every parameter."""
    model = tiny_student("wavlm")
    model.choose_gathering("gather")
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.self_attn.layer_gate.log_alpha.fill_(-60.0)
    model.train()
    source, padding = batch()
    loss, _ = loss_of(model, source, padding)
    loss.backward()
    grad = model.encoder.relative_attention_bias.weight.grad
    assert grad is not None and not grad.any()
