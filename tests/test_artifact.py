"""Save / load: only trainable tensors, identical logits, clear errors on bad folders."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapters

TEXTS = ["good fun film", "a dull and tedious mess", "the acting was not very good"]


def _trained(path, quantization="nf4", adapter=True, data=None):
    model = adapters.adapt(path, adapter=adapters.LoRA(r=4) if adapter else None,
                           head=adapters.Classification(labels=["neg", "pos"]), quantization=quantization)
    if data:
        adapters.train(model, data, None, adapters.TrainConfig(max_steps=3, lr=1e-2, batch_size=8, progress=False))
    return model


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8", None])
def test_round_trip_gives_identical_logits(tiny_model, toy_data, tmp_path, quantization):
    model = _trained(tiny_model, quantization, data=toy_data[0])
    model.save_pretrained(tmp_path / "art")
    again = adapters.load(tmp_path / "art")
    assert again.base.quantization == quantization
    assert again.head_spec == model.head_spec and again.adapter == model.adapter
    assert torch.allclose(model.logits(TEXTS), again.logits(TEXTS), atol=1e-5)
    assert again.predict(TEXTS) == model.predict(TEXTS)


def test_artifact_holds_only_trainable_tensors_as_safetensors(tiny_llama, tmp_path):
    model = _trained(tiny_llama)
    model.save_pretrained(tmp_path / "art")
    files = sorted(p.relative_to(tmp_path / "art").as_posix() for p in (tmp_path / "art").rglob("*") if p.is_file())
    assert "qadapters.json" in files and "head.safetensors" in files and "adapter/adapter_model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    saved = len(load_file(tmp_path / "art" / "adapter" / "adapter_model.safetensors")) + len(load_file(tmp_path / "art" / "head.safetensors"))
    assert saved == len(model.trainable_parameters())
    spec = json.loads((tmp_path / "art" / "qadapters.json").read_text())
    assert spec["head"]["labels"] == ["neg", "pos"] and spec["quantization"] == "nf4" and spec["adapter"]["r"] == 4


def test_head_only_round_trip(tiny_bert, toy_data, tmp_path):
    model = _trained(tiny_bert, adapter=False, data=toy_data[0])
    model.save_pretrained(tmp_path / "art")
    assert not (tmp_path / "art" / "adapter").exists()
    assert torch.allclose(model.logits(TEXTS), adapters.load(tmp_path / "art").logits(TEXTS), atol=1e-5)


def test_saving_replaces_an_artifact_but_not_other_folders(tiny_llama, tmp_path):
    model = _trained(tiny_llama)
    model.save_pretrained(tmp_path / "art")
    model.save_pretrained(tmp_path / "art")  # an artifact may be replaced
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    with pytest.raises(adapters.ConfigError, match="not a qadapters artifact"):
        model.save_pretrained(user)
    assert (user / "notes.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_missing_and_corrupt_files(tiny_llama, tmp_path):
    model = _trained(tiny_llama)
    model.save_pretrained(tmp_path / "art")
    with pytest.raises(adapters.CheckpointError, match="no qadapters.json"):
        adapters.load(tmp_path)
    (tmp_path / "art" / "head.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(adapters.CheckpointError, match="corrupt"):
        adapters.load(tmp_path / "art")
    (tmp_path / "art" / "head.safetensors").unlink()
    with pytest.raises(adapters.CheckpointError, match="missing"):
        adapters.load(tmp_path / "art")
    (tmp_path / "art" / "qadapters.json").write_text("{not json")
    with pytest.raises(adapters.CheckpointError, match="corrupt"):
        adapters.load(tmp_path / "art")


def test_mismatched_shapes(tiny_llama, tmp_path):
    model = _trained(tiny_llama)
    model.save_pretrained(tmp_path / "art")
    head = tmp_path / "art" / "head.safetensors"
    save_file({"score.weight": torch.zeros(3, 64), "score.bias": torch.zeros(3)}, str(head))
    with pytest.raises(adapters.CheckpointError, match="shape"):
        adapters.load(tmp_path / "art")


def test_different_base_is_refused(tiny_llama, tmp_path):
    from .conftest import build_tiny

    model = _trained(tiny_llama)
    model.save_pretrained(tmp_path / "art")
    other = build_tiny("llama", tmp_path / "other")
    from transformers import AutoModel

    reseeded = AutoModel.from_pretrained(other)
    torch.nn.init.normal_(reseeded.embed_tokens.weight, std=1.0)
    reseeded.save_pretrained(other)
    with pytest.raises(adapters.CheckpointError, match="different base"):
        adapters.load(tmp_path / "art", base=other)


DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["lora-nf4", "bottleneck-nf4"])
def test_an_artifact_saved_by_an_earlier_version_still_loads(tiny_llama, name):
    """Artifacts committed from qadapters before the restructuring (commit c06fd42) load and give the
    logits they gave when saved."""
    expected = json.loads((DATA / "artifact-v0.1-logits.json").read_text())
    model = adapters.load(DATA / f"artifact-v0.1-{name}", base=tiny_llama)
    assert torch.allclose(model.logits(expected["texts"]), torch.tensor(expected["logits"][name]), atol=1e-5)


def test_saved_files_follow_the_umask(tiny_llama, tmp_path):
    """Written through a private temporary folder, yet readable as any file the user creates."""
    import os
    import stat

    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=2), head=adapters.Classification(labels=["a", "b"]))
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "art")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "art", *(tmp_path / "art").rglob("*")]}
    assert modes["art"] == 0o755 and modes["adapter"] == 0o755
    assert modes["head.safetensors"] == 0o644 and modes["adapter_model.safetensors"] == 0o644
