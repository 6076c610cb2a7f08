"""auto_batch.py: the search, the batch arithmetic, the config rewrite, and a real CPU budget."""
import os
import re

import pytest

import auto_batch as ab
import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_search_doubles_then_bisects():
    tried = []

    def fits_up_to_37(batch):
        tried.append(batch)
        return batch <= 37, batch * 100, 0.1

    best, rows = ab.search(fits_up_to_37, 3700, 1024)
    assert best == 37 and tried[:7] == [1, 2, 4, 8, 16, 32, 64] and tried[7:] == [48, 40, 36, 38, 37][:len(tried) - 7]
    assert ab.search(fits_up_to_37, 3700, 20)[0] == 20  # capped at max_batch
    assert ab.choose_micro(64, 64, 1) == (64, 1)  # a full batch that fits is used whole (the margin is memory)
    with pytest.raises(ab.AutoBatchError, match="even batch 1 does not fit: it needed 0.00 GB"):
        ab.search(lambda b: (False, 1000, None), 10, 64)
    tried.clear()
    assert ab.search(fits_up_to_37, 3700, 1024, start=32)[0] == 37 and tried[:2] == [32, 64]
    tried.clear()
    assert ab.search(fits_up_to_37, 3700, 1024, start=64)[0] == 37 and tried == [64, 32, 48, 40, 36, 38, 37]
    with pytest.raises(ab.AutoBatchError, match="even batch 1 does not fit"):
        ab.search(lambda b: (False, 1000, None), 10, 64, start=8)


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16])
def test_micro_times_world_times_accum_is_the_global_batch(world):
    for largest in (1, 7, 9, 50, 100, 5000):
        micro, accum = ab.choose_micro(largest, 1024, world)
        assert micro * world * accum == 1024 and micro <= max(1, largest)
        assert micro < 8 or micro % 8 == 0
    with pytest.raises(ab.AutoBatchError, match="not divisible by 3 processes"):
        ab.choose_micro(64, 1024, 3)


def test_rewrite_keeps_every_other_byte_and_validates(tmp_path):
    text = open(os.path.join(ROOT, "config.yaml")).read()
    new = ab.rewrite_config(text, 48, 3)
    old_lines, new_lines = text.splitlines(keepends=True), new.splitlines(keepends=True)
    assert len(old_lines) == len(new_lines)
    changed = [(a, b) for a, b in zip(old_lines, new_lines) if a != b]
    assert [b.split("#")[0].split() for _, b in changed] == [["micro_batch_size:", "48"], ["grad_accum_steps:", "3"]]
    assert all(a.split("#")[1] == b.split("#")[1] for a, b in changed)  # comments kept
    path = tmp_path / "config.yaml"
    path.write_text(new)
    cfg = config.load_config(str(path), ["training.global_batch_size=144"])
    assert (cfg.training.micro_batch_size, cfg.training.grad_accum_steps) == (48, 3)
    with pytest.raises(ab.AutoBatchError, match="no training.grad_accum_steps line"):
        ab.rewrite_config(re.sub(r"\n  grad_accum_steps.*", "", text), 8, 1)


TRIAL = ["model.input_size=96", "model.in_channels=3", "model.num_classes=10", "model.depth=3",
         "model.hidden_size=128", "model.num_heads=4", "model.patch_size=4", "model.head_depth=1",
         "perceptual.lpips=false", "perceptual.convnext=false", "training.global_batch_size=64",
         "training.micro_batch_size=8"]


def test_cpu_budget_chosen_batch_fits_and_the_next_does_not(tmp_path, monkeypatch):
    # glibc's dynamic mmap threshold makes a process's peak RSS vary by about half a sample's
    # activations from run to run (measured: batch 7 peaked at 900-911 MB, batch 8 at 933-941 MB);
    # a fixed threshold, inherited by the trial children, makes it reproducible to ~0.5 MB.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    args = ab.parse_args(["--config", os.path.join(ROOT, "config.yaml"), "--device", "cpu", *TRIAL])
    # the budget lies halfway between the peaks of batches 2 and 3 (~35 MB apart), far from both
    two, three = (ab.measure(b, args, float("inf"))[1] for b in (2, 3))
    assert three > two + 20 * 2 ** 20  # activations really grow with the batch
    budget = (two + three) // 2
    best, rows = ab.search(lambda b: ab.measure(b, args, budget), budget, 12)
    next_up = min(b for b, fits, _, _ in rows if not fits)
    assert (best, next_up) == (2, 3), (rows, budget)
    fits, peak, _ = ab.measure(best, args, budget)  # fresh processes
    assert fits and peak <= budget, (peak, budget, two, three)
    assert not ab.measure(next_up, args, budget)[0]
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(open(os.path.join(ROOT, "config.yaml")).read())
    with pytest.raises(SystemExit, match="even batch 1 does not fit"):
        ab.main(["--config", str(cfg_path), "--device", "cpu", "--max-memory", "10MB", *TRIAL])
    with pytest.raises(SystemExit, match="pass --max-memory"):
        ab.main(["--config", str(cfg_path), "--device", "cpu", *TRIAL])
    with pytest.raises(SystemExit, match="training.micro_batch_size must be an integer"):
        ab.main(["--config", str(cfg_path), "--device", "cpu", "training.micro_batch_size=x"])
