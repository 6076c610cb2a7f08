"""The tests' torchrun helper: a failure or a timeout shows the processes' output; a socket flake
runs once more."""
import os

import pytest

from launch import torchrun

FAIL_ONCE = """import os, sys
marker = sys.argv[1] + ".rank" + os.environ["RANK"]
if not os.path.exists(marker):
    open(marker, "w").close()
    sys.exit("gloo: Connection reset by peer" if sys.argv[2] == "flake" else "ValueError: a real bug")
print("second launch ran")
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "fail_once.py"
    path.write_text(FAIL_ONCE)
    return path


def test_a_socket_flake_is_launched_once_more_after_its_folders_are_cleared(script, tmp_path):
    scratch = tmp_path / "out"
    scratch.mkdir()
    with pytest.warns(UserWarning, match="Connection reset by peer"):
        proc = torchrun(script, tmp_path / "marker", "flake", fresh=[scratch])
    assert proc.stdout.count("second launch ran") == 2 and not scratch.exists()


def test_a_real_failure_raises_with_the_processes_output(script, tmp_path):
    with pytest.raises(AssertionError, match="a real bug") as failure:
        torchrun(script, tmp_path / "marker", "bug")
    assert "torchrun exited with 1" in str(failure.value)
    assert os.path.exists(tmp_path / "marker.rank0")


def test_a_launch_past_its_timeout_raises_with_the_output_so_far(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import time\nprint('rank started', flush=True)\ntime.sleep(60)\n")
    with pytest.raises(AssertionError, match="ran past 20 s") as failure:
        torchrun(script, timeout=20)
    assert "rank started" in str(failure.value)
