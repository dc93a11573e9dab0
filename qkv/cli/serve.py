"""``qkv serve`` — the live attention explorer in the browser (Starlette on uvicorn, loopback by default)."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from ..errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="the model the page starts with (embedded name, .gguf "
                   "file, Hugging Face directory or training run); the page can ask for others")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--max-models", type=int, default=2, help="models kept in memory at once (default 2)")
    p.add_argument("--max-texts", type=int, default=4, help="texts whose state is kept at once (default 4)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: its own choice)")


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    for name in ("max_models", "max_texts"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    import uvicorn

    from ..serve.app import make_app

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not _loopback(args.host):
        print(f"qkv: warning: binding {args.host}: anyone who can reach this address can use the explorer and "
              "make the server load models", file=sys.stderr)
    config = uvicorn.Config(make_app(model=args.model, max_models=args.max_models, max_texts=args.max_texts),
                            host=args.host, port=args.port, log_level="warning")
    server = uvicorn.Server(config)
    _announce(server, args.host)
    try:
        server.run()  # on Ctrl-C uvicorn shuts down cleanly, then re-raises the signal
    except KeyboardInterrupt:
        pass
    print("qkv serve: stopped", file=sys.stderr)
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _announce(server, host: str) -> None:
    """Print the URL once uvicorn has bound its socket (the port may have been 0)."""
    started = server.startup

    async def startup(*a, **kw):
        await started(*a, **kw)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else server.config.port
        shown = f"[{host}]" if ":" in host else host
        print(f"qkv serve: http://{shown}:{port}/  (Ctrl-C stops it)", flush=True)
    server.startup = startup
