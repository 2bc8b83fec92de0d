"""What the comparison consists of: the teacher's shape, the student kinds, the target layers, and the sizes
of a run (how much speech, how many updates and seeds)."""

from dataclasses import asdict, dataclass, field
from typing import Dict

from fairseq_runs import Shape

#: the teacher: a 12-layer HuBERT of width 64 with 8 heads (so that heads can be thinned uniformly)
TEACHER = Shape(12, 64, 256, 8, "[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2", 32, 8, 32)
#: student kinds, in the table's order; '_10pct': trained on a tenth of the training audio
KINDS = ("dphubert", "distilhubert", "uniform", "random_structure", "dphubert_10pct", "distilhubert_10pct")
TARGET_LAYERS = (4, 8, 12)
#: k-means clusters of the MFCC labels the teacher predicts
LABEL_CLUSTERS = 50
#: the teacher's departures from fairseq's HuBERT Base recipe: at this scale its masked-only loss with 80% of
#: frames masked stays at the label prior for the whole run; 30% masked and a loss on the unmasked frames learn
TEACHER_OVERRIDES = ("model.mask_prob=0.3", "criterion.pred_nomask_weight=1.0")


@dataclass
class Size:
    """How big the comparison is. 'default' takes 25 to 30 minutes on 2 CPU cores; 'tiny' is for tests."""

    train_sentences: int
    held_out_sentences: int
    renditions: int  # of corpus.RENDITIONS, per voice and keyword
    teacher_updates: int
    stage1_updates: int
    stage2_updates: int
    seeds: int
    max_tokens: int
    teacher_lr: float = 1e-3
    little_fraction: float = 0.1
    target_sparsity: float = 0.75
    lrs: Dict[str, float] = field(default_factory=lambda: {"default": 5e-4, "gates": 0.1, "lagrangian": 0.1})

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
    "default": Size(320, 40, 4, 1500, 300, 100, 3, 160000),
    # four times the student updates, the same teacher (cached when OUT holds it): does a gap close with training?
    "long": Size(320, 40, 4, 1500, 1200, 400, 1, 160000),
    "tiny": Size(16, 4, 1, 4, 8, 4, 1, 64000),
}
