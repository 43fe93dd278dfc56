import socket
import threading
import time

import pytest

from saex.cli import main


def build_run(run, model, dataset, tokens, hook, n, explore: bool = True):
    """A small run: harvest, two TopK SAEs (topk-k4, topk-k8) and, for the explorer, eval and topk-k8's index."""
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


def serve(app):
    """Run the app on a free loopback port in a thread; returns (base url, server)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the explorer did not start"
    return f"http://127.0.0.1:{port}", server
