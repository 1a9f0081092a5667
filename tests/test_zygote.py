"""benchmarks/zygote.py: a run forked from the zygote behaves as ``python script args`` started afresh (its
arguments, folder, environment, exit code, output, exit handlers, a peak memory of its own), and a failing, exiting or
hanging run is reported as ``subprocess`` reports it."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402

pytestmark = pytest.mark.skipif(not common.forking_is_safe(), reason="runs start afresh here: nothing forks")

LIGHT = ("json",)
"""What the zygotes of the tests of the protocol import: it does not depend on what is preloaded."""

REPORT = """
import atexit, json, os, resource, sys
atexit.register(lambda: print("exit handler ran"))
megabytes = int(sys.argv[1])
block = bytearray(megabytes << 20)  # touched: every page resident
block[:: 4096] = b"x" * len(block[:: 4096])
print(json.dumps({
    "name": __name__, "argv": sys.argv[1:], "path0": sys.path[0], "cwd": os.getcwd(),
    "flag": os.environ.get("ZYGOTE_TEST_FLAG"), "pid": os.getpid(), "torch_imported": "torch" in sys.modules,
    "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


@pytest.fixture
def env() -> dict:
    """One fixed environment: the same zygote for every run of a test (os.environ changes with the test's name)."""
    return {key: value for key, value in os.environ.items() if key != "PYTEST_CURRENT_TEST"} | {
        "ZYGOTE_TEST_FLAG": "set"
    }


def _script(tmp_path: Path, text: str) -> str:
    path = tmp_path / "scripts" / "child.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def _report(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert lines[-1] == "exit handler ran"  # atexit ran after the script's last line
    return json.loads(lines[-2])


def test_a_forked_run_is_the_scripts_own_fresh_process(tmp_path, env, monkeypatch):
    script = _script(tmp_path, REPORT)
    monkeypatch.chdir(tmp_path)
    big = common.fresh_process(script, ["300", "a b"], env, 120, warm=True)
    small = common.fresh_process(script, ["1", "c"], env, 120, warm=True)
    afresh = subprocess.run([sys.executable, script, "1", "c"], capture_output=True, text=True, env=env, check=True)
    big, small, afresh = (_report(run[1]) for run in (big, small, (0, afresh.stdout)))
    assert big["argv"] == ["300", "a b"] and small["argv"] == afresh["argv"] == ["1", "c"]
    for run in (big, small):
        assert run["name"] == "__main__" and run["flag"] == "set" and run["cwd"] == str(tmp_path)
        assert run["path0"] == afresh["path0"] == str(Path(script).parent)
    assert len({big["pid"], small["pid"], afresh["pid"]}) == 3
    assert big["torch_imported"] and small["torch_imported"] and not afresh["torch_imported"]  # preloaded
    assert (common.PRELOAD, tuple(sorted(env.items()))) in common._ZYGOTES  # one zygote, kept for the next run
    # each run's peak is its own: the 300 MB block of the run before does not count in the next
    assert big["peak_mb"] > small["peak_mb"] + 250


def _light(script: str, env: dict, timeout: float = 60) -> tuple[int, str, str]:
    return common.fresh_process(script, [], env, timeout, warm=True, preload=LIGHT)


def test_failures_exits_and_hangs_are_reported_as_subprocess_reports_them(tmp_path, env):
    raising = _script(tmp_path, "raise ValueError('a bad input')\n")
    code, _, stderr = _light(raising, env)
    assert code == 1 and "ValueError: a bad input" in stderr and "Traceback" in stderr
    with pytest.raises(RuntimeError, match="a bad input"):
        common.run_child(raising, [], env=env)  # the same report from a run started afresh
    assert _light(_script(tmp_path, "import sys; sys.exit(3)\n"), env)[0] == 3
    code, _, stderr = _light(_script(tmp_path, "import sys; sys.exit('stopped')\n"), env)
    assert code == 1 and "stopped" in stderr
    with pytest.raises(subprocess.TimeoutExpired):
        _light(_script(tmp_path, "import time; time.sleep(60)\n"), env, timeout=1)
    # the zygote outlives a killed child and serves the next run
    assert _light(_script(tmp_path, "print('after')\n"), env)[:2] == (0, "after\n")


def test_each_environment_gets_its_own_zygote_and_the_oldest_is_closed(tmp_path, env, monkeypatch):
    script = _script(tmp_path, "import os; print(os.environ['ZYGOTE_TEST_FLAG'])\n")
    assert _light(script, env)[1] == "set\n"
    first = common._ZYGOTES[(LIGHT, tuple(sorted(env.items())))]
    monkeypatch.setattr(common, "MAX_ZYGOTES", 1)
    assert _light(script, env | {"ZYGOTE_TEST_FLAG": "other"})[1] == "other\n"
    assert len(common._ZYGOTES) == 1 and first.process.poll() == 0  # closed: it ended at the end of its input


def test_a_module_in_a_session_with_one_stream_as_the_gpu_check_runs_its_parts(tmp_path, env):
    """``python -m module``; stdout and stderr in one stream; a timeout kills the child's whole process group (what a
    GPU check part started too), and the output so far comes with the error."""
    (tmp_path / "data.json").write_text('{"b": 1}')
    code, out, _ = common.zygote(env, LIGHT).run(
        "json.tool", ["data.json"], 60, str(tmp_path), module=True, merged=True
    )
    assert code == 0 and json.loads(out) == {"b": 1}
    grandchild = tmp_path / "grandchild.pid"
    script = _script(
        tmp_path,
        f"""
        import subprocess, sys, time
        print("to stdout", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(grandchild)!r}, "w").write(str(child.pid))
        time.sleep(60)
        """,
    )
    with pytest.raises(subprocess.TimeoutExpired) as stopped:
        common.zygote(env, LIGHT).run(script, [], 3, session=True, merged=True)
    assert "to stdout" in stopped.value.output and "to stderr" in stopped.value.output
    pid = int(grandchild.read_text())
    for _ in range(50):  # killed with its group; reaped by init once gone
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the part's own child {pid} outlived the timeout")
