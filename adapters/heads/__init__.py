"""Task heads: small full-precision modules over the backbone's hidden states.

Long texts: the whole-text heads (classification, multi-label, regression) can read a text
longer than the model's length as overlapping windows (``long_text="windows"``): every window
is scored and the window logits are pooled (mean or max) into the text's logits, in training
and in prediction, so nothing past the first window is dropped.

A head is split in two, as peft splits config and layer: a *spec* (a dataclass the user
builds, saved as JSON with the artifact: labels, pooling, loss settings) and the *module*
(weights, saved as safetensors). Heads are never part of the quantized backbone, so they are
never quantized and always train in float32.

Each spec says how to read a target from a data row (``target``), its loss, what to gather
per example at evaluation (``eval_outputs``) and the metrics computed from it, and how to turn
outputs into predictions (``decode``). The heads:

=====================  ==================================  ==============================
head                   module                              loss
=====================  ==================================  ==============================
Classification         pool -> linear(num_labels)          cross-entropy (weights, smoothing)
MultiLabel             pool -> linear(num_labels)          BCE with logits
Regression             pool -> linear(num_outputs)         MSE
MultipleChoice         pool each (context, choice) -> 1    cross-entropy over choices
  scoring=likelihood   the base's log-prob of the choice   cross-entropy over choices
TokenClassification    linear(num_labels) on every token   cross-entropy on first sub-tokens
CausalLM               the base's own LM head, frozen      next-token loss on the response
=====================  ==================================  ==============================

The package: ``spec.py`` (``HeadSpec``, what every kind provides), ``layers.py`` (the head modules
and pooling), ``sequence.py`` (classification, multi-label, regression), ``choice.py``,
``tokens.py``, ``causal.py``; the kinds are listed once, in ``registry.HEADS``.
"""

from adapters.data.encoding import IGNORE
from adapters.heads.causal import CausalLM
from adapters.heads.choice import MultipleChoice
from adapters.heads.layers import POOLINGS, ChoiceLikelihood, SequenceHead, TokenHead, pool, pool_segments, pool_windows
from adapters.heads.sequence import Classification, MultiLabel, Regression
from adapters.heads.spec import HeadSpec, LongTextHead
from adapters.heads.tokens import TokenClassification

__all__ = [
    "IGNORE",
    "POOLINGS",
    "CausalLM",
    "ChoiceLikelihood",
    "Classification",
    "HeadSpec",
    "LongTextHead",
    "MultiLabel",
    "MultipleChoice",
    "Regression",
    "SequenceHead",
    "TokenClassification",
    "TokenHead",
    "pool",
    "pool_segments",
    "pool_windows",
]
