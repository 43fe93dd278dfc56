import gzip
import json

import numpy as np
import pytest
from PIL import Image

from saex.data import UnreadableExample, open_dataset, reopen
from saex.data.idx import read_idx


def _write_idx(path, arr, compress=True):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def test_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(tmp_path / "bad")


def test_any_idx_folder(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 9]), compress=False)
    ds = open_dataset(str(tmp_path))
    assert len(ds) == 5 and ds.modality == "image"
    ex = ds[4]
    assert (ex.index, ex.id, ex.label) == (4, "train/00004", 9)
    assert np.array_equal(np.asarray(ex.input), images[4])
    assert len(reopen(ds.describe())) == 5


def test_fashion_mnist_from_debian_package():
    train, test = open_dataset("fashion-mnist"), open_dataset("fashion-mnist", split="test")
    assert (len(train), len(test)) == (60000, 10000)
    ex = test[0]
    assert ex.input.size == (28, 28) and ex.input.mode == "L"
    assert ex.label == 9 and train.label_names[9] == "Ankle boot"  # the first test image is an ankle boot
    with pytest.raises(ValueError, match=r"split 'val' is not one of \['test', 'train'\]"):
        open_dataset("fashion-mnist", split="val")


def test_image_folder_labels_and_unreadable(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        Image.new("RGB", (8, 8), "red").save(tmp_path / label / "a.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = open_dataset(str(tmp_path))
    assert ds.label_names == ["cat", "dog"] and len(ds) == 3
    assert [(ds[i].id, ds[i].label) for i in (0, 1)] == [("cat/a.png", 0), ("dog/a.png", 1)]
    with pytest.raises(UnreadableExample, match="broken.jpg"):
        ds[2]


def test_wiki_summaries():
    ds = open_dataset("wiki")
    assert len(ds) == 10033 and len(ds.label_names) == 12 and ds.modality == "text"
    titles = [ds[i].id for i in range(len(ds))]
    assert len(set(titles)) == len(titles)  # titles are stable unique ids
    ex = ds[titles.index("2001: A Space Odyssey")]
    assert ex.input.startswith("2001: A Space Odyssey is a 1968 epic science fiction film")
    assert ds.label_names[ex.label] == "Arts"


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    txt = open_dataset(str(tmp_path / "a.txt"))
    assert [txt[i].input for i in range(len(txt))] == ["first line", "second line"]
    assert txt[1].id == "a.txt:3" and txt.label_names is None
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"body": "x", "topic": "b"}, {"body": "y", "topic": "a"}]))
    js = open_dataset(str(tmp_path / "b.jsonl"), text_field="body", label_field="topic")
    assert js.label_names == ["a", "b"] and [js[0].label, js[1].label] == [1, 0]
    with pytest.raises(ValueError, match="has no field 'text'"):
        open_dataset(str(tmp_path / "b.jsonl"))


def test_unknown_dataset_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet': use one of \['fashion-mnist', 'wiki'\]"):
        open_dataset("imagenet")


def test_hugging_face_dataset_from_a_local_folder(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the hf extra (datasets) is not installed")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"]),
                                  "image": datasets.Image()})
    images = [Image.new("RGB", (9, 7), c) for c in ("red", "green", "blue")]
    ds = datasets.Dataset.from_dict({"text": ["bad", "good", "fine"], "label": [0, 1, 1], "image": images},
                                    features=features)
    (tmp_path / "data").mkdir()
    ds.to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    text = open_dataset(f"hf:{tmp_path}", split="train", text_field="text")
    assert text.modality == "text" and len(text) == 3 and text.label_names == ["neg", "pos"]
    assert (text[1].input, text[1].label, text[1].id) == ("good", 1, "train/1")
    pictures = open_dataset(f"hf:{tmp_path}", split="train")
    assert pictures.modality == "image" and pictures[2].input.size == (9, 7)
    assert reopen(pictures.describe())[0].label == 0
