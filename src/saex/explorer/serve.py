"""`saex explore RUN`: serve the explorer on this machine (127.0.0.1 by default)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ExploreConfig:
    run: str = field(default="", metadata={"positional": True})
    """Run folder with an index (saex index)."""
    sae: str | None = None
    """Which indexed SAE to explore (default: the first)."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 shares it on the network)."""
    port: int = 8000
    """Port to listen on."""


def explore(cfg: ExploreConfig) -> None:
    import uvicorn

    from saex.explorer.app import create_app

    if not cfg.run:
        raise ValueError("name the run folder: saex explore RUN")
    import socket

    app = create_app(cfg.run, cfg.sae)
    with socket.socket() as probe:
        try:
            probe.bind((cfg.host, cfg.port))
        except OSError as e:
            raise ValueError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); pass another --port") from None
    print(f"saex explorer for {cfg.run}: http://{cfg.host}:{cfg.port}/  (Ctrl-C stops it)")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
