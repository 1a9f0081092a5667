"""Save / load: only trainable tensors, identical logits, clear errors on bad folders."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapters

TEXTS = ["good fun film", "a dull and tedious mess", "the acting was not very good"]


def _trained(path, quantization="nf4", adapter=True, data=None):
    model = adapters.adapt(
        path,
        adapter=adapters.LoRA(r=4) if adapter else None,
        head=adapters.Classification(labels=["neg", "pos"]),
        quantization=quantization,
    )
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
    saved = len(load_file(tmp_path / "art" / "adapter" / "adapter_model.safetensors")) + len(
        load_file(tmp_path / "art" / "head.safetensors")
    )
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
    with pytest.raises(adapters.ConfigError, match="holds an earlier artifact; pass overwrite=True"):
        model.save_pretrained(tmp_path / "art")  # never replaced silently
    model.save_pretrained(tmp_path / "art", overwrite=True)  # an artifact may be replaced, when asked
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
    with pytest.raises(adapters.CheckpointError, match="head.safetensors has .* bytes.*truncated or corrupt"):
        adapters.load(tmp_path / "art")
    with pytest.raises(adapters.CheckpointError, match="shape"):  # unverified, the tensors are still checked
        adapters.load(tmp_path / "art", verify=False)


def test_different_base_is_refused(tiny_llama, tmp_path):
    from .helpers import build_tiny

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


def test_resaving_keeps_the_users_files(tiny_llama, tmp_path):
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=2), head=adapters.Classification(labels=["a", "b"]))
    art = tmp_path / "art"
    model.save_pretrained(art)
    (art / "notes.md").write_text("my notes")
    (art / "reports").mkdir()
    (art / "reports" / "eval.json").write_text("{}")
    again = adapters.adapt(tiny_llama, adapter=adapters.Bottleneck(), head=adapters.Classification(labels=["a", "b"]))
    again.save_pretrained(art, overwrite=True)  # another kind: the LoRA folder goes, the user's files stay
    names = sorted(p.name for p in art.iterdir())
    assert names == [
        "README.md",
        "bottleneck.safetensors",
        "head.safetensors",
        "notes.md",
        "qadapters-manifest.json",
        "qadapters.json",
        "reports",
    ]
    assert (art / "notes.md").read_text() == "my notes" and (art / "reports" / "eval.json").exists()
    assert json.loads((art / "qadapters.json").read_text())["files"] == [
        "README.md",
        "bottleneck.safetensors",
        "head.safetensors",
        "qadapters.json",
    ]
    assert isinstance(adapters.load(art).adapter, adapters.Bottleneck)


def test_overwrite_writes_beside_the_users_files(tiny_llama, tmp_path):
    model = adapters.adapt(tiny_llama, adapter=None, head=adapters.Classification(labels=["a", "b"]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "data.csv").write_text("text,label\n")
    model.save_pretrained(tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "data.csv").read_text() == "text,label\n"
    again = adapters.load(tmp_path / "out")
    torch.testing.assert_close(again.logits(["a b"]), model.logits(["a b"]), rtol=0, atol=1e-6)


def test_an_artifact_and_its_local_base_travel_together(tiny_llama, tmp_path):
    """No absolute path inside: the base is recorded relative to the artifact."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(tiny_llama, project / "base")
    model = _trained(str(project / "base"))
    model.save_pretrained(project / "runs" / "art")
    spec = json.loads((project / "runs" / "art" / "qadapters.json").read_text())
    assert spec["base"]["path"] == "../../base" and str(tmp_path) not in json.dumps(spec)
    moved = tmp_path / "elsewhere" / "project"
    shutil.move(project, moved)
    again = adapters.load(moved / "runs" / "art")
    assert torch.equal(again.logits(TEXTS), model.logits(TEXTS))


def test_a_base_with_one_changed_layer_is_refused(tiny_llama, tmp_path):
    """Same embeddings, one retrained block: the tensors' digest tells them apart."""
    import shutil

    from transformers import LlamaForCausalLM

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    model = _trained(str(base))
    model.save_pretrained(tmp_path / "art")
    changed = LlamaForCausalLM.from_pretrained(base)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    changed.save_pretrained(base)
    with pytest.raises(adapters.CheckpointError, match=r"1 tensor\(s\) differ, e.g. \['model.layers.1.mlp.down_proj"):
        adapters.load(tmp_path / "art")


def test_a_merged_artifact_is_self_contained(tiny_llama, tmp_path):
    import shutil

    from adapters.artifacts.merge import merge_artifact

    model = _trained(tiny_llama)
    model.save_pretrained(tmp_path / "art")
    merge_artifact(tmp_path / "art", tmp_path / "merged", log=lambda *_: None)
    spec = json.loads((tmp_path / "merged" / "qadapters.json").read_text())
    assert spec["base"]["path"] == "." and spec["merged_from"] == "art" and str(tmp_path) not in json.dumps(spec)
    shutil.move(tmp_path / "merged", tmp_path / "moved")
    (tmp_path / "moved" / "notes.txt").write_text("mine")
    merged = adapters.load(tmp_path / "moved")
    assert torch.allclose(merged.logits(TEXTS), model.logits(TEXTS), atol=1e-4)
    merge_artifact(tmp_path / "art", tmp_path / "moved", overwrite=True, log=lambda *_: None)  # an earlier merge
    assert (tmp_path / "moved" / "notes.txt").read_text() == "mine"
