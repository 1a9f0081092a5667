"""The model card (``README.md``) written into every artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapters.artifacts.spec import ArtifactSpec


def _method(spec: ArtifactSpec, path: str) -> str:
    adapter = spec.adapter_spec(Path(path))
    if adapter is None or spec.adapter is None:
        return "head only (frozen base)"
    settings = ", ".join(f"{k}={v}" for k, v in spec.adapter.items() if k != "kind")
    return f"{adapter.describe()} ({settings})"


def model_card(spec: ArtifactSpec, path: str) -> str:
    """Markdown describing the artifact described by ``spec``."""
    head = spec.head
    record = spec.training or {}
    metrics = record.get("metrics", {})
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    labels = head.get("labels")
    quant = spec.quantization or "none"
    kind = "decoder" if spec.base.is_decoder else "encoder"
    return f"""# {path}

An adapted model made with [qadapters](https://pypi.org/project/qadapters/) {spec.versions.get("qadapters", "?")}.

- **Base model**: `{spec.base.name}` ({spec.base.model_type}, {kind}), frozen, quantization: {quant}
- **Method**: {_method(spec, path)}
- **Head**: {head["kind"]}{f" over {len(labels)} labels: {', '.join(labels)}" if labels else ""}
- **Data**: {record.get("train_rows", "?")} training rows, {record.get("eval_rows", "?")} evaluation rows
- **Intended use**: the task above, on text like the training data; check the metrics on your own data first.

## Metrics (held-out evaluation at the end of training)

| metric | value |
|---|---|
{rows or "| (not trained with adapters.train) | |"}

## How to use

```python
import adapters
model = adapters.load("{path}")
model.predict(["some text"])
```

```bash
qadapters predict {path} "some text"
qadapters info {path}
```

Only the trained tensors are stored here (safetensors); `adapters.load` rebuilds the base
model `{spec.base.name}` with the same quantization and checks that it is the same base.

## Versions

```json
{json.dumps(spec.versions, indent=2)}
```
"""
