"""qadapters: adapt quantized pretrained language models with LoRA and a task head.

    import adapters
    model = adapters.adapt("smollm2-135m", adapter=adapters.LoRA(r=8),
                           head=adapters.Classification(labels=["negative", "positive"]),
                           quantization="nf4")
    adapters.train(model, train_ds, eval_ds, adapters.TrainConfig(epochs=1))
    model.save_pretrained("runs/sentiment")
    again = adapters.load("runs/sentiment")
"""

from .artifact import load
from .bottleneck import Bottleneck
from .errors import (AdaptersError, CheckpointError, ConfigError, DataError, NonFiniteLossError, TargetModulesError,
                     TrainingError, TrainingInterrupted, UnknownModelError)
from .heads import CausalLM, Classification, MultiLabel, MultipleChoice, Regression, TokenClassification
from .lora import LoRA
from .model import AdaptedModel, adapt
from .packaged import PACKAGED_MODELS
from .train import TrainConfig, evaluate, train

__all__ = [
    "adapt", "train", "evaluate", "load",
    "LoRA", "Bottleneck",
    "Classification", "MultiLabel", "Regression", "MultipleChoice", "TokenClassification", "CausalLM",
    "TrainConfig", "AdaptedModel", "PACKAGED_MODELS",
    "AdaptersError", "UnknownModelError", "ConfigError", "TargetModulesError", "DataError", "CheckpointError",
    "TrainingError", "NonFiniteLossError", "TrainingInterrupted",
]
