"""cmiguard: learned logit transforms that keep a served LLM's answers and strip
the input-specific dark knowledge a distilling student learns from."""

from cmiguard.checkpoint import (
    from_pretrained,
    load_transform,
    save_pretrained,
    save_transform,
    vocab_fingerprint,
)
from cmiguard.fold import fold_into_lm_head
from cmiguard.purify import StreamingCentroids, cmi, purify
from cmiguard.purify_dataset import purify_dataset
from cmiguard.train.models import load_teacher
from cmiguard.train.objectives import (
    SurrogateProbe,
    anti_distillation_loss,
    gradient_misalignment_loss,
)
from cmiguard.transforms import (
    DenseTransform,
    DiagLowRankTransform,
    LogitTransform,
    LowRankTransform,
    make_transform,
)

__all__ = [
    "DenseTransform",
    "DiagLowRankTransform",
    "LogitTransform",
    "LowRankTransform",
    "StreamingCentroids",
    "SurrogateProbe",
    "anti_distillation_loss",
    "cmi",
    "fold_into_lm_head",
    "from_pretrained",
    "gradient_misalignment_loss",
    "load_teacher",
    "load_transform",
    "make_transform",
    "purify",
    "purify_dataset",
    "save_pretrained",
    "save_transform",
    "vocab_fingerprint",
]
__version__ = "0.1.0"
