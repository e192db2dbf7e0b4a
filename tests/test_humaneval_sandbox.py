"""HumanEval execution in a limited subprocess (eval.py section 5), on the real HumanEval/0.

Each verdict is checked, and so is that the test process itself is unharmed: its own resource
limits unchanged, still responsive, the temporary folders removed, the timed-out child dead.
"""

import os
import resource
import sys
import time

import pytest

from eval import load_humaneval, run_humaneval_completion

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses Linux rlimits")


@pytest.fixture(scope="module")
def problem():
    problems = load_humaneval()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    return problems[0]


@pytest.fixture
def sandbox_root(tmp_path):
    root = tmp_path / "sandbox"
    root.mkdir()
    limits_before = resource.getrlimit(resource.RLIMIT_AS), resource.getrlimit(resource.RLIMIT_CPU)
    yield root
    assert list(root.iterdir()) == []  # every temporary folder removed
    assert (resource.getrlimit(resource.RLIMIT_AS), resource.getrlimit(resource.RLIMIT_CPU)) \
        == limits_before  # the limits were applied to the child only


def test_canonical_solution_passes(problem, sandbox_root):
    r = run_humaneval_completion(problem, problem["canonical_solution"], tmp_root=str(sandbox_root))
    assert r["passed"] is True and r["result"] == "passed"


def test_wrong_completion_fails(problem, sandbox_root):
    r = run_humaneval_completion(problem, "    return False\n", tmp_root=str(sandbox_root))
    assert r["passed"] is False and r["result"].startswith("failed: AssertionError")


def test_syntax_error_fails(problem, sandbox_root):
    r = run_humaneval_completion(problem, "    return (\n", tmp_root=str(sandbox_root))
    assert r["passed"] is False and r["result"].startswith("failed: SyntaxError")


def test_early_exit_does_not_count_as_passed(problem, sandbox_root):
    r = run_humaneval_completion(problem, "    return True\nimport sys\nsys.exit(0)\n",
                                 tmp_root=str(sandbox_root))
    assert r["passed"] is False and r["result"].startswith("failed")


def processes_under(root) -> list[int]:
    """PIDs of the processes whose working folder is under root (each sandbox runs in its own)."""
    pids = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and os.readlink(f"/proc/{d}/cwd").startswith(str(root)):
                pids.append(int(d))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return pids


def test_infinite_loop_times_out_and_is_killed(problem, sandbox_root):
    t0 = time.monotonic()
    r = run_humaneval_completion(problem, "    while True:\n        pass\n", timeout_s=2.0, tmp_root=str(sandbox_root))
    elapsed = time.monotonic() - t0
    assert r["passed"] is False and r["result"] == "timed out"
    assert 1.9 <= elapsed < 10.0
    assert processes_under(sandbox_root) == []  # the child was killed and reaped, not left running


def test_memory_hog_is_stopped_by_the_limit(problem, sandbox_root):
    hog = "    x = bytearray(4 * 1024 ** 3)\n    return len(x) > 0\n"  # 4 GiB
    t0 = time.monotonic()
    r = run_humaneval_completion(problem, hog, memory_mb=512, tmp_root=str(sandbox_root))
    assert r["passed"] is False and r["result"] == "memory"
    assert time.monotonic() - t0 < 4.0  # refused at once, not a timeout


def test_no_network_when_isolation_is_available(problem, sandbox_root):
    import socket

    from eval import network_isolation_available
    if not network_isolation_available():
        pytest.skip("unshare -rn is not permitted here; completions keep the machine's network")
    with socket.socket() as server:  # a listener on this machine's loopback
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        probe = (f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                 "    return True\n")
        r = run_humaneval_completion(problem, probe, tmp_root=str(sandbox_root))
    assert r["network_isolated"] is True
    # refused by the empty network namespace, or (Landlock: no TCP) by the kernel before that
    assert r["result"].startswith(("failed: ConnectionRefusedError", "failed: PermissionError")) or "Network" in r["result"]


# Escapes a generated program could try (issue 20). {secret} is a file in the user's home, {trace}
# a file that must not come to exist, {victim} a file that must survive.
ESCAPES = {
    "read the shell profile through posix": (
        "import posix\n"
        "data = posix.read(posix.open({secret!r}, posix.O_RDONLY), 100)\n"
        "posix.write(posix.open({trace!r}, posix.O_WRONLY | posix.O_CREAT), data)"),
    "read it with open()": "open({trace!r}, 'w').write(open({secret!r}).read())",
    "a shell through posix.system": "import posix\nposix.system('touch {trace}')",
    "a shell through exec": "import posix\nposix.execv('/bin/sh', ['sh', '-c', 'touch {trace}'])",
    "a shell through subprocess": "import _posixsubprocess, subprocess\nsubprocess.run(['touch', {trace!r}])",
    "a shell through ctypes": "import ctypes\nctypes.CDLL(None).system(b'touch {trace}')",
    "delete a file": "import posix\nposix.unlink({victim!r})",
    "a setsid child that outlives the timeout": (
        "import posix, time\n"
        "if posix.fork() == 0:\n"
        "    posix.setsid()\n"
        "    time.sleep(1.5)\n"
        "    posix.close(posix.open({trace!r}, posix.O_WRONLY | posix.O_CREAT))\n"
        "    posix._exit(0)\n"
        "time.sleep(30)"),
    "many processes": (  # each child sleeps: linear, so harmless where the limits are missing
        "import posix, time\n"
        "for _ in range(20):\n"
        "    if posix.fork() == 0:\n"
        "        time.sleep(30)"),
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_escapes_leave_no_trace(problem, sandbox_root, tmp_path, monkeypatch, name):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export SECRET=1\n")
    (home / "victim").write_text("keep me\n")
    monkeypatch.setenv("HOME", str(home))
    code = ESCAPES[name].format(secret=str(home / ".bashrc"), trace=str(tmp_path / "trace"),
                                victim=str(home / "victim"))
    completion = "".join("    " + line + "\n" for line in code.splitlines()) + "    return True\n"
    r = run_humaneval_completion(problem, completion, timeout_s=1.0, tmp_root=str(sandbox_root))
    assert r["passed"] is False and r["result"] != "timed out", r  # refused at once
    time.sleep(2.0 if "setsid" in name else 0.0)  # (the child would have written by now)
    assert not (tmp_path / "trace").exists(), r
    assert (home / "victim").read_text() == "keep me\n" and sorted(p.name for p in home.iterdir()) == [".bashrc", "victim"]
    assert processes_under(sandbox_root) == []
    if sys.platform.startswith("linux"):  # every layer this machine allows was in force
        assert {"rlimits", "audit", "guard"} <= set(r["sandbox"]), r


def test_the_kernel_layers_are_in_force_where_the_machine_allows_them(problem, sandbox_root):
    import ctypes
    import platform
    r = run_humaneval_completion(problem, problem["canonical_solution"], tmp_root=str(sandbox_root))
    assert r["passed"] is True  # the layers leave a correct program alone
    if ctypes.CDLL(None).syscall(444, None, 0, 1) >= 1:  # landlock_create_ruleset(..., VERSION)
        assert "landlock" in r["sandbox"], r
    if platform.machine() in ("x86_64", "aarch64") and "Seccomp:" in open("/proc/self/status").read():
        assert "seccomp" in r["sandbox"], r
