"""The benchmarks' own arithmetic and plumbing: jvp_step's guidance row count against the rows the
network really receives, throughput.py timing train.train_step, its loader row, and the CPU path
of benchmarks/gpu_report.sh. No speed is asserted."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import config
import model as model_lib
import pmf
import train
from conftest import TINY, batch, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import jvp_step  # noqa: E402
import throughput  # noqa: E402


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("mode", pmf.DROPOUT_MODES)
@pytest.mark.parametrize("jvp", pmf.JVP_PATHS)
def test_guidance_rows_counted_are_the_rows_the_network_gets(mode, jvp):
    """flops_per_sample's guidance rows (v_c + v_u query rows) against the batch of pmf_loss's one
    heads="v" call, recorded by a forward pre-hook, over 20 steps of fresh draws (B = 16)."""
    cfg = pmf.PMFConfig.for_preset("pMF-B/16", num_classes=TINY["num_classes"], class_dropout_mode=mode, jvp=jvp)
    net = tiny_model(dtype=torch.float32)
    x, y = batch(16, dtype=torch.float32)
    seen = []
    net.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0].shape[0]) if kw.get("heads") == "v" else None,
                                  with_kwargs=True)
    counted, fast_saves = [], 0
    for step in range(20):
        d = pmf.step_draws(cfg, range(16), 16, x.shape[1:], 0, step, "cpu")
        seen.clear()
        pmf.pmf_loss(net, x, y, d, cfg)
        fast = pmf.fast_path_rows(d.t, d.r, d.t_min, d.t_max, d.drop) if jvp == "fast" else (None, None)
        counted.append(jvp_step.guidance_rows_per_sample(cfg, d, fast) * 16)
        assert counted[-1] == sum(seen), (step, seen)
        fast_saves += jvp_step.guidance_rows_per_sample(cfg, d, (None, None)) * 16 - counted[-1]
    print(f"{jvp} {mode}: guidance rows per step {min(counted):g}-{max(counted):g} of 16; fast path saves "
          f"{fast_saves / 20:g} rows per step")
    assert (fast_saves > 0) == (jvp == "fast")  # the fast path's v_c reuse shows in the count


def test_pmf_query_variant_queries_v_c_on_the_reused_rows():
    """jvp_step's pmf_query (the step before the v_c reuse) sends the v-head exactly the kept r = t
    rows more than pmf does, and puts pmf.reused_v_c_rows back."""
    cfg = pmf.PMFConfig.for_preset("pMF-B/16", num_classes=TINY["num_classes"])
    net = tiny_model(dtype=torch.float32)
    x, y = batch(16, dtype=torch.float32)
    d = pmf.step_draws(cfg, range(16), 16, x.shape[1:], 0, 0, "cpu")
    reused = pmf.reused_v_c_rows(d.t, d.r, d.t_min, d.t_max, d.drop).sum().item()
    seen, real = [], pmf.reused_v_c_rows
    net.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0].shape[0]) if kw.get("heads") == "v" else None,
                                  with_kwargs=True)
    rows = {}
    for variant in ("pmf", "pmf_query"):
        seen.clear()
        jvp_step.step_fn(variant, net, cfg, x, y, d, "no")()
        rows[variant] = sum(seen)
    assert reused > 0 and rows["pmf_query"] - rows["pmf"] == reused and pmf.reused_v_c_rows is real


def test_throughput_times_train_step_and_counts_its_flops(monkeypatch):
    calls = []
    real = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a: calls.append(a[3]) or real(*a))
    cfg = config.load_config(None, throughput.TINY)
    r = throughput.time_steps(cfg, 4, 2, 3, torch.device("cpu"))
    assert calls == [0, 1, 2, 3, 4] and r["s_per_step"] > 0 and r["peak_bytes"] > 0
    method = config.method_config(cfg)
    with torch.device("meta"):
        net = model_lib.build_model(cfg.model.name, **config.model_overrides(cfg))
    flops = [jvp_step.flops_per_sample(net, method, pmf.step_draws(method, range(4), 4, (3, 16, 16), 0, s, "cpu"))["pmf"]
             for s in (2, 3, 4)]
    assert r["flops_per_step"] == pytest.approx(4 * sum(flops) / 3, rel=1e-12)


def test_throughput_loader_row_reads_a_synthetic_parquet(tmp_path):
    pytest.importorskip("datasets")
    cfg = config.load_config(None, throughput.TINY)
    throughput.synthetic_parquet(str(tmp_path), 12)
    assert throughput.loader_rate(cfg, 4, 0, 2, str(tmp_path), torch.device("cpu")) > 0
    assert cfg.data.source == "parquet"


def test_throughput_refuses_a_bad_precision_in_one_line():
    out = subprocess.run([sys.executable, "benchmarks/throughput.py", "--precision", "fp64"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].endswith(
        "'fp64': --precision takes fp32, bf16, fp16 and --compile off, on")


def test_gpu_report_cpu_path_writes_the_table(tmp_path):
    """bash benchmarks/gpu_report.sh --tiny: the search, the four step rows (bf16 / fp16, compile
    off / on with aot_eager) and the loader row, on CPU. Rows past its 50 s budget are marked, not
    run (a loaded machine); the seconds are printed, not asserted."""
    out = tmp_path / "report.md"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "GPU_REPORT_WHEELS": str(tmp_path)}
    start = time.perf_counter()
    run = subprocess.Popen(["bash", "benchmarks/gpu_report.sh", "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:  # its 50 s budget decides which rows start; the limit is for a starved machine
        _, stderr = run.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)  # the script's own process group: bash, timeout and python
        run.communicate()
        raise
    seconds = time.perf_counter() - start
    assert run.returncode == 0, stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| tiny |")]
    print(f"gpu_report.sh --tiny: {seconds:.0f} s; rows:\n" + "\n".join(rows))
    assert [row.split(" | ")[2:4] for row in rows] == [["bf16", "off"], ["fp16", "off"], ["bf16", "on"], ["fp16", "on"]]
    assert _is_number(rows[0].split(" | ")[4])  # the first row always runs; later ones may meet the budget
    assert "| data loader: parquet" in out.read_text()


def test_throughput_rows_cross_override_sets_with_batches_and_compare_img_per_s():
    args = throughput.parse_args(["--batch", "4,8", "--rows", "model.depth=2 model.head_depth=1;", "optim.lr=0.1"])
    assert args.batches == [4, 8] and args.batch == 4 and args.rows == [["model.depth=2", "model.head_depth=1"], []]
    assert throughput._overrides(args, "fp32", "off", args.rows[0])[-4:] == [
        "model.depth=2", "model.head_depth=1", "training.mixed_precision=no", "training.compile=false"]
    timing = {"peak_bytes": 2 ** 30, "flops_per_step": 1e12}
    rows = [(args.rows[0], 4, "fp32", "off", {"s_per_step": 1.0, **timing}),
            ([], 8, "fp32", "off", {"s_per_step": 1.0, **timing}), ([], 4, "fp32", "off", {"error": "failed: x"})]
    lines = throughput.table(rows, None, 4)
    assert lines[2].startswith("| train_step model.depth=2 model.head_depth=1 | 4 | fp32 | off | 1 | 4 | 1.00 |")
    assert lines[3].startswith("| train_step | 8 | fp32 | off | 1 | 8 | 2.00 |")  # twice the images per second
    assert lines[4] == "| train_step | 4 | fp32 | off | failed: x | | | | |"


def test_throughput_refuses_a_bad_batch_list_in_one_line():
    out = subprocess.run([sys.executable, "benchmarks/throughput.py", "--batch", "64,x"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].endswith(
        "--batch '64,x': give comma-separated integers, e.g. 64,128")
