"""dphubert-fairseq: DPHuBERT (joint distillation and structured pruning of HuBERT / wav2vec2) as a fairseq plugin.

Importing the package patches fairseq where the plugin's users need it (``fairseq_patches``: among them,
native fairseq checkpoints load under torch's weights-only default, see ``safe_loading``) and registers the
``dphubert`` model, the ``dphubert_distill`` task and criterion and the ``torch_adamw`` optimizer with fairseq.
"""

from . import fairseq_patches

fairseq_patches.install()

from . import criterions, models, optim, tasks  # noqa: E402,F401  (register the model, task, criterion, optimizer)
from .checkpoint_io import load_model, save_model  # noqa: E402
from .config_paths import config_dir  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    CheckpointLayoutError,
    ConfigError,
    DPHuBERTError,
    ManifestError,
    UnsupportedTeacherError,
)
from .models.dphubert import DPHuBERTConfig, DPHuBERTModel  # noqa: E402
from .pruning import PruningReport, prune  # noqa: E402
from .student import student_from_teacher  # noqa: E402
from .teacher import count_params, load_teacher, teacher_hidden_states  # noqa: E402

__all__ = [
    "CheckpointError",
    "CheckpointLayoutError",
    "ConfigError",
    "DPHuBERTConfig",
    "DPHuBERTError",
    "DPHuBERTModel",
    "ManifestError",
    "PruningReport",
    "UnsupportedTeacherError",
    "config_dir",
    "count_params",
    "load_model",
    "load_teacher",
    "prune",
    "save_model",
    "student_from_teacher",
    "teacher_hidden_states",
]
__version__ = "0.1.0"
