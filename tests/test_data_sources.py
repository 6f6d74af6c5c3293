"""HR image sources: folder (with bad inputs), TFDS (prepared here), embedded; the grain pipeline."""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from msit_jax.data import sources
from msit_jax.data.pipeline import host_dataset
from msit_jax.data.protocol import Protocol
from msit_jax.data.sources import EmbeddedSource, FolderSource, TFDSSource, make_source
from msit_jax import errors, images
from msit_jax.images import ImageError, ImageTooLargeError
from msit_jax.training.config import source_config


def rgb(h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "hr"
    d.mkdir()
    Image.fromarray(rgb(60, 70, 1)).save(d / "a.png")
    Image.fromarray(rgb(80, 64, 2)).save(d / "b.jpg", quality=95)
    Image.fromarray(rgb(64, 64, 3)[..., 0]).save(d / "c_gray.png")              # L
    Image.fromarray(np.dstack([rgb(64, 66, 4), np.full((64, 66), 7, np.uint8)])
                    ).save(d / "d_rgba.png")                                       # RGBA
    Image.fromarray((np.arange(64 * 65).reshape(64, 65) * 15).astype(np.uint16)
                    ).save(d / "e_16bit.png")                                      # I;16
    (d / "notes.txt").write_text("not an image, and not listed (no image extension)")
    return d


def test_folder_source_reads_every_format(folder):
    src = FolderSource(str(folder))
    assert [os.path.basename(src.name(i)) for i in range(len(src))] == [
        "a.png", "b.jpg", "c_gray.png", "d_rgba.png", "e_16bit.png"]
    np.testing.assert_array_equal(src.sizes, [[60, 70], [80, 64], [64, 64], [64, 66], [64, 65]])
    for i in range(len(src)):
        img = src[i]
        assert img.dtype == np.uint8 and img.shape == (*src.sizes[i], 3)
    np.testing.assert_array_equal(src[0], rgb(60, 70, 1))
    gray = src[2]  # documented handling: grayscale replicated to RGB
    np.testing.assert_array_equal(gray[..., 0], rgb(64, 64, 3)[..., 0])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    np.testing.assert_array_equal(src[3], rgb(64, 66, 4))  # alpha dropped
    e = src[4].astype(int)  # 16-bit scaled to 8 bits
    raw = (np.arange(64 * 65).reshape(64, 65) * 15).astype(np.uint16)
    np.testing.assert_array_equal(e[..., 0], np.round(raw / 65535 * 255).astype(int))


def test_non_image_file_is_an_error_naming_it(folder):
    (folder / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(ImageError, match="broken.png"):
        FolderSource(str(folder))


def test_skip_bad_images_counts_and_logs(folder, caplog):
    (folder / "broken.png").write_bytes(b"this is not a png")
    Image.fromarray(rgb(30, 200)).save(folder / "small.png")
    with caplog.at_level(logging.WARNING, logger="msit_jax.data.sources"):
        src = FolderSource(str(folder), min_side=48, skip_bad=True)
    assert len(src) == 5 and len(src.skipped) == 2
    assert "skipped 2 of 7 images" in caplog.text
    assert "broken.png" in caplog.text and "small.png" in caplog.text


def test_skip_bad_quiet_keeps_the_errors_and_logs_nothing(folder, caplog):
    (folder / "broken.png").write_bytes(b"this is not a png")
    with caplog.at_level(logging.DEBUG, logger="msit_jax.data.sources"):
        src = FolderSource(str(folder), skip_bad=True, quiet=True)
    assert caplog.text == "" and len(src) == 5
    [err] = src.skipped_errors
    assert isinstance(err, ImageError) and "broken.png: not a readable image" in str(err)
    assert src.skipped == [str(err)]


def test_keys_and_single_channel_images(folder):
    Image.fromarray(np.dstack([rgb(20, 20, 5)[..., 0]] * 3)).save(folder / "f_rgb_gray.png")
    src = FolderSource(str(folder))
    keys = [src.key(i) for i in range(len(src))]
    assert keys == ["a.png", "b.jpg", "c_gray.png", "d_rgba.png", "e_16bit.png",
                    "f_rgb_gray.png"]
    # From the stored mode, as MATLAB reads the file: an RGB file of equal channels is RGB.
    assert [src.is_gray(i) for i in range(len(src))] == [False, False, True, False, True, False]
    emb = EmbeddedSource("val")
    assert [emb.key(i) for i in range(len(emb))] == ["astronaut", "chelsea"]
    assert not emb.is_gray(0)  # default: from the decoded channels


def test_open_image_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(ImageError, match=r"is a directory, not an image file$"):
        images.open_image(str(tmp_path))
    with pytest.raises(ImageError, match=r"nope.png: no such file$"):
        images.open_image(str(tmp_path / "nope.png"))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match=r"junk.png: not a readable image \(") as e:
        images.open_image(str(tmp_path / "junk.png"))
    assert "\n" not in str(e.value)
    Image.fromarray(rgb(30, 40)).save(tmp_path / "ok.png")
    with images.open_image(str(tmp_path / "ok.png"), max_pixels=1200) as img:
        assert img.size == (40, 30)  # header only: (W, H)
    with pytest.raises(ImageTooLargeError, match=r"ok.png: 30 x 40 = 1200 pixels is over the "
                                                 r"limit of 1199 pixels"):
        images.open_image(str(tmp_path / "ok.png"), max_pixels=1199)
    # Pillow's decompression-bomb limit (an error above twice MAX_IMAGE_PIXELS) stays.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(ImageTooLargeError, match="decompression-bomb limit"):
        images.open_image(str(tmp_path / "ok.png"))
    with pytest.raises(ImageTooLargeError):
        images.read_image(str(tmp_path / "ok.png"))
    monkeypatch.undo()
    # A truncated body passes the header and fails the decode, naming the file.
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    images.open_image(str(tmp_path / "cut.png")).close()
    with pytest.raises(ImageError, match=r"cut.png: not a readable image"):
        images.read_image(str(tmp_path / "cut.png"))


def test_image_smaller_than_the_patch_is_an_error(folder):
    Image.fromarray(rgb(30, 200)).save(folder / "small.png")
    with pytest.raises(ImageError, match=r"small.png: 30 x 200 \(H x W\) is smaller than the 48-pixel"):
        FolderSource(str(folder), min_side=48)


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        FolderSource(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        FolderSource(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="needs `path`"):
        make_source(source_config("folder"))
    with pytest.raises(ValueError, match="unknown data source kind"):
        make_source(source_config("s3"))


def test_meta_info_selects_and_orders(folder, tmp_path):
    meta = tmp_path / "meta.txt"
    meta.write_text("b.jpg (80,64,3)\na.png (60,70,3)\n\n")
    src = FolderSource(str(folder), meta_info=str(meta))
    assert [os.path.basename(f) for f in src.files] == ["b.jpg", "a.png"]
    meta.write_text("a.png (60,70,3)\nmissing.png (1,1,3)\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        FolderSource(str(folder), meta_info=str(meta))


def test_npy_cache_matches_decoding(folder, tmp_path):
    plain = FolderSource(str(folder))
    cached = FolderSource(str(folder), cache_dir=str(tmp_path / "cache"))
    for i in range(len(plain)):
        np.testing.assert_array_equal(cached[i], plain[i])  # first: writes the cache
        np.testing.assert_array_equal(cached[i], plain[i])  # then: memory-mapped
    assert len(os.listdir(tmp_path / "cache")) == len(plain)


def test_embedded_split_is_disjoint_and_picklable():
    tr, va = EmbeddedSource("train"), EmbeddedSource("val")
    assert set(tr.names).isdisjoint(va.names) and len(tr) == 5 and len(va) == 2
    for src in (tr, va):
        for i in range(len(src)):
            img = src[i]
            assert img.dtype == np.uint8 and img.shape[-1] == 3 and min(img.shape[:2]) >= 256
    clone = pickle.loads(pickle.dumps(tr))
    assert clone._cache == {}
    np.testing.assert_array_equal(clone[1], tr[1])
    with pytest.raises(ValueError, match="split"):
        EmbeddedSource("test")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tiny TFDS dataset prepared here (ArrayRecord, no TensorFlow)."""
    from msit_jax.data.tfds_builder import prepare

    root = tmp_path_factory.mktemp("tfds_src")
    for split, n in (("train", 3), ("validation", 2)):
        (root / split).mkdir()
        for i in range(n):
            Image.fromarray(rgb(50 + 3 * i, 60, 10 * i + n)).save(root / split / f"{i}.png")
    data_dir = str(tmp_path_factory.mktemp("tfds_data"))
    prepare({"train": str(root / "train"), "validation": str(root / "validation")}, data_dir)
    return data_dir


def test_tfds_source_reads_prepared_dataset(tfds_dir):
    import sys

    src = TFDSSource("msit_images", "train", data_dir=tfds_dir)
    assert len(src) == 3
    # TFDS orders records by a hash of their keys: match images by size
    assert sorted(map(tuple, src.sizes.tolist())) == [(50, 60), (53, 60), (56, 60)]
    for i in range(3):
        k = (int(src.sizes[i][0]) - 50) // 3
        np.testing.assert_array_equal(src[i], rgb(50 + 3 * k, 60, 10 * k + 3))
    assert "tensorflow" not in sys.modules
    val = make_source(source_config("tfds", name="msit_images", split="validation",
                                    data_dir=tfds_dir))
    assert len(val) == 2
    # Record names from the 'name' feature; the image feature found when not given.
    auto = TFDSSource("msit_images", "train", data_dir=tfds_dir, image_key=None)
    assert auto.image_key == "hr"
    for i in range(3):
        k = (int(src.sizes[i][0]) - 50) // 3
        assert auto.key(i) == f"{k}.png" and not auto.is_gray(i)
    with pytest.raises(FileNotFoundError, match="not prepared"):
        TFDSSource("msit_images", "train", data_dir=os.path.join(tfds_dir, "elsewhere"))
    with pytest.raises(KeyError, match="no feature 'lr'"):
        TFDSSource("msit_images", "train", data_dir=tfds_dir, image_key="lr")
    with pytest.raises(ImageError, match=r"msit_images/train\[0\].*smaller than the 52"):
        TFDSSource("msit_images", "train", data_dir=tfds_dir, min_side=52)


def test_array_to_rgb_uint8():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(sources.array_to_rgb_uint8(g, "x"), np.dstack([g, g, g]))
    with pytest.raises(ImageError, match="x: expected uint8"):
        sources.array_to_rgb_uint8(g.astype(np.float32), "x")
    with pytest.raises(ImageError, match="shape"):
        sources.array_to_rgb_uint8(np.zeros((2, 2, 2), np.uint8), "x")


def _take(ds, n):
    it = iter(ds)
    out = [next(it) for _ in range(n)]
    return it, out


def test_pipeline_deterministic_across_workers_hosts_and_restore():
    src = EmbeddedSource("train")
    p = Protocol(inp_size=16, sample_q=64, radius=1)
    kw = dict(global_batch=4, seed=3, total_steps=50)
    it, ref = _take(host_dataset(src, p, **kw), 4)
    assert [int(b["step"][0]) for b in ref] == [0, 1, 2, 3]
    assert all(b["inp"].shape == (4, 16, 16, 3) for b in ref)
    # two "hosts" each produce half of every batch
    halves = [_take(host_dataset(src, p, process_index=i, process_count=2, **kw), 4)[1]
              for i in range(2)]
    for s in range(4):
        for k in ref[s]:
            np.testing.assert_array_equal(np.concatenate([halves[0][s][k], halves[1][s][k]]),
                                          ref[s][k])
    # worker processes: same stream; iterator state resumes mid-stream
    it2, got = _take(host_dataset(src, p, num_workers=2, **kw), 2)
    for s in range(2):
        for k in ref[s]:
            np.testing.assert_array_equal(got[s][k], ref[s][k])
    state = it2.get_state()
    it2.close()
    it3 = iter(host_dataset(src, p, num_workers=2, **kw))
    it3.set_state(state)
    b = next(it3)
    it3.close()
    for k in ref[2]:
        np.testing.assert_array_equal(b[k], ref[2][k])
    # batches differ from step to step (a new scale and new crops)
    assert not np.array_equal(ref[0]["gt"], ref[1]["gt"])


# --- training sets by name (msit_jax.data.catalog) ------------------------------------

@pytest.fixture
def data_root(tmp_path):
    """A data root with tiny stand-ins for T91 (as `yang91`, the repository's name), BSD200
    and a benchmark folder."""
    root = tmp_path / "sr-data"
    for folder, names, hw in (("yang91", ("t1.bmp", "t2.bmp"), (40, 36)),
                              ("BSD200", ("100075.png", "t1.png"), (33, 48)),
                              ("Set5", ("baby.png",), (40, 40))):
        (root / folder).mkdir(parents=True)
        for j, n in enumerate(names):
            Image.fromarray(rgb(*hw, seed=j + len(folder))).save(root / folder / n)
    return root


def test_named_sets_combine_in_order_with_unique_keys(data_root):
    src = make_source(source_config("named", name="t91+BSD200", data_root=str(data_root)))
    assert len(src) == 4
    assert [src.key(i) for i in range(4)] == ["T91/t1.bmp", "T91/t2.bmp", "BSD200/100075.png",
                                             "BSD200/t1.png"]
    np.testing.assert_array_equal(src.sizes, [[40, 36]] * 2 + [[33, 48]] * 2)
    np.testing.assert_array_equal(src[2], rgb(33, 48, seed=0 + len("BSD200")))
    np.testing.assert_array_equal(src[1], rgb(40, 36, seed=1 + len("yang91")))
    assert src.name(0) == str(data_root / "yang91" / "t1.bmp")
    # '291' is the same two sets; a set named twice is read once.
    for spec in ("291", "t91+bsd200+t91", "291+bsd200"):
        again = make_source(source_config("named", name=spec, data_root=str(data_root)))
        assert [again.key(i) for i in range(len(again))] == [src.key(i) for i in range(4)]
    restored = pickle.loads(pickle.dumps(src))  # grain ships sources to workers
    np.testing.assert_array_equal(restored[3], src[3])
    with pytest.raises(IndexError):
        src[4]


def test_named_sets_resolve_under_msit_data(data_root, monkeypatch, tmp_path):
    monkeypatch.setenv("MSIT_DATA", str(data_root))
    src = sources.named_source("bsd200")
    assert isinstance(src, FolderSource) and len(src) == 2
    # data_root wins over MSIT_DATA; without either the root is ./data.
    other = tmp_path / "other"
    (other / "T91").mkdir(parents=True)
    Image.fromarray(rgb(50, 50)).save(other / "T91" / "x.png")
    assert sources.named_source("t91", data_root=str(other)).key(0) == "x.png"
    monkeypatch.delenv("MSIT_DATA")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.InputError, match=r"no folder T91 .* the default data root ./data"):
        sources.named_source("t91")


def test_named_set_errors_say_what_to_do(data_root):
    root = str(data_root)
    with pytest.raises(errors.InputError, match=r"unknown set 't92'; known: div2k, t91, bsd200, "
                                                r"291 \(see docs/training.md#training-data\)"):
        sources.named_source("t91+t92", data_root=root)
    with pytest.raises(errors.InputError, match="set5 is a benchmark set, evaluation data only"):
        sources.named_source("t91+Set5", data_root=root)
    with pytest.raises(errors.InputError, match="empty set name"):
        sources.named_source("t91+", data_root=root)
    want = os.path.join(root, "DIV2K", "DIV2K_train_HR")
    with pytest.raises(errors.InputError, match=r"no folder DIV2K/DIV2K_train_HR \(or "
                       r"DIV2K_train_HR\) under --data_root .*no prepared TFDS div2k dataset; "
                       f"put its HR images in {want}"):
        sources.named_source("div2k", data_root=root)
    with pytest.raises(ValueError, match="needs `name`"):
        make_source(source_config("named", data_root=root))


def test_div2k_folder_layouts(tmp_path):
    for rel in ("DIV2K/DIV2K_train_HR", "div2k_train_hr"):
        root = tmp_path / rel.replace("/", "_")
        (root / rel).mkdir(parents=True)
        Image.fromarray(rgb(30, 30)).save(root / rel / "0001.png")
        src = sources.named_source("div2k", data_root=str(root))
        assert src.name(0) == str(root / rel / "0001.png")


def test_benchmark_folders_are_refused_as_training_data(data_root, tmp_path):
    sources.check_not_benchmark(FolderSource(str(data_root / "BSD200")))  # bsd200 != b100
    with pytest.raises(errors.ConfigError, match=r"data.train reads .*Set5.baby.png, an image of "
                                                 r"the benchmark set Set5; benchmark sets are "
                                                 r"evaluation data, never training data"):
        sources.check_not_benchmark(FolderSource(str(data_root / "Set5")))
    # The HR/ layout, a link to a benchmark folder, and a folder that merely contains one.
    hr = tmp_path / "b" / "Urban100" / "HR"
    hr.mkdir(parents=True)
    Image.fromarray(rgb(30, 30)).save(hr / "img_001.png")
    with pytest.raises(errors.ConfigError, match="benchmark set Urban100"):
        sources.check_not_benchmark(FolderSource(str(hr)))
    (tmp_path / "mine").symlink_to(data_root / "Set5")
    with pytest.raises(errors.ConfigError, match="benchmark set Set5"):
        sources.check_not_benchmark(FolderSource(str(tmp_path / "mine")))
    assert sources.catalog.benchmark_folder(str(tmp_path / "b")) is None


def test_validation_must_not_share_training_images(data_root, tmp_path):
    train = make_source(source_config("named", name="291", data_root=str(data_root)))
    sources.check_disjoint(train, EmbeddedSource("val"))
    sources.check_disjoint(EmbeddedSource("train"), EmbeddedSource("val"))
    with pytest.raises(errors.ConfigError, match=r"eval.source shares 2 of its 2 images with "
                                                 r"data.train \(e.g. .*100075.png\)"):
        sources.check_disjoint(train, FolderSource(str(data_root / "BSD200")))
    # The same file through a link is the same image.
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "v.bmp").symlink_to(data_root / "yang91" / "t2.bmp")
    with pytest.raises(errors.ConfigError, match="shares 1 of its 1 images"):
        sources.check_disjoint(train, FolderSource(str(tmp_path / "val")))
    with pytest.raises(errors.ConfigError, match="shares 5 of its 5"):
        sources.check_disjoint(EmbeddedSource("train"), EmbeddedSource("train"))


def test_training_refuses_benchmark_and_shared_validation_data(data_root, tmp_path):
    from tests.conftest import load_config
    from msit_jax.training import train_and_evaluate

    cfg = load_config("tiny")
    cfg.data.train = source_config("named", name="291", data_root=str(data_root))
    cfg.data.inp_size = 12
    cfg.eval.every_steps = 1
    cfg.eval.source = source_config("folder", path=str(data_root / "yang91"))
    with pytest.raises(errors.ConfigError, match="shares 2 of its 2 images with data.train"):
        train_and_evaluate(cfg, str(tmp_path / "wd1"))
    cfg.data.train = source_config("folder", path=str(data_root / "Set5"))
    cfg.eval.source = source_config("embedded", split="val")
    with pytest.raises(errors.ConfigError, match="benchmark set Set5"):
        train_and_evaluate(cfg, str(tmp_path / "wd2"))
    assert not os.path.exists(tmp_path / "wd2" / "checkpoints")
