"""qadapters: adapt quantized pretrained language models with LoRA and a task head.

import adapters
model = adapters.adapt("smollm2-135m", adapter=adapters.LoRA(r=8),
                       head=adapters.Classification(labels=["negative", "positive"]),
                       quantization="nf4")
adapters.train(model, train_ds, eval_ds, adapters.TrainConfig(epochs=1))
model.save_pretrained("runs/sentiment")
again = adapters.load("runs/sentiment")
"""

import logging
import warnings

# Library messages known to be harmless here, silenced once, where we know why:
# - bitsandbytes warns at import that an optional CPU kernel package is missing; it only serves the
#   packed CPU inference path, which base.py turns off (one numeric path for train and eval);
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage()
)
# - LLM.int8 quantizes a layer's inputs in fp16 by design and says so on every int8 layer of every
#   forward (36 lines per SmolLM2 forward): said once;
_said: set[str] = set()


def _first_time(message: str) -> bool:
    seen = message in _said
    _said.add(message)
    return not seen


logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    lambda record: "inputs will be cast" not in record.msg or _first_time(record.msg)
)
# - peft reads transformers' old `is_gradient_checkpointing` name, and transformers warns on every
#   command; we never use the name ourselves.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

from adapters.backbone.packaged import PACKAGED_MODELS  # noqa: E402
from adapters.backbone.prequantize import quantize_base  # noqa: E402
from adapters.errors import (  # noqa: E402
    AdaptersError,
    CheckpointError,
    ConfigError,
    DataError,
    NonFiniteLossError,
    StorageError,
    TargetModulesError,
    TrainingError,
    TrainingInterrupted,
    UnknownModelError,
)
from adapters.heads import (  # noqa: E402
    CausalLM,
    Classification,
    MultiLabel,
    MultipleChoice,
    Regression,
    TokenClassification,
)
from adapters.memory.estimate import MemoryEstimate, estimate_memory  # noqa: E402
from adapters.methods.bottleneck import Bottleneck  # noqa: E402
from adapters.methods.lora import LoRA  # noqa: E402
from adapters.model import AdaptedModel, adapt, load  # noqa: E402
from adapters.training.callbacks import Callback  # noqa: E402
from adapters.training.run import TrainConfig, evaluate, train  # noqa: E402

__all__ = [
    "adapt",
    "train",
    "evaluate",
    "load",
    "quantize_base",
    "estimate_memory",
    "MemoryEstimate",
    "LoRA",
    "Bottleneck",
    "Classification",
    "MultiLabel",
    "Regression",
    "MultipleChoice",
    "TokenClassification",
    "CausalLM",
    "TrainConfig",
    "Callback",
    "AdaptedModel",
    "PACKAGED_MODELS",
    "AdaptersError",
    "UnknownModelError",
    "ConfigError",
    "TargetModulesError",
    "DataError",
    "CheckpointError",
    "StorageError",
    "TrainingError",
    "NonFiniteLossError",
    "TrainingInterrupted",
]
