"""What the comparison consists of: the teacher's shape, the student kinds, the target layers, the sizes of a
run (how much speech, how many updates and seeds), and how DPHuBERT splits its updates between its stages."""

import math
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from typing import Dict, Tuple

from fairseq_runs import Shape

#: the teacher: a 12-layer HuBERT of width 64 with 8 heads (so that heads can be thinned uniformly)
TEACHER = Shape(12, 64, 256, 8, "[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2", 32, 8, 32)
#: student kinds, in the table's order; '_10pct': trained on a tenth of the training audio; 'dphubert_long_ramp':
#: DPHuBERT with the schedule the comparison ran before it followed the recipe's proportions;
#: 'dphubert_importance_init': DPHuBERT with ``model.gate_init_importance`` (an option, off by default);
#: 'largest_in_structure' / 'largest_in_structure_stage2': the ablations (each seed's DPHuBERT layer sizes
#: filled with the teacher's largest units, trained as the baselines / as DPHuBERT's stage 2)
KINDS = (
    "dphubert",
    "dphubert_long_ramp",
    "dphubert_importance_init",
    "distilhubert",
    "uniform",
    "random_structure",
    "largest_in_structure",
    "largest_in_structure_stage2",
    "dphubert_10pct",
    "distilhubert_10pct",
)
#: the kinds that test the paper's claims, the default size's: DPHuBERT in both schedules, the two students it
#: claims to beat, and both again on a tenth of the audio. The other kinds (the structure with fresh weights,
#: the option, the ablations) explain a result; the 'full' size adds them
CLAIM_KINDS = (
    "dphubert",
    "dphubert_long_ramp",
    "distilhubert",
    "uniform",
    "dphubert_10pct",
    "distilhubert_10pct",
)
#: the kinds built from a DPHuBERT seed's structure (they wait for that run)
FROM_DPHUBERT_STRUCTURE = ("random_structure", "largest_in_structure", "largest_in_structure_stage2")
#: ``model.gate_init_importance`` of 'dphubert_importance_init', fixed before any run: a spread of one logit
#: unit per standard deviation of a layer's log unit norms (the reference's constant start has 0.01 of noise)
GATE_INIT_IMPORTANCE = 1.0
#: stage-1 overrides of every DPHuBERT kind: the committed results (results/) were made when the default
#: inactive_threshold was 1e-4 (no unit is left out at it) and every unit was computed at every update, pinned
#: so that the command reproduces them; at today's default, 0.02, closed units are left out from the end of the
#: ramp, with an effect on a result within the seed noise (benchmarks/README.md, inactive_effect.py), and
#: leaving out the units whose sample is 0 (inactive_compute other than mask) gives the same losses and
#: gradients but draws the dropout's random numbers for fewer units, so another random stream
STAGE1_COMMON = ("criterion.inactive_threshold=1e-4", "criterion.inactive_compute=mask")
#: the optimizer of every run (stages 1 and 2, baselines): the committed results were made with fairseq's
#: ``adam``, pinned so that the command reproduces them; the configs now use ``torch_adamw`` (torch's AdamW, the
#: reference's update: eps after the bias correction)
OPTIMIZER = "adam"
#: stage-1 overrides of a DPHuBERT kind beyond its schedule
STAGE1_OVERRIDES: Dict[str, Tuple[str, ...]] = {
    "dphubert_importance_init": (f"model.gate_init_importance={GATE_INIT_IMPORTANCE}",),
}
#: the kinds trained on a tenth of the training audio (OUT/data_10pct)
LITTLE_DATA_KINDS = ("dphubert_10pct", "distilhubert_10pct")
TARGET_LAYERS = (4, 8, 12)
#: k-means clusters of the MFCC labels the teacher predicts
LABEL_CLUSTERS = 50
#: the teacher's departures from fairseq's HuBERT Base recipe: at this scale its masked-only loss with 80% of
#: frames masked stays at the label prior for the whole run; 30% masked and a loss on the unmasked frames learn
TEACHER_OVERRIDES = ("model.mask_prob=0.3", "criterion.pred_nomask_weight=1.0")


@dataclass(frozen=True)
class Proportions:
    """DPHuBERT's schedule as fractions of its stage 1: stage 2's updates, and the updates over which the
    target sparsity ramps up from 0."""

    name: str
    stage2: Fraction
    ramp: Fraction


#: the recipe's (configs/dphubert*.yaml: 50k stage-1 updates, the target ramped over 5k, 25k stage-2 updates)
RECIPE = Proportions("the recipe's proportions", stage2=Fraction(1, 2), ramp=Fraction(1, 10))
#: the comparison's schedule before it followed the recipe: a ramp over 2/3 of stage 1, stage 2 a third of it
LONG_RAMP = Proportions("the comparison's earlier proportions", stage2=Fraction(1, 3), ramp=Fraction(2, 3))
#: the DPHuBERT kinds and their proportions; every other kind is one distillation run of all the updates,
#: but 'largest_in_structure_stage2', one run as long as DPHuBERT's stage 2
PROPORTIONS = {
    "dphubert": RECIPE,
    "dphubert_long_ramp": LONG_RAMP,
    "dphubert_importance_init": RECIPE,
    "dphubert_10pct": RECIPE,
}
#: kinds trained exactly as a DPHuBERT kind's stage 2 (its updates, warm-up and learning rate)
AS_STAGE2_OF = {"largest_in_structure_stage2": "dphubert"}


