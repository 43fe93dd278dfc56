"""The harvest stage end to end: stored rows against transformers' own hidden states, resume after
SIGKILL, and the errors a user meets."""

import json
import signal
import subprocess
import sys

import numpy as np
import torch
import transformers
from PIL import Image

from saex.cli import main
from saex.data import open_dataset
from saex.models import resolve
from saex.store import ActivationStore

BF16 = dict(rtol=2 ** -7, atol=1e-2)


def test_minilm_on_wiki_equals_hidden_states(tmp_path):
    run = tmp_path / "t"
    assert main(["harvest", "--run", str(run), "--model", "minilm", "--dataset", "wiki",
                 "--hook", "blocks.3.hook_resid_post", "--max-examples", "200"]) == 0
    store = ActivationStore(run / "acts")
    assert store.manifest["examples"] == 200 and store.manifest["complete"]
    rows = next(store.iter_ordered(["acts.blocks.3.hook_resid_post", "example", "position", "token"], len(store)))
    folder = resolve("minilm")
    tok, model = transformers.AutoTokenizer.from_pretrained(folder), transformers.AutoModel.from_pretrained(folder)
    wiki = open_dataset("wiki")
    examples = rows["example"].unique().tolist()
    assert len(examples) == 200
    for index in examples:
        sel = rows["example"] == index
        enc = tok(wiki[index].input, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states[4][0]
        content = enc["input_ids"][0][1:-1]  # [CLS] ... [SEP]: every token but the two special ones
        assert rows["token"][sel].tolist() == content.tolist()
        assert rows["position"][sel].tolist() == list(range(1, len(content) + 1))
        torch.testing.assert_close(rows["acts.blocks.3.hook_resid_post"][sel].float(), hidden[1:-1], **BF16)


def test_fmnist_vit_cls_equals_hidden_states(tmp_path):
    run = tmp_path / "v"
    assert main(["harvest", "--run", str(run), "--model", "fmnist-vit", "--dataset", "fashion-mnist",
                 "--tokens", "cls", "--hook", "blocks.2.hook_resid_post", "--max-examples", "300"]) == 0
    store = ActivationStore(run / "acts")
    rows = next(store.iter_ordered(["acts.blocks.2.hook_resid_post", "example", "position", "label"], len(store)))
    assert len(store) == 300 and (rows["position"] == 0).all()
    fm = open_dataset("fashion-mnist")
    images, labels = fm.arrays()
    idx = rows["example"].numpy()
    assert np.array_equal(rows["label"].numpy(), labels[idx])
    folder = resolve("fmnist-vit")
    proc = transformers.AutoImageProcessor.from_pretrained(folder)
    model = transformers.ViTForImageClassification.from_pretrained(folder)
    pixels = proc(images=[Image.fromarray(images[i]) for i in idx], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[3][:, 0]
    torch.testing.assert_close(rows["acts.blocks.2.hook_resid_post"].float(), hidden, **BF16)


def _columns(store_dir):
    store = ActivationStore(store_dir)
    names = list(store.manifest["columns"])
    return next(store.iter_ordered(names, len(store)))


def test_sigkilled_harvest_resumes_to_the_same_rows(tmp_path):
    args = ["harvest", "--model", "fmnist-vit", "--dataset", "fashion-mnist", "--tokens", "patches",
            "--hook", "blocks.1.hook_resid_post", "blocks.3.hook_mlp_out", "--max-examples", "1500",
            "--batch-size", "50", "--shard-rows", "1000"]
    assert main(args + ["--run", str(tmp_path / "whole")]) == 0
    killed = tmp_path / "killed"
    # a real SIGKILL right after the third shard is written, before its manifest update (the worst moment)
    crash = (
        "import os, signal, sys\n"
        "from saex.store import writer\n"
        "orig = writer.atomic_write_json\n"
        "def dying_write(path, obj):\n"
        "    if len(obj.get('shards', [])) == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return orig(path, obj)\n"
        "writer.atomic_write_json = dying_write\n"
        "from saex.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", crash] + args + ["--run", str(killed)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    manifest = killed / "acts" / "manifest.json"
    assert (killed / "acts" / "shard_000002.safetensors").exists()  # written, but not in the manifest
    done = json.loads(manifest.read_text())
    assert not done["complete"] and 0 < done["examples"] < 1500, "the harvest must be killed part-way"
    assert main(args + ["--run", str(killed)]) == 0
    whole, resumed = _columns(tmp_path / "whole" / "acts"), _columns(killed / "acts")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    assert len(whole["example"]) == 1500 * 16


def test_image_folder_with_unreadable_file(tmp_path, tiny_model_dir, capsys):
    images = tmp_path / "images"
    for label in ("a", "b"):
        (images / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (80 * i, 0, 0)).save(images / label / f"{i}.png")
    (images / "b" / "zz.jpg").write_bytes(b"garbage")
    run = tmp_path / "run"
    base = ["harvest", "--run", str(run), "--model", str(tiny_model_dir["clip"]), "--dataset", str(images),
            "--order", "dataset", "--batch-size", "3"]
    assert main(base + ["--strict"]) == 2
    assert "b/zz.jpg" in capsys.readouterr().err
    assert main(base + ["--overwrite"]) == 0
    store = ActivationStore(run / "acts")
    assert len(store) == 6 and store.manifest["examples"] == 7
    assert [s["id"] for s in store.manifest["skipped"]] == [str(images / "b" / "zz.jpg")]
    assert "skipped unreadable input" in capsys.readouterr().err


def _harvest_error(capsys, *args):
    assert main(["harvest", *args]) == 2
    return capsys.readouterr().err


def test_errors_are_clear(tmp_path, tiny_model_dir, capsys):
    run = str(tmp_path / "r")
    err = _harvest_error(capsys, "--run", run, "--model", "nope", "--dataset", "wiki")
    assert "unknown model 'nope'" in err and "minilm, fmnist-vit" in err
    err = _harvest_error(capsys, "--run", run, "--model", "minilm", "--dataset", "wiki", "--hook", "blocks.9.hook_resid_post")
    assert "layer 9 does not exist; this model has layers 0..5" in err
    err = _harvest_error(capsys, "--run", run, "--model", "minilm", "--dataset", "wiki", "--hook", "blocks.1.resid")
    assert "unknown site 'resid'" in err
    (tmp_path / "empty.txt").write_text("\n\n")
    err = _harvest_error(capsys, "--run", run, "--model", "minilm", "--dataset", str(tmp_path / "empty.txt"))
    assert "holds no text" in err
    err = _harvest_error(capsys, "--run", run, "--model", "minilm", "--dataset", "fashion-mnist")
    assert "reads text but dataset 'fashion-mnist' holds image" in err
    err = _harvest_error(capsys, "--run", run, "--model", "minilm", "--dataset", "wiki", "--max-examples", "0")
    assert "max_examples must be >= 1" in err
    assert main(["harvest", "--run", run, "--model", str(tiny_model_dir["bert"]), "--dataset", "wiki",
                 "--max-examples", "4", "--hook", "blocks.0.hook_resid_post"]) == 0
    err = _harvest_error(capsys, "--run", run, "--model", "minilm", "--dataset", "wiki", "--max-examples", "4",
                         "--hook", "blocks.0.hook_resid_post")
    assert "holds other activations (model: store has" in err and "minilm" in err


def test_patch_tokens_of_a_model_without_cls(tmp_path, tiny_model_dir):
    run = tmp_path / "s"
    assert main(["harvest", "--run", str(run), "--model", str(tiny_model_dir["siglip"]), "--dataset", "fashion-mnist",
                 "--tokens", "patches", "--max-examples", "5", "--hook", "blocks.0.hook_resid_pre"]) == 0
    cols = _columns(run / "acts")
    assert len(cols["example"]) == 5 * 16 and cols["position"][:16].tolist() == list(range(16))


def test_completed_harvest_is_not_redone(tmp_path, tiny_model_dir, capsys):
    args = ["harvest", "--run", str(tmp_path), "--model", str(tiny_model_dir["gpt2"]), "--dataset", "wiki",
            "--max-examples", "3", "--hook", "blocks.2.hook_resid_post"]
    assert main(args) == 0
    before = (tmp_path / "acts" / "shard_000000.safetensors").stat().st_mtime_ns
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out
    assert (tmp_path / "acts" / "shard_000000.safetensors").stat().st_mtime_ns == before
    log = [json.loads(line) for line in (tmp_path / "logs" / "harvest.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log] == ["start", "end"] and log[1]["examples_per_s"] > 0


def test_loader_workers_give_the_same_rows(tmp_path, tiny_model_dir):
    base = ["harvest", "--model", str(tiny_model_dir["bert"]), "--dataset", "wiki", "--max-examples", "40",
            "--batch-size", "8", "--hook", "blocks.1.hook_resid_post"]
    assert main(base + ["--run", str(tmp_path / "w0"), "--workers", "0"]) == 0
    assert main(base + ["--run", str(tmp_path / "w2"), "--workers", "2"]) == 0
    a, b = _columns(tmp_path / "w0" / "acts"), _columns(tmp_path / "w2" / "acts")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pieces_left_uint8_are_finished_when_others_came_finished(tiny_model_dir):
    from saex.harvest import _join
    from saex.models import load_model

    adapter = load_model(str(tiny_model_dir["clip"]))
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    joined = _join([pixels[:2], adapter.finish_pixels(pixels[2:])], adapter)
    assert torch.equal(joined, adapter.finish_pixels(pixels))


def test_image_batches_prepared_in_pieces_give_the_same_rows(tmp_path, tiny_model_dir):
    """With several workers each image batch is prepared in pieces (one per worker) and joined: the rows,
    skipped inputs and batch boundaries equal a single process's."""
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(23):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / "a" / f"{i:02d}.png")
    (images / "a" / "07.png").write_bytes(b"garbage")
    base = ["harvest", "--model", str(tiny_model_dir["clip"]), "--dataset", str(images), "--order", "dataset",
            "--batch-size", "8", "--tokens", "all"]
    assert main(base + ["--run", str(tmp_path / "w0"), "--workers", "0"]) == 0
    assert main(base + ["--run", str(tmp_path / "w3"), "--workers", "2"]) == 0
    a, b = _columns(tmp_path / "w0" / "acts"), _columns(tmp_path / "w3" / "acts")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(set(a["example"].tolist())) == 22 and len(a["example"]) % 22 == 0  # every token of 22 images
    skipped = [ActivationStore(tmp_path / r / "acts").manifest["skipped"] for r in ("w0", "w3")]
    assert skipped[0] == skipped[1] and len(skipped[0]) == 1
