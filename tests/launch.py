"""torchrun for tests: N local processes (gloo on CPU) of a script, one thread each.

A failed or timed-out launch raises with the command and the tail of its output (the processes'
tracebacks), so that a CI failure says why. A launch whose output shows a socket failure of the local
rendezvous or of gloo (an infrastructure flake, not a result) is run once more, after the folders
in `fresh` are removed; a second failure raises.
"""
import os
import shutil
import subprocess
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOCKET_FAILURES = ("Address already in use", "Connection reset by peer", "Connection closed by peer",
                   "Connection refused", "RendezvousConnectionError", "Socket Timeout")
TAIL_LINES = 60


def torchrun(*args, nproc=2, env=None, timeout=600, fresh=()):
    """Run `python -m torch.distributed.run --standalone --nproc_per_node nproc *args` in the repo
    root; returns the CompletedProcess (text output). `env` adds to os.environ."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for attempt in (1, 2):
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired as err:
            output = _tail(err.stdout, err.stderr)
            raise AssertionError(f"torchrun ran past {timeout} s: {' '.join(cmd)}\n{output}") from None
        if proc.returncode == 0:
            return proc
        output = proc.stdout + proc.stderr
        flake = next((s for s in SOCKET_FAILURES if s in output), None)
        if attempt == 1 and flake:
            warnings.warn(f"torchrun hit {flake!r}; launching once more: {' '.join(cmd)}")
            for folder in fresh:
                shutil.rmtree(folder, ignore_errors=True)
            continue
        raise AssertionError(f"torchrun exited with {proc.returncode}: {' '.join(cmd)}\n{_tail(output)}")


def _tail(*outputs):
    """The last TAIL_LINES lines of the joined outputs (str, bytes or None)."""
    text = "".join(o.decode(errors="replace") if isinstance(o, bytes) else o or "" for o in outputs)
    return "\n".join(text.splitlines()[-TAIL_LINES:])
