"""Supervision written once (issue 21, item 3): how a child is started, how it dies with its parent.

Real processes, found and signalled by pid. A parent with threads starts its child with
``process.start_child`` (no ``preexec_fn``, which is unsafe in a threaded parent): the child arms its death
with its parent itself, and a parent gone before the child could do so is noticed too.
"""
from __future__ import annotations

import ast
import os
import signal
import sys
import textwrap

from sf_bsread_writer import process

from .helpers import ROOT, Child, FakeClock, process_gone, wait_for

DEADLINE = 30.0  # a loaded 2-core machine: Python starts take seconds

# The child: arms its parent-death with service_start() (as every service's main() does), says so, waits.
# With ``wait_stdin``, it first reads its stdin to the end: until its parent is gone (the parent holds the pipe).
CHILD = textwrap.dedent("""
    import sys, threading
    if "wait_stdin" in sys.argv:
        sys.stdin.read()
    from sf_bsread_writer import process
    process.service_start()
    print("child armed", flush=True)
    threading.Event().wait()
""")

# The parent: busy threads (as the buffer has), starts the child from one of them, prints its pid, waits.
PARENT = textwrap.dedent("""
    import subprocess, sys, threading
    from sf_bsread_writer import process
    mode = sys.argv[1]
    stop = threading.Event()
    for _ in range(4):
        threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)], daemon=True).start()
    def start():
        child = process.start_child([sys.executable, "-c", sys.argv[2], mode],
                                    stdin=subprocess.PIPE if mode == "wait_stdin" else subprocess.DEVNULL)
        print("CHILD", child.pid, flush=True)
        threading.Event().wait()  # the starting thread lives as long as the process
    threading.Thread(target=start, name="starter").start()
""")


def _start_parent(mode: str) -> tuple[Child, int]:
    parent = Child([sys.executable, "-c", PARENT, mode, CHILD], env={"PYTHONPATH": str(ROOT)})
    child_pid = int(parent.wait_for_line("CHILD", timeout=DEADLINE).split()[1])
    return parent, child_pid


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_child_of_a_threaded_parent_dies_when_the_parent_is_killed():
    parent, child_pid = _start_parent("run")
    try:
        if "child armed" not in parent.lines:  # the child may say so before its parent names it
            parent.wait_for_line("child armed", timeout=DEADLINE)
        os.kill(parent.process.pid, signal.SIGKILL)
        wait_for(lambda: process_gone(child_pid), timeout=DEADLINE)
    finally:
        _kill(child_pid)
        parent.stop()


def test_a_child_whose_parent_died_before_it_armed_ends_at_its_start():
    """The race PR_SET_PDEATHSIG alone leaves open: the parent gone while the child still starts."""
    parent, child_pid = _start_parent("wait_stdin")
    try:
        os.kill(parent.process.pid, signal.SIGKILL)  # its stdin pipe closes: the child goes on starting
        wait_for(lambda: process_gone(child_pid), timeout=DEADLINE)
        assert "child armed" not in parent.output()
    finally:
        _kill(child_pid)
        parent.stop()


def test_start_child_runs_the_child_in_its_own_session_and_tells_it_its_parent(tmp_path):
    script = "import os; print(os.getsid(0), os.environ.get(%r))" % process.PARENT_ENV
    child = process.start_child([sys.executable, "-c", script], stdout=-1, text=True)
    out, _ = child.communicate(timeout=DEADLINE)
    assert out.split() == [str(child.pid), str(os.getpid())]
    lone = process.start_child([sys.executable, "-c", script], stdout=-1, text=True, dies_with_parent=False,
                               env={**os.environ, process.PARENT_ENV: "1"})
    out, _ = lone.communicate(timeout=DEADLINE)
    assert out.split() == [str(lone.pid), "None"]


def test_no_preexec_fn_in_the_package_or_its_tests():
    """Python documents preexec_fn as unsafe in a threaded parent; the package starts children by start_child,
    the tests by helpers.Child (test processes have threads too: every Child's reader, in-process buffers)."""
    offenders = []
    for path in sorted([*(ROOT / "sf_bsread_writer").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and any(k.arg == "preexec_fn" for k in node.keywords):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_a_child_of_a_test_dies_with_the_thread_that_started_it():
    """helpers.Child: a killed test run leaves no process behind (the CA repeater was one), whatever the command
    (nats-server and softIoc cannot arm it themselves as the package's commands do)."""
    import threading

    started = []
    waits = "import threading; threading.Event().wait()"
    starter = threading.Thread(target=lambda: started.append(Child([sys.executable, "-c", waits])))
    starter.start()
    starter.join(DEADLINE)
    child = started[0]
    try:
        assert child.process.wait(timeout=DEADLINE) == -signal.SIGTERM
    finally:
        child.stop()


def test_every_child_of_the_package_is_started_by_start_child():
    """subprocess.Popen appears once in the package: in process.start_child."""
    users = []
    for path in sorted((ROOT / "sf_bsread_writer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Popen":
                users.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert [user.split(":")[0] for user in users] == ["sf_bsread_writer/process.py"]


# ------------------------------------------------------------------ the restart policy (pure, a fake clock)
def test_restart_backoff_doubles_from_1_s_to_30_s_for_a_child_that_keeps_dying():
    from sf_bsread_writer.buffer.restart import RestartPolicy

    clock = FakeClock()
    policy = RestartPolicy()
    delays = []
    for _ in range(8):
        policy.started(clock())
        clock.advance(0.5)  # dies at once
        due = policy.next_start(clock(), 1)
        delays.append(due - clock())
        clock.now = due
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]


def test_a_child_that_ran_long_enough_restarts_after_1_s_again():
    from sf_bsread_writer.buffer.restart import RestartPolicy

    clock = FakeClock()
    policy = RestartPolicy()
    for _ in range(5):  # backoff grown to 32 -> 30
        policy.started(clock())
        clock.now = policy.next_start(clock(), -9)
    policy.started(clock())
    clock.advance(policy.stable_after + 1)  # served a while, then died
    assert policy.next_start(clock(), -9) == clock() + 1


def test_a_configuration_error_is_never_restarted():
    from sf_bsread_writer.buffer.restart import RestartPolicy

    policy = RestartPolicy()
    policy.started(1000.0)
    assert policy.next_start(1000.5, process.ExitCode.CONFIGURATION) is None
    assert policy.next_start(1000.5, process.ExitCode.OK) == 1001.5  # an unasked exit is a fault too
    assert RestartPolicy().permanent == {process.ExitCode.CONFIGURATION}
