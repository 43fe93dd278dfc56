import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run in its interpreter, on CPU tensors (set before they load)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.tiny_models import TINY_FAMILIES, save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """family name -> folder holding a tiny randomly initialised model of that family."""
    root = tmp_path_factory.mktemp("tiny_models")
    folders = {}
    for i, name in enumerate(TINY_FAMILIES):  # seeded here: a session fixture is built before any test's seed
        torch.manual_seed(1000 + i)
        folders[name] = save_tiny(name, root / name)
    return folders


def build_run(run, model, dataset, tokens, hook, n, explore: bool = True):
    """A small run: harvest, two TopK SAEs (topk-k4, topk-k8) and, for the explorer, eval and topk-k8's index."""
    from saex.cli import main

    assert main(["harvest", "--run", str(run), "--model", model, "--dataset", dataset, "--tokens", tokens,
                 "--hook", hook, "--max-examples", str(n), "--batch-size", "50"]) == 0
    assert main(["train", "--run", str(run), "--sweep", "k=4,8", "--expansion", "2", "--steps", "60",
                 "--batch-size", "128"]) == 0
    if explore:
        assert main(["eval", "--run", str(run), "--examples", "40", "--batch-size", "20"]) == 0
        assert main(["index", "--run", str(run), "--sae", "topk-k8", "--top", "16", "--samples", "8"]) == 0
    return run


@pytest.fixture(scope="session")
def image_run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("explore"), "fmnist-vit", "fashion-mnist", "patches",
                     "blocks.2.hook_resid_post", 300)


@pytest.fixture(scope="session")
def text_run(tmp_path_factory, tiny_model_dir):
    return build_run(tmp_path_factory.mktemp("explore_text"), str(tiny_model_dir["bert"]), "wiki", "content",
                     "blocks.1.hook_resid_post", 60)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("SAEX_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: opt in with --run-slow or SAEX_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
