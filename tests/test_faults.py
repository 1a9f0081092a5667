"""Files under faults: a save that fails midway (no space left) keeps the previous artifact and leaves no
partial folder; two trainings into one output folder at once, the second refused; a corrupted newest
checkpoint, resumed from the one before it, saying so."""

from __future__ import annotations

import errno
import threading

import pytest
import torch

import adapters
from adapters.training.checkpoint import LOCK_FILE, complete_checkpoints, output_lock

from .helpers import toy_sentiment


def _model(path, seed=0):
    return adapters.adapt(
        path, adapter=adapters.LoRA(r=2), head=adapters.Classification(labels=["neg", "pos"]), seed=seed
    )


def test_a_save_failing_for_space_keeps_the_previous_artifact(tiny_llama, tmp_path, monkeypatch):
    import safetensors.torch

    model = _model(tiny_llama)
    model.save_pretrained(tmp_path / "art")
    before = {p.name: p.read_bytes() for p in (tmp_path / "art").iterdir() if p.is_file()}
    other = _model(tiny_llama, seed=1)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    with pytest.raises(adapters.StorageError, match="no space left on the device of .*art"):
        other.save_pretrained(tmp_path / "art", overwrite=True)
    after = {p.name: p.read_bytes() for p in (tmp_path / "art").iterdir() if p.is_file()}
    assert after == before  # the previous artifact, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temporary or partial folder
    monkeypatch.undo()
    torch.testing.assert_close(adapters.load(tmp_path / "art").logits(["good"]), model.logits(["good"]))


def test_a_second_training_into_the_same_folder_is_refused(tiny_llama, tmp_path):
    started, release = threading.Event(), threading.Event()

    def first():
        with output_lock(str(tmp_path / "run"), is_main=True):
            started.set()
            release.wait(30)

    holder = threading.Thread(target=first)
    holder.start()
    started.wait(10)
    try:
        config = adapters.TrainConfig(max_steps=1, output_dir=str(tmp_path / "run"), progress=False)
        with pytest.raises(adapters.ConfigError, match="another training is writing into"):
            adapters.train(_model(tiny_llama), toy_sentiment(8), None, config)
    finally:
        release.set()
        holder.join(10)
    assert (tmp_path / "run" / LOCK_FILE).exists()
    # once the first has ended, training there goes ahead
    adapters.train(_model(tiny_llama), toy_sentiment(8), None, config)


def test_a_corrupt_newest_checkpoint_resumes_from_the_one_before(tiny_llama, tmp_path, capsys):
    config = adapters.TrainConfig(
        max_steps=4, batch_size=8, save_every=2, output_dir=str(tmp_path / "run"), progress=False, seed=0
    )
    adapters.train(_model(tiny_llama), toy_sentiment(48), None, config)
    checkpoints = complete_checkpoints(tmp_path / "run")
    assert [p.name for p in checkpoints] == ["step-000002", "step-000004"]
    (checkpoints[-1] / "model.safetensors").write_bytes(b"\0" * 64)  # a damaged disk, a cut copy
    capsys.readouterr()
    resumed = adapters.TrainConfig(
        max_steps=6,
        batch_size=8,
        save_every=2,
        output_dir=str(tmp_path / "run"),
        progress=False,
        seed=0,
        resume="auto",
    )
    result = adapters.train(_model(tiny_llama), toy_sentiment(48), None, resumed)
    out = capsys.readouterr().out
    assert "step-000004 is corrupt" in out and "resuming from the checkpoint before it" in out
    assert "resumed from" in out and "step-000002 at step 2" in out and result["steps"] == 6


def test_a_corrupt_checkpoint_named_explicitly_is_an_error(tiny_llama, tmp_path):
    config = adapters.TrainConfig(
        max_steps=2, batch_size=8, save_every=2, output_dir=str(tmp_path / "run"), progress=False
    )
    adapters.train(_model(tiny_llama), toy_sentiment(16), None, config)
    (last,) = complete_checkpoints(tmp_path / "run")
    (last / "model.safetensors").write_bytes(b"\0" * 64)
    again = adapters.TrainConfig(
        max_steps=4, batch_size=8, output_dir=str(tmp_path / "run"), progress=False, resume=str(last)
    )
    with pytest.raises(adapters.CheckpointError, match="is corrupt"):
        adapters.train(_model(tiny_llama), toy_sentiment(16), None, again)
