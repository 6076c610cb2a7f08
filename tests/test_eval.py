"""eval.py: sharded resumable sampling, run folders that cannot mix settings, checks before sampling,
reference statistics from a chosen split, the grid and the npz."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import metrics
import train
from launch import torchrun
from test_metrics import _inception_script, needs_inception
from test_model import _official_state_dict
from test_train import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints after 2 and 4 steps of one tiny run (16 x 16 RGB, 10 classes, EMAs 0.01 and 0.05 kimg)."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    train.train(__import__("config").load_config(None, tiny(run_dir)))
    return {step: str(run_dir / f"ckpt-{step:08d}.pt") for step in (2, 4)}


def test_uint8_conversion_rounds():
    x = torch.tensor([-1.0, 1.0, 2 * 127.6 / 255 - 1, 2 * 127.4 / 255 - 1]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert ev.to_uint8(x)[0, 0, :, 0].tolist() == [0, 255, 128, 127]


def _pngs(directory):
    return {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory)) if f.endswith(".png")
            and f != "grid.png"}


def test_the_default_ema_is_the_checkpoints_sampling_ema(tmp_path, ckpts):
    state = torch.load(ckpts[2], map_location="cpu", weights_only=True)
    assert state["config"]["sampling"]["ema"] == -1 and ev.load_generator(ckpts[2])[2] == "ema 0.05 kimg"
    state["config"]["sampling"]["ema"] = 0  # a run whose sample grids show its first EMA
    torch.save(state, tmp_path / "first-ema.pt")
    assert ev.load_generator(str(tmp_path / "first-ema.pt"))[2] == "ema 0.01 kimg"
    assert ev.load_generator(str(tmp_path / "first-ema.pt"), ema="-1")[2] == "ema 0.05 kimg"


def test_sampling_is_identical_across_processes_and_resumes(tmp_path, ckpts):
    ckpt = ckpts[2]
    common = ["--ckpt", ckpt, "--num-samples", "12", "--no-metrics", "--omega", "2", "--t-min", "0", "--t-max", "1"]
    ev.main(common + ["--batch-size", "5", "--out-dir", str(tmp_path / "one"), "--npz"])
    torchrun("eval.py", *common, "--batch-size", "3", "--out-dir", tmp_path / "two", fresh=[tmp_path / "two"])
    [one_dir] = [os.path.join(tmp_path / "one", d) for d in os.listdir(tmp_path / "one")]
    [two_dir] = [os.path.join(tmp_path / "two", d) for d in os.listdir(tmp_path / "two")]
    one, two = _pngs(one_dir), _pngs(two_dir)
    assert len(one) == 12 and one == two
    result = json.load(open(os.path.join(one_dir, "result.json")))
    assert result["num_samples"] == 12 and result["weights"] == "ema 0.05 kimg" and result["checkpoint_sha256"]
    arr = np.load(os.path.join(one_dir, "samples_12.npz"))["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (12, 16, 16, 3)
    labels = np.load(os.path.join(one_dir, "samples_12.npz"))["arr_1"]
    assert labels.tolist() == ev.class_labels(range(12), 12, 10).tolist()
    assert os.path.isfile(os.path.join(one_dir, "grid.png"))
    for name in list(one)[3:7]:  # an interrupted run: some files never written
        os.remove(os.path.join(one_dir, name))
    kept = os.path.getmtime(os.path.join(one_dir, list(one)[0]))
    ev.main(common + ["--batch-size", "4", "--out-dir", str(tmp_path / "one")])
    assert _pngs(one_dir) == one and os.path.getmtime(os.path.join(one_dir, list(one)[0])) == kept
    labels = ev.class_labels(range(12), 12, 10)
    assert labels.tolist() == [0, 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9]
    assert ev.class_labels(range(50000), 50000, 1000).bincount().tolist() == [50] * 1000


def test_authors_release_layout_samples_and_a_wrong_preset_names_the_tensor(tmp_path):
    shape = dict(input_size=256, patch_size=16, in_channels=3, num_classes=1000, depth=16, hidden_size=768,
                 num_heads=12, head_depth=8)
    state, _ = _official_state_dict(shape)
    torch.save({k: v * 0.1 for k, v in state.items()}, tmp_path / "pMF-B-16.pt")
    net, method, which, sampling = ev.load_generator(str(tmp_path / "pMF-B-16.pt"), model_name="pMF-B/16")
    assert which == "release file" and method.noise_scale == 1.0 and not net.has_v_head
    assert sampling == ev.RECOMMENDED["pMF-B/16"]
    ev.generate(net, method, str(tmp_path / "out"), ev.missing_indices(str(tmp_path / "out"), 2), 2, 2,
                *ev.RECOMMENDED["pMF-B/16"], 1, 42)
    assert len(_pngs(tmp_path / "out")) == 2
    with pytest.raises(ev.EvalError, match="patch_embed.conv2.weight.*shape"):
        ev.load_generator(str(tmp_path / "pMF-B-16.pt"), model_name="pMF-L/16")
    with pytest.raises(ev.EvalError, match="pass --model"):
        ev.load_generator(str(tmp_path / "pMF-B-16.pt"))


def test_sweep_runs_every_setting_then_the_full_run(tmp_path, capsys, ckpts):
    ckpt = ckpts[2]
    ev.main(["--ckpt", ckpt, "--no-metrics", "--sweep-omega", "1.5,3", "--sweep-interval", "0-1,0.2-0.8",
             "--sweep-samples", "4", "--num-samples", "6", "--then-full", "--out-dir", str(tmp_path / "sweep")])
    runs = sorted(os.listdir(tmp_path / "sweep"))
    assert len(runs) == 5 and sum(r.endswith("-n4") for r in runs) == 4 and sum(r.endswith("-n6") for r in runs) == 1
    table = capsys.readouterr().out
    assert table.count("ema 0.05 kimg") == 5


def _fails(argv, capsys):
    """eval.main(argv) must stop with a user error: exit status != 0, no traceback; returns its message."""
    with pytest.raises(SystemExit) as stop:
        ev.main(argv)
    err = capsys.readouterr().err
    code = stop.value.code
    assert code not in (0, None)
    message = code if isinstance(code, str) else err
    assert "Traceback" not in err + message
    return message


def _run_dirs(base):
    return sorted(os.path.join(base, d) for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))


def test_run_folders_keep_checkpoints_and_settings_apart(ckpts):
    common = ["--num-samples", "4", "--no-metrics", "--omega", "2", "--t-min", "0", "--t-max", "1"]
    for ckpt in (ckpts[2], ckpts[4]):  # default out dir: both runs under <ckpt dir>/eval
        ev.main(["--ckpt", ckpt, *common])
    base = os.path.join(os.path.dirname(ckpts[2]), "eval")
    first, second = _run_dirs(base)
    assert os.path.basename(first).startswith("ckpt-00000002-")
    assert os.path.basename(second).startswith("ckpt-00000004-")
    for step, run in ((2, first), (4, second)):
        manifest = json.load(open(os.path.join(run, ev.MANIFEST)))
        assert manifest["checkpoint_sha256"] == metrics.sha256(ckpts[step])
        result = json.load(open(os.path.join(run, "result.json")))
        assert result["checkpoint"] == ckpts[step] and result["checkpoint_sha256"] == manifest["checkpoint_sha256"]
    assert _pngs(first) != _pngs(second)
    # every other input of the images gets its own folder too
    for extra in (["--seed", "1"], ["--noise-scale", "2"], ["--ema", "raw"], ["--steps", "2"], ["--omega", "3"]):
        ev.main(["--ckpt", ckpts[4], *common, *extra])
    runs = _run_dirs(base)
    assert len(runs) == 7
    manifests = [json.load(open(os.path.join(run, ev.MANIFEST))) for run in runs]
    assert {(m["seed"], m["noise_scale"], m["weights"], m["steps"], m["omega"]) for m in manifests[1:]} == {
        (42, 1.0, "ema 0.05 kimg", 1, 2.0), (1, 1.0, "ema 0.05 kimg", 1, 2.0), (42, 2.0, "ema 0.05 kimg", 1, 2.0),
        (42, 1.0, "raw", 1, 2.0), (42, 1.0, "ema 0.05 kimg", 2, 2.0), (42, 1.0, "ema 0.05 kimg", 1, 3.0)}
    assert all(m["prediction"] == "x" and m["num_samples"] == 4 and m["t_max"] == 1 for m in manifests)


def test_resuming_into_a_folder_of_another_setting_is_refused(tmp_path, ckpts, capsys):
    args = ["--ckpt", ckpts[2], "--num-samples", "3", "--no-metrics", "--out-dir", str(tmp_path)]
    ev.main(args + ["--seed", "1"])
    ev.main(args + ["--seed", "2"])
    seed1, seed2 = sorted(_run_dirs(tmp_path), key=lambda d: json.load(open(os.path.join(d, ev.MANIFEST)))["seed"])
    shutil.rmtree(seed2)
    os.rename(seed1, seed2)  # the folder of seed 2 now holds seed 1's images
    message = _fails(args + ["--seed", "2"], capsys)
    assert "holds samples of another setting" in message and "seed 1 there, 2 now" in message
    os.remove(os.path.join(seed2, ev.MANIFEST))
    message = _fails(args + ["--seed", "2"], capsys)
    assert "holds PNGs but no manifest.json" in message
    assert len(_pngs(seed2)) == 3  # refused, nothing lost


def test_then_full_runs_the_sweeps_code_path_with_the_noise_scale(tmp_path, ckpts):
    common = ["--ckpt", ckpts[2], "--no-metrics", "--noise-scale", "2", "--omega", "2"]
    ev.main(common + ["--sweep-interval", "0-1,0.2-0.8", "--sweep-samples", "2", "--num-samples", "3", "--then-full",
                      "--out-dir", str(tmp_path / "sweep")])
    [full] = [d for d in _run_dirs(tmp_path / "sweep") if d.endswith("-n3")]
    assert json.load(open(os.path.join(full, ev.MANIFEST)))["noise_scale"] == 2.0
    # without FID the first setting is the best: the same run on its own gives the same images
    ev.main(common + ["--t-min", "0", "--t-max", "1", "--num-samples", "3", "--out-dir", str(tmp_path / "direct")])
    [direct] = _run_dirs(tmp_path / "direct")
    assert os.path.basename(direct) == os.path.basename(full) and _pngs(direct) == _pngs(full)
    ev.main(common[:3] + ["--omega", "2", "--t-min", "0", "--t-max", "1", "--num-samples", "3",
                          "--out-dir", str(tmp_path / "scale1")])
    [scale1] = _run_dirs(tmp_path / "scale1")
    assert _pngs(scale1) != _pngs(full)


def _write_truncated(src, dst):
    data = open(src, "rb").read()
    open(dst, "wb").write(data[:len(data) // 2])
    return str(dst)


BAD_ARGUMENTS = {
    "steps": (["--steps", "0"], "--steps: must be >= 1, got 0"),
    "batch": (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    "samples": (["--num-samples", "-3"], "--num-samples: must be >= 1, got -3"),
    "samples_text": (["--sweep-samples", "1e4"], "--sweep-samples: expected an integer, got '1e4'"),
    "ema": (["--ema", "7"], "has 2 EMAs (half-lives 0.01, 0.05 kimg): EMA index 7 does not exist"),
    "sweep_ema": (["--sweep-ema", "0,raw,2"], "EMA index 2 does not exist"),
    "ema_text": (["--ema", "best"], "--ema 'best' is neither an EMA index nor 'raw'"),
    "ref_dim": (["--ref-stats", "{small}"], "mu (64,) and sigma (64, 64); FID needs Inception pool3 statistics"),
    "ref_npz": (["--ref-stats", "{npy}"], "are not an .npz file"),
    "inception": (["--ref-stats", "{good}", "--inception-weights", "{garbage}"], "are truncated or not a torch file"),
    "truncated": (["--ckpt", "{truncated}"], "is truncated or not a torch file"),
    "grid": (["--grid-classes", "3,10"], "--grid-classes 10 is not a class of this model (0..9)"),
    "interval": (["--sweep-interval", "0.8-0.2"], "CFG interval [0.8, 0.2] needs 0 <= t_min <= t_max <= 1"),
    "split": (["--ref-split", "test"], "--ref-split and --ref-limit apply to --ref-from-config"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_fail_before_any_sampling(case, tmp_path, ckpts, capsys):
    dim = metrics.FEATURE_DIM
    files = {"small": tmp_path / "small.npz", "npy": tmp_path / "stats.npy", "good": tmp_path / "good.npz",
             "garbage": tmp_path / "inception.pth", "truncated": tmp_path / "ckpt-00000002.pt"}
    np.savez(files["small"], mu=np.zeros(64), sigma=np.eye(64))
    np.save(files["npy"], np.zeros(dim))
    np.savez(files["good"], mu=np.zeros(dim), sigma=np.eye(dim))
    files["garbage"].write_bytes(b"\x00" * 4096)
    _write_truncated(ckpts[2], files["truncated"])
    extra, expected = BAD_ARGUMENTS[case]
    extra = [arg.format(**files) for arg in extra]
    metric_args = [] if "--ref-stats" in extra else ["--no-metrics"]
    argv = ["--ckpt", ckpts[2], "--num-samples", "2", "--out-dir", str(tmp_path / "out"), *metric_args, *extra]
    assert expected in _fails(argv, capsys)
    assert not os.path.exists(tmp_path / "out") or not any(
        f.endswith(".png") for _, _, names in os.walk(tmp_path / "out") for f in names)


def test_a_user_error_is_one_line_without_traceback(tmp_path, ckpts):
    truncated = _write_truncated(ckpts[2], tmp_path / "ckpt.pt")
    done = subprocess.run([sys.executable, "eval.py", "--ckpt", truncated, "--no-metrics"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"eval error: checkpoint {truncated} is truncated or not a torch "
                                                "file (RuntimeError: PytorchStreamReader failed reading zip archive: "
                                                "failed finding central directory)"]  # torch's first sentence


def test_grid_shows_every_class_or_the_chosen_ones_with_progress(tmp_path, ckpts, capsys):
    common = ["--ckpt", ckpts[2], "--num-samples", "20", "--no-metrics", "--out-dir", str(tmp_path)]
    ev.main(common)
    assert "sampling: 100%" in capsys.readouterr().err
    [run] = _run_dirs(tmp_path)
    assert Image.open(os.path.join(run, "grid.png")).size == (40 + 8 * 16, 10 * 16)  # 10 classes, 2 samples each
    ev.main(common + ["--grid-classes", "7,2"])  # resumes the run, redraws the grid
    grid = np.array(Image.open(os.path.join(run, "grid.png")))
    assert grid.shape == (2 * 16, 40 + 8 * 16, 3)
    sample = lambda i: np.array(Image.open(ev.png_path(run, i)).convert("RGB"))
    for row, indices in enumerate([(14, 15), (4, 5)]):  # index i of 20 has class i * 10 // 20
        for col, i in enumerate(indices):
            assert np.array_equal(grid[row * 16:(row + 1) * 16, 40 + col * 16:40 + (col + 1) * 16], sample(i))
        assert (grid[row * 16:(row + 1) * 16, 40 + 2 * 16:] == 255).all()  # no third sample of the class


def test_grid_of_many_classes_uses_thumbnails(tmp_path):
    images = np.zeros((600, 64, 64, 3), np.uint8)
    images[:, :32] = 255
    ev.save_grid(str(tmp_path / "grid.png"), images, torch.arange(600))
    grid = np.array(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (600 * 32, 40 + 8 * 32, 3)  # 16384 px / 600 rows < 32: 32 px thumbnails
    assert (grid[:16, 40:72] == 255).all() and (grid[16:32, 40:72] == 0).all()


def test_help_shows_the_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as stop:
        ev.parse_args(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for text in ("per process (default: 64)", "(default: 50000)", "one per setting (default: <ckpt dir>/eval)",
                 "(default: the config's data.split)", "--grid-classes", "N of each sweep setting (default: 10000)"):
        assert text in out, text


def _pixels(images):
    """A stand-in feature extractor: every 50th pixel value of uint8 (N, H, W, 3)."""
    return images.reshape(len(images), -1)[:, ::50].astype(np.float64), None


def test_reference_statistics_come_from_the_chosen_split(tmp_path, capsys):
    import dataset
    config = os.path.join(ROOT, "quickstart.yaml")  # data.source=mnist, split train
    path = ev.reference_from_data(config, str(tmp_path), _pixels, limit=5, split="test")
    assert os.path.basename(path) == "ref_stats-quickstart-test-5.npz"
    assert "5 of 10000 images of the 'test' split (data.source=mnist" in capsys.readouterr().out
    raw = np.repeat(dataset.MnistImages("test").pixels[:5].numpy()[..., None], 3, -1)  # the CSV's own bytes
    expected_mu, expected_sigma = metrics.feature_stats(_pixels(raw)[0])
    with np.load(path) as ref:
        assert np.array_equal(ref["mu"], expected_mu) and np.array_equal(ref["sigma"], expected_sigma)
        assert ref["num_images"] == 5 and str(ref["split"]) == "test"
    with pytest.raises(ev.EvalError, match="MNIST has the splits train and test"):
        ev.reference_from_data(config, str(tmp_path), _pixels, split="val")


def test_reference_split_of_parquet_is_the_file_prefix(tmp_path):
    from test_dataset import write_parquet_imagenet
    write_parquet_imagenet(tmp_path / "data", n=6, shards=1, corrupt=())
    config = tmp_path / "parquet.yaml"
    config.write_text("model: {input_size: 16, in_channels: 3, num_classes: 3, depth: 1, hidden_size: 32, "
                      "num_heads: 2, patch_size: 4, head_depth: 1}\n"
                      f"data: {{source: parquet, path: {tmp_path / 'data'}}}\n")
    with pytest.raises(ev.EvalError, match="split 'val'.*no 'val-\\*.parquet' files"):
        ev.reference_from_data(str(config), str(tmp_path), _pixels, split="val")
    os.rename(tmp_path / "data" / "train-00000-of-00001.parquet", tmp_path / "data" / "val-00000-of-00001.parquet")
    path = ev.reference_from_data(str(config), str(tmp_path), _pixels, split="val")
    assert int(np.load(path)["num_images"]) == 6


@needs_inception
@pytest.mark.slow
def test_fid_end_to_end_against_the_mnist_test_split(tmp_path, ckpts):
    ev.main(["--ckpt", ckpts[2], "--num-samples", "4", "--ref-from-config", os.path.join(ROOT, "quickstart.yaml"),
             "--ref-split", "test", "--ref-limit", "4", "--inception-weights", "fid-helper",
             "--out-dir", str(tmp_path / "eval")])
    [run] = _run_dirs(tmp_path / "eval")
    result = json.load(open(os.path.join(run, "result.json")))
    assert result["reference"].endswith("ref_stats-quickstart-test-4.npz") and np.isfinite(result["fid"])
    assert result["inception_weights_sha256"] == metrics.sha256(_inception_script())