@dataclass(frozen=True)
class Schedule:
    """How one student spends the comparison's updates. A DPHuBERT kind: ``stage1`` updates of distillation
    and pruning with the target ramped over the first ``ramp``, then ``stage2`` of distillation. Any other
    kind: one run of ``stage2`` updates (``stage1`` and ``ramp`` 0). Learning-rate decays end at each run's
    ``optimization.max_update``, as in the configs."""

    stage1: int
    stage2: int
    ramp: int

    @property
    def total(self) -> int:
        return self.stage1 + self.stage2

    @property
    def stage1_warmup(self) -> int:
        """Learning-rate warm-up of stage 1 (a sixtieth of it: at this scale a longer one wastes updates)."""
        return max(1, self.stage1 // 60)

    @property
    def stage2_warmup(self) -> int:
        """Learning-rate warm-up of stage 2 (a tenth of it); of a baseline's one run, a sixtieth of it."""
        return max(1, self.stage2 // (10 if self.stage1 else 60))


def split(total: int, proportions: Proportions) -> Schedule:
    """``total`` updates split as ``proportions`` asks. Stage 1 is ``total / (1 + stage2)`` rounded to the
    nearest integer (a half rounded up), stage 2 the rest, so that the total is exact; the ramp is
    ``stage1 * ramp`` rounded down, as the criterion rounds its default tenth, and at least 1 update."""
    exact = Fraction(total) / (1 + proportions.stage2)
    stage1 = math.floor(exact + Fraction(1, 2))
    if not 0 < stage1 < total:
        raise ValueError(f"{total} updates cannot be split into two stages with {proportions.name}")
    return Schedule(stage1, total - stage1, max(1, math.floor(stage1 * proportions.ramp)))


@dataclass
class Size:
    """How big the comparison is, and which student kinds it trains (``kinds``, in ``KINDS``' order).
    'default' (the six ``CLAIM_KINDS``, three seeds) took 36 to 44 minutes on 2 quiet CPU cores of an AMD EPYC; 'full'
    (all ten kinds, the same sizes) took 52 and 67 (shared with other work at times, then quiet on that slower
    machine; docs/evidence.md). 'tiny' is for tests."""

    train_sentences: int
    held_out_sentences: int
    renditions: int  # of corpus.RENDITIONS, per voice and keyword
    teacher_updates: int
    student_updates: int  # every student's, DPHuBERT's two stages together
    seeds: int
    max_tokens: int
    teacher_lr: float = 1e-3
    #: the phoneme probe (``ctc_probe``): its Adam steps, and the probe seeds of the teacher and MFCC rows,
    #: whose PER margin decides whether the probe can tell models apart (students: one, their own seed)
    phoneme_probe_steps: int = 2000
    phoneme_probe_seeds: int = 3
    little_fraction: float = 0.1
    target_sparsity: float = 0.75
    lrs: Dict[str, float] = field(default_factory=lambda: {"default": 5e-4, "gates": 0.1, "lagrangian": 0.1})
    kinds: Tuple[str, ...] = KINDS

    def schedule(self, kind: str) -> Schedule:
        """How student ``kind`` spends ``student_updates`` (``Schedule``); a kind of ``AS_STAGE2_OF``: the
        stage 2 of its DPHuBERT kind."""
        if kind in PROPORTIONS:
            return split(self.student_updates, PROPORTIONS[kind])
        if kind in AS_STAGE2_OF:
            return replace(self.schedule(AS_STAGE2_OF[kind]), stage1=0, ramp=0)
        return Schedule(0, self.student_updates, 0)

    def schedule_record(self, kind: str) -> Dict[str, object]:
        """``schedule(kind)`` as the results record it, with the name of its proportions."""
        record: Dict[str, object] = asdict(self.schedule(kind))
        if kind in PROPORTIONS:
            proportions = PROPORTIONS[kind].name
        elif kind in AS_STAGE2_OF:
            proportions = f"one run, as {AS_STAGE2_OF[kind]}'s stage 2"
        else:
            proportions = "one run"
        return {**record, "proportions": proportions}

    def teacher_key(self, data_description: str) -> Dict[str, object]:
        """What the cached teacher and its data depend on (``data_description``: the corpus's, which counts
        sentences, voices, LibriVox clips, utterances and seconds)."""
        return {
            "shape": asdict(TEACHER),
            "overrides": list(TEACHER_OVERRIDES),
            "label_clusters": LABEL_CLUSTERS,
            "data": data_description,
            "little_fraction": self.little_fraction,
            "teacher_updates": self.teacher_updates,
            "teacher_lr": self.teacher_lr,
            "max_tokens": self.max_tokens,
        }


SIZES = {
    # DPHuBERT: 267 + 133 updates, ramp 26; its long-ramp row 300 + 100, ramp 200
    "default": Size(320, 40, 4, 1500, 400, 3, 160000, kinds=CLAIM_KINDS),
    # the same, every kind: the claims' rows and those that explain them (the teacher is shared with 'default')
    "full": Size(320, 40, 4, 1500, 400, 3, 160000),
    # four times the student updates, the same teacher (cached when OUT holds it): does a gap close with training?
    "long": Size(320, 40, 4, 1500, 1600, 1, 160000),
    # DPHuBERT: 10 + 5 updates, ramp 1; its long-ramp row 11 + 4, ramp 7. Every code path, not every kind:
    # the option and DPHuBERT on little data differ from kinds it runs only in STAGE1_OVERRIDES / the data,
    # the structure with fresh weights from the ablations only in its model (students.random_structure)
    "tiny": Size(
        16,
        4,
        1,
        4,
        15,
        1,
        64000,
        phoneme_probe_steps=20,
        phoneme_probe_seeds=2,
        kinds=tuple(
            k for k in KINDS if k not in ("dphubert_importance_init", "dphubert_10pct", "random_structure")
        ),
    ),
}
