"""parallel.run_main: a script's exit status, messages, atexit callbacks and threads survive the
os._exit that skips the interpreter's teardown while gloo worker threads are alive (parallel.py)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A script whose gloo group outlives destroy_process_group (a global list holds it, as DTensor's
# caches do after FSDP). `Teardown.__del__` runs only in the interpreter's teardown.
SCRIPT = """
import atexit, os, sys, threading, time
import torch, torch.distributed as dist
import parallel

class Teardown:
    def __del__(self, write=os.write):  # unbuffered: stdout may be closed by then
        write(1, b"teardown ran\\n")

marker, held = Teardown(), []

def main(how):
    if how != "no-group":
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        dist.all_reduce(torch.ones(3))
        if how != "freed":
            held.append(dist.group.WORLD)
        dist.destroy_process_group()
    print("workers alive:", parallel.gloo_workers_alive())
    atexit.register(print, "atexit ran")
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished"))).start()
    print("buffered line")
    if how == "message":
        sys.exit("config error: training.lr must be positive")
    if how == "status":
        sys.exit(3)

parallel.run_main(lambda: main(sys.argv[1]))
"""


def run_script(tmp_path, how):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe stays buffered
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(path), how], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("how, code", [("returns", 0), ("message", 1), ("status", 3)])
def test_gloo_alive_exit_keeps_status_messages_callbacks_and_threads(tmp_path, how, code):
    proc = run_script(tmp_path, how)
    assert proc.returncode == code, proc.stderr
    out = proc.stdout
    assert "workers alive: True" in out
    assert "buffered line" in out and "thread finished" in out and "atexit ran" in out
    assert out.index("thread finished") < out.index("atexit ran")  # the order of a normal exit
    assert "teardown ran" not in out  # os._exit: the teardown, where gloo aborts, is skipped
    assert ("config error: training.lr must be positive" in proc.stderr) == (how == "message")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("how", ["no-group", "freed"])
def test_without_gloo_workers_the_exit_is_python_own(tmp_path, how):
    """No group, or one that destroy_process_group freed (its threads joined): a normal exit."""
    proc = run_script(tmp_path, how)
    assert proc.returncode == 0, proc.stderr
    assert "workers alive: False" in proc.stdout
    assert "teardown ran" in proc.stdout and "atexit ran" in proc.stdout
