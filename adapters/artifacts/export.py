"""Export an artifact as a standard ``AutoModelForSequenceClassification`` folder for ``transformers.pipeline``.

Where the adapted model *is* a transformers sequence classifier, it is written as one: a decoder whose
classification (or multi-label) head is a linear layer without bias on the last real token, which is
exactly what ``LlamaForSequenceClassification`` (and Qwen2's, Mistral's, GPT-2's...) computes: the
last non-padding token's hidden state times ``score``. The adapter is merged first (LoRA through
peft's ``merge_and_unload``, on the dequantized base as ``merge.py`` does), the head's weight
becomes ``score.weight``, and the labels become ``id2label``, so

    pipeline("text-classification", model="runs/sentiment-export", top_k=None)

gives the adapted model's labels and probabilities. A head's ``prompt`` travels in the exported
tokenizer, so the pipeline reads every text inside it as the model did: the part before ``{text}`` as a
``Prepend`` normalizer, the part after it as token ids the post-processor appends. The export checks on
probe texts that this tokenizes exactly as the whole prompted text does, and refuses the prompt otherwise
(exact for texts that fit ``max_length``: the library cuts a longer text inside its prompt, the pipeline
does not cut). Where it does not map, ``export`` refuses and says
why before loading anything: an encoder's sequence classifier reads BERT's pooler (a dense layer and
tanh over [CLS]) that our heads do not use; mean or first-token pooling, windows over long texts, a
head with a bias, multiple choice or per-token heads, and bottleneck adapters (no weight absorbs
them) have no counterpart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from adapters.artifacts.format import open_artifact
from adapters.artifacts.spec import ArtifactSpec
from adapters.backbone.loading import load_backbone
from adapters.backbone.packaged import drop_quantizer_marks
from adapters.errors import ConfigError
from adapters.files import destination_lock, durable_folder, probe_writable, read_manifest, writable_entries

MARK = "qadapters-export.json"  # says the folder is an export (what --overwrite may replace)


def refusal(spec: ArtifactSpec, head: Any, adapter: Any) -> str | None:
    """Why the artifact cannot be a transformers sequence classifier (None: it can)."""
    if head.problem_type is None:
        return f"a {type(head).__name__} head has no text-classification pipeline counterpart"
    if not spec.base.is_decoder:
        return (
            "an encoder's AutoModelForSequenceClassification classifies BERT's pooler output (a dense layer and "
            "tanh over [CLS]), which the adapted model's head does not read"
        )
    if head.resolved_pooling(True) != "last":
        return f"pooling={head.pooling!r}: a decoder's sequence classifier reads the last token only"
    if head.long_text != "truncate":
        return "long_text='windows' pools several windows per text; the pipeline reads one"
    if head.bias:
        return (
            "the head has a bias, and a decoder's sequence-classification layer (score) has none; train with "
            "Classification(bias=False) to export"
        )
    if adapter is not None and adapter.merge_refusal():
        return f"{adapter.describe()} adapters: {adapter.merge_refusal()}"
    return None


def export_for_pipeline(artifact, out, overwrite: bool = False, log=print, verify: bool = True) -> Path:
    """Write ``artifact`` as an ``AutoModelForSequenceClassification`` folder at ``out``; return ``out``."""
    from transformers import AutoModelForSequenceClassification

    opened = open_artifact(artifact, verify)
    spec, adapter, head = opened.spec, opened.adapter, opened.head
    why = refusal(spec, head, adapter)
    if why:
        raise ConfigError(
            f"{artifact} cannot be exported for transformers.pipeline: {why}. Use it with adapters.load "
            f"or qadapters serve"
        )
    out = Path(out)
    writable_entries(out, "export", _exported_files, overwrite=overwrite)
    probe_writable(out, "export destination")
    network, base = load_backbone(
        opened.base_location(), spec.quantization, dtype=spec.dtype, device="cpu", padding_side=spec.padding_side
    )
    opened.check_base(network, base.location)
    if spec.quantization is not None:
        log(f"dequantizing the {spec.quantization} base before merging (the adapter was trained on it)")
        network = network.dequantize(dtype=base.compute_dtype)
        drop_quantizer_marks(network)
    if adapter is not None:
        network = adapter.merge(network, opened.path)
    if head.prompt is not None:
        carry_prompt(base.tokenizer, head.prompt)
    classifier = _classifier(network, head, base.tokenizer, opened.head_tensors, AutoModelForSequenceClassification)
    with (
        destination_lock(out, "export"),
        durable_folder(out, "export", writable_entries(out, "export", _exported_files, overwrite=overwrite)) as tmp,
    ):
        classifier.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
        files = sorted([p.name for p in tmp.iterdir()] + [MARK])
        (tmp / MARK).write_text(json.dumps({"exported_from": opened.path.name, "files": files}, indent=2))
    log(f"exported to {out}: pipeline('text-classification', model={str(out)!r}, top_k=None)")
    return out


def _classifier(network: PreTrainedModel, head, tokenizer, tensors: dict, auto) -> PreTrainedModel:
    """The sequence classifier of ``network``'s architecture with its weights and the head as ``score``."""
    config = network.config
    config.num_labels = len(head.labels)
    config.id2label = dict(enumerate(head.labels))
    config.label2id = {label: i for i, label in enumerate(head.labels)}
    config.pad_token_id = tokenizer.pad_token_id
    config.problem_type = head.problem_type
    try:
        classifier = auto.from_config(config, dtype=next(network.parameters()).dtype)
    except ValueError as err:
        raise ConfigError(f"transformers has no sequence classifier for {config.model_type!r} ({err})") from None
    getattr(classifier, classifier.base_model_prefix).load_state_dict(network.state_dict())
    extra = [m for n, m in classifier.named_children() if n != classifier.base_model_prefix]
    if len(extra) != 1 or not isinstance(extra[0], nn.Linear) or extra[0].bias is not None:
        raise ConfigError(
            f"{type(classifier).__name__} does not end in one bias-free linear layer; cannot place the head"
        )
    extra[0].weight.data.copy_(tensors["score.weight"])
    return classifier.eval()


