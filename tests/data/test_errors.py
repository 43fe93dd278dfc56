"""What a user meets with a broken or missing data file: a ValueError (FileNotFoundError when missing)
naming the file, the line where there is one, what is wrong and what would be valid; never a raw
traceback from json, codecs, gzip, numpy or PIL."""

import gzip
import json
import re

import numpy as np
import pytest
from PIL import Image

from saex.data import UnreadableExample, open_dataset
from saex.data.wiki import WikiSummaries


def _idx(shape, n_bytes=None):
    header = bytes([0, 0, 8, len(shape)]) + b"".join(int(s).to_bytes(4, "big") for s in shape)
    return header + bytes(int(np.prod(shape)) if n_bytes is None else n_bytes)


def test_broken_jsonl_record_names_the_file_and_its_real_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "b", oops}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 3: invalid JSON at column 15 .*must be one JSON object"):
        open_dataset(str(path))


@pytest.mark.parametrize("record, what", [("[1, 2]", "an array"), ("3", "a number"), ('{"text": null}', "null")])
def test_jsonl_record_that_is_not_an_object_with_text(tmp_path, record, what):
    path = tmp_path / "a.jsonl"
    path.write_text(f'{{"text": "fine"}}\n{record}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 2: .*is {what}"):
        open_dataset(str(path))


def test_jsonl_record_without_the_text_field(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 1: the record has no field 'text' \(fields: \['body'\]\); "
                                         "set --text-field"):
        open_dataset(str(path))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_invalid_utf8_names_the_file_line_and_byte(tmp_path, suffix):
    path = tmp_path / f"a{suffix}"
    path.write_bytes(b'{"text": "one"}\r\n{"text": "two"}\r\n{"text": "caf\xe9"}\r\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 3: byte 0xe9 at column 14 is not UTF-8 .*must be UTF-8"):
        open_dataset(str(path))


def test_windows_line_ends_and_byte_order_mark_are_read(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n\r\n{"text": "two"}\r\n')
    ds = open_dataset(str(path))
    assert [(ds[i].id, ds[i].input) for i in range(2)] == [("a.jsonl:1", "one"), ("a.jsonl:3", "two")]
    (tmp_path / "b.txt").write_bytes(b"one\r\ntwo\r\n")
    assert [open_dataset(str(tmp_path / "b.txt"))[i].input for i in range(2)] == ["one", "two"]


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl", "corpora/missing", "./missing"])
def test_a_missing_path_is_not_found_not_unknown(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"dataset {name} does not exist \(looked for {re.escape(str(tmp_path))}/"):
        open_dataset(name)


def test_a_file_of_another_format_names_the_valid_ones(tmp_path):
    (tmp_path / "a.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"a\.csv: a file named \*\.csv is not a dataset; .*a \.txt/\.jsonl file"):
        open_dataset(str(tmp_path / "a.csv"))


@pytest.mark.parametrize("data, problem", [
    (bytes([0, 0, 8, 3, 0, 0]), r"cut short: its header announces 3 dimensions \(16 bytes\) but the file has 6"),
    (_idx((5, 28, 28), 100), r"holds 100 bytes of data but its header says shape \(5, 28, 28\) \(3920 bytes\)"),
    (b"\x1f\x8b\x08\x03abcd", r"not an IDX file of unsigned bytes: its magic number is 1f8b0803, expected 000008"),
    (_idx((5, 28)), r"holds an array of shape \(5, 28\); expected one of shape \[images, height, width\]"),
], ids=["header-cut-short", "data-cut-short", "gzip-magic", "two-dimensional"])
def test_broken_idx_images_name_the_file(tmp_path, data, problem):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx((5,)))
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}/train-images-idx3-ubyte: {problem}"):
        open_dataset(str(tmp_path))


@pytest.mark.parametrize("data", [gzip.compress(_idx((5,)))[:-6], b"not gzip"], ids=["truncated", "not-gzip"])
def test_broken_gzipped_idx_labels_name_the_file(tmp_path, data):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx((5, 28, 28)))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(data)
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}/train-labels-idx1-ubyte.gz: the gzip stream is broken"):
        open_dataset(str(tmp_path))


def test_an_image_too_large_to_decode_is_unreadable_not_a_crash(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "a" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses images over twice this
    with pytest.raises(UnreadableExample, match=r"big\.png: Image size \(256 pixels\) exceeds limit"):
        open_dataset(str(tmp_path))[0]


@pytest.mark.parametrize("content, problem", [
    (b'{"A": {"extract": "x"},\n "B": {"extract": oops}}', r", line 2: invalid JSON at column 19"),
    (b'{"A": {"extract": "caf\xe9"}}', r", line 1: byte 0xe9 at column 23 is not UTF-8"),
    (b'["A", "B"]', r": it holds an array; the file must be one JSON object of title ->"),
    (b'{"A": {"extract": "x", "topic": 3}}', r": article 'A' is \{\"extract\": \"x\", \"topic\": 3\}; the file must"),
], ids=["bad-json", "bad-utf8", "an-array", "number-topic"])
def test_broken_wiki_summaries_name_the_file(tmp_path, content, problem):
    path = tmp_path / "summaries.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}{problem}"):
        WikiSummaries(path)


def test_wiki_data_path_that_is_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path))} is a folder, not a file"):
        open_dataset("wiki", path=str(tmp_path))
