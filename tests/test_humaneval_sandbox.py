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


def test_infinite_loop_times_out_and_is_killed(problem, sandbox_root, tmp_path):
    pid_file = tmp_path / "child.pid"
    loop = (f"    open({str(pid_file)!r}, 'w').write(str(__import__('os').getpid()))\n"
            "    while True:\n        pass\n")
    t0 = time.monotonic()
    r = run_humaneval_completion(problem, loop, timeout_s=2.0, tmp_root=str(sandbox_root))
    elapsed = time.monotonic() - t0
    assert r["passed"] is False and r["result"] == "timed out"
    assert 1.9 <= elapsed < 10.0
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # the child was killed and reaped, not left running
        os.kill(pid, 0)


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
    assert r["result"].startswith("failed: ConnectionRefusedError") or "Network" in r["result"]