def _exported_files(out: Path) -> list[str] | None:
    """The files an earlier export at ``out`` wrote (None: ``out`` is not an export): its manifest's, or for one
    written before manifests, the files its mark lists."""
    if not (out / MARK).is_file():
        return None
    manifest = read_manifest(out)
    if manifest is not None:
        return list(manifest.files) if manifest.holds == "export" else None
    return json.loads((out / MARK).read_text()).get("files", []) if (out / MARK).is_file() else None


# texts the carried prompt must tokenize exactly as the prompted text does: words, punctuation, spacing,
# digits, non-ASCII letters, a lone character
PROBES = ("a moving, funny film!", "Dull.", "  spaces  around ", "ünïcode çafé 42", "x", "New line\nhere", "'quoted'")


def carry_prompt(tokenizer: Any, prompt: str) -> None:
    """Make ``tokenizer`` read every text inside ``prompt`` (``{text}`` marks the place), as the head did:
    a ``Prepend`` normalizer before the text, the tokens after it appended by the post-processor; refused
    (``ConfigError``) unless the probe texts then tokenize exactly as the prompted texts do."""
    from tokenizers import normalizers, processors

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"the head's prompt {prompt!r} can travel only in a fast tokenizer; this base has a slow one")
    before, after = prompt.split("{text}")
    expected = [tokenizer(prompt.replace("{text}", text))["input_ids"] for text in PROBES]
    end = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []  # before the normalizer changes
    if before:
        kept = [backend.normalizer] if backend.normalizer else []
        backend.normalizer = normalizers.Sequence([*kept, normalizers.Prepend(before)])
    if end:
        suffix = {"id": "[PROMPT_END]", "ids": end, "tokens": tokenizer.convert_ids_to_tokens(end)}
        template = processors.TemplateProcessing(single="$A [PROMPT_END]", special_tokens=[suffix])
        # the prompt's end first, then the base's own special tokens (BOS, EOS) around it all
        current = backend.post_processor
        backend.post_processor = processors.Sequence([template, current]) if current else template
    got = [tokenizer(text)["input_ids"] for text in PROBES]
    differ = [text for text, a, b in zip(PROBES, expected, got, strict=True) if a != b]
    if differ:
        raise ConfigError(
            f"the head's prompt {prompt!r} cannot travel in this tokenizer: with it {differ[0]!r} tokenizes "
            f"otherwise than inside the prompt, so transformers' pipeline would predict differently. Serve the "
            f"artifact (qadapters serve) or use adapters.load instead"
        )
