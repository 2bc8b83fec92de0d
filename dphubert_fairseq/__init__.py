"""dphubert-fairseq: DPHuBERT (joint distillation and structured pruning of HuBERT / wav2vec2) as a fairseq plugin.

Importing the package registers the ``dphubert`` model with fairseq and makes native fairseq checkpoints load
under torch's weights-only default (see ``safe_loading``).
"""

from . import fairseq_fixes, safe_loading

safe_loading.install()
fairseq_fixes.install()

from . import criterions, models, tasks  # noqa: E402,F401  (register the model, task and criterion)
from .checkpoint_io import load_model, save_model  # noqa: E402
from .errors import CheckpointError  # noqa: E402
from .models.dphubert import DPHuBERTConfig, DPHuBERTModel  # noqa: E402
from .param_count import count_params  # noqa: E402
from .pruning import PruningReport, prune  # noqa: E402
from .student import student_from_teacher  # noqa: E402
from .teacher import load_teacher, teacher_hidden_states  # noqa: E402

__all__ = [
    "CheckpointError",
    "DPHuBERTConfig",
    "DPHuBERTModel",
    "PruningReport",
    "count_params",
    "load_model",
    "load_teacher",
    "prune",
    "save_model",
    "student_from_teacher",
    "teacher_hidden_states",
]
__version__ = "0.1.0"
