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
