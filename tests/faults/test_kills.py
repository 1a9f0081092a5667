"""SIGKILL at every step of a save that changes the disk (``files.durable.KILL_POINT``): a forked child saves
and is killed at step k by a real SIGKILL; then, as a new process would, the folder is opened. At every kill
point the folder holds the old artifact or the new one (never a mix that loads), and every file of the user's
is where it was, byte for byte. A few real kills at random moments (slow tier) complete the picture."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

import adapters
from adapters.artifacts.format import open_artifact
from adapters.files import durable
from adapters.files.manifest import read_manifest

USER_FILES = {"notes.txt": b"my notes", "reports/eval.json": b"{}"}


def _model(path, kind="lora", seed=0):
    adapter = adapters.LoRA(r=2) if kind == "lora" else adapters.Bottleneck()
    return adapters.adapt(path, adapter=adapter, head=adapters.Classification(labels=["a", "b"]), seed=seed)


def _tensors(folder: Path) -> dict[str, dict[str, bytes]]:
    """The artifact's tensors, by file and name: what tells one save from another (the files' bytes do not:
    safetensors writes its metadata in no fixed order)."""
    from safetensors.torch import load_file

    return {
        p.relative_to(folder).as_posix(): {k: v.numpy().tobytes() for k, v in load_file(str(p)).items()}
        for p in sorted(folder.rglob("*.safetensors"))
        if not any(part.startswith(".") for part in p.relative_to(folder).parts)  # a dead writer's work files
    }


def _user_files(folder: Path) -> dict[str, bytes]:
    return {rel: (folder / rel).read_bytes() for rel in USER_FILES if (folder / rel).is_file()}


def _killed_at(step: int, save) -> bool:
    """Run ``save`` in a forked child killed by SIGKILL before its ``step``-th change to the disk; True when
    the kill happened (False: the save has fewer steps and finished)."""
    pid = os.fork()
    if pid == 0:  # the child: count steps, die at the chosen one
        seen = [0]

        def kill_point(name: str) -> None:
            if seen[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            seen[0] += 1

        durable.KILL_POINT = kill_point
        try:
            save()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _scenario(tmp_path, name, before, save):
    """Kill ``save`` at every step after ``before`` laid the folder; check old-or-new and the user's files.
    Returns the number of kills."""
    template, art = tmp_path / f"{name}-template", tmp_path / name / "art"
    before(template)
    old = _tensors(template) if (template / "qadapters.json").is_file() else None
    reference = tmp_path / f"{name}-new"
    shutil.copytree(template, reference)
    save(reference)
    new, users = _tensors(reference), _user_files(template)
    kills = 0
    for step in range(100):
        shutil.rmtree(art.parent, ignore_errors=True)
        art.parent.mkdir()
        shutil.copytree(template, art)
        if not _killed_at(step, lambda: save(art)):
            break
        kills += 1
        assert _user_files(art) == users, f"{name}, kill {step}: the user's files moved or changed"
        if (art / "qadapters.json").is_file() or (art / durable.STAGING / durable.COMMIT).is_file():
            opened = open_artifact(art)  # finishes a decided save, verifies every file
            assert _tensors(opened.path) in (old, new), f"{name}, kill {step}: neither the old nor the new artifact"
            assert not (art / durable.STAGING / durable.COMMIT).exists()  # a decided save was finished
        else:
            visible = {p.name for p in art.iterdir() if not p.name.startswith(".")}
            assert old is None and visible <= {"notes.txt", "reports"}, f"{name}, kill {step}: a partial artifact"
        save(art)  # the next save finishes or clears what the dead one left, and succeeds
        assert _tensors(art) == new and _user_files(art) == users
        assert [p.name for p in art.parent.iterdir()] == ["art"], "an orphan temporary folder survived"
    return kills


def test_a_kill_at_any_step_of_a_save_leaves_the_old_or_the_new_artifact(tiny_llama, tmp_path):
    lora, lora2, bottleneck = _model(tiny_llama), _model(tiny_llama, seed=1), _model(tiny_llama, "bottleneck", 2)

    def empty(folder):
        folder.mkdir()

    def with_users(folder, artifact=None):
        folder.mkdir()
        if artifact is not None:
            artifact.save_pretrained(folder, overwrite=True)
        for rel, data in USER_FILES.items():
            (folder / rel).parent.mkdir(exist_ok=True)
            (folder / rel).write_bytes(data)

    scenarios = [
        ("fresh", empty, lambda p: lora.save_pretrained(p)),
        ("resave", lambda f: with_users(f, lora), lambda p: lora2.save_pretrained(p, overwrite=True)),
        ("other-kind", lambda f: with_users(f, lora), lambda p: bottleneck.save_pretrained(p, overwrite=True)),
        ("beside-users", with_users, lambda p: lora.save_pretrained(p, overwrite=True)),
    ]
    kills = {name: _scenario(tmp_path, name, before, save) for name, before, save in scenarios}
    print(f"injected kills per scenario: {kills}")
    assert all(count >= 3 for count in kills.values()), kills
    assert sum(kills.values()) >= 30, kills  # with the reader kills below: >= 50 injected kills in all


def test_a_reader_killed_while_finishing_a_decided_save(tiny_llama, tmp_path):
    """A save killed after it was decided, then the reader that finishes it killed at each of its steps: the
    next reader still finds the new artifact whole."""
    old, new = _model(tiny_llama), _model(tiny_llama, seed=1)
    template = tmp_path / "template"
    old.save_pretrained(template)
    (template / "notes.txt").write_text("mine")
    reference = tmp_path / "reference"
    new.save_pretrained(reference)
    expected, kills = _tensors(reference), 0
    for step in range(4, 40):  # past the manifest, the flush, the commit file and its rename: a decided save
        art = tmp_path / f"art-{step}"
        shutil.copytree(template, art)
        if not _killed_at(step, lambda a=art: new.save_pretrained(a, overwrite=True)):
            break
        for reader_step in range(20):
            if not _killed_at(reader_step, lambda a=art: open_artifact(a)):
                break
            kills += 1
        assert _tensors(open_artifact(art).path) == expected
        assert (art / "notes.txt").read_text() == "mine"
        assert read_manifest(art) is not None
    print(f"reader kills: {kills}")
    assert kills >= 20, kills


def test_a_kill_while_the_commit_is_written_leaves_the_old_artifact(tiny_llama, tmp_path, monkeypatch):
    """Killed after the commit file was created and before it was filled (inside one step, where the step kills
    do not reach; a real kill at a random moment found it): the save was not decided, the old artifact opens, and
    the next save goes through."""
    old, new = _model(tiny_llama), _model(tiny_llama, seed=1)
    art = tmp_path / "art"
    old.save_pretrained(art)
    (art / "notes.txt").write_text("mine")
    expected = _tensors(art)

    dump = durable.json.dump

    def killed_while_writing(obj, *args, **kwargs):
        if isinstance(obj, dict) and set(obj) == {"remove"}:  # the commit's list (the manifest is written before)
            os.kill(os.getpid(), signal.SIGKILL)
        return dump(obj, *args, **kwargs)

    pid = os.fork()
    if pid == 0:  # the child: dies inside the commit file's write
        monkeypatch.setattr(durable.json, "dump", killed_while_writing)
        try:
            new.save_pretrained(art, overwrite=True)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert _tensors(open_artifact(art).path) == expected and (art / "notes.txt").read_text() == "mine"
    new.save_pretrained(art, overwrite=True)
    assert _tensors(open_artifact(art).path) != expected and (art / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_real_kills_at_random_moments(tiny_llama, tmp_path):
    """A process saving in a loop, SIGKILLed at random moments (not at an injected step): the folder always
    opens as one of the two artifacts, the user's file in place."""
    import random
    import subprocess
    import sys
    import time

    script = f"""
import adapters, sys
a = adapters.adapt({tiny_llama!r}, adapter=adapters.LoRA(r=2), head=adapters.Classification(labels=["a", "b"]), seed=0)
b = adapters.adapt({tiny_llama!r}, adapter=adapters.LoRA(r=2), head=adapters.Classification(labels=["a", "b"]), seed=1)
a.save_pretrained(sys.argv[1] + "-a", overwrite=True); b.save_pretrained(sys.argv[1] + "-b", overwrite=True)
print("ready", flush=True)
while True:
    for m in (a, b):
        m.save_pretrained(sys.argv[1], overwrite=True)
"""
    art = tmp_path / "art"
    _model(tiny_llama).save_pretrained(art)
    (art / "notes.txt").write_text("mine")
    rng = random.Random(0)
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", script, str(art)], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.2, 1.5))
        child.kill()
        child.wait()
        assert (art / "notes.txt").read_text() == "mine"
        found = _tensors(open_artifact(art).path)
        assert found in (_tensors(Path(f"{art}-a")), _tensors(Path(f"{art}-b")))
