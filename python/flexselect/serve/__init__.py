"""`flexselect serve`: a local video QA page and an OpenAI-compatible server over one loaded model.

    flexselect serve --model /models/Qwen2.5-VL-7B-Instruct --media-dir ~/Videos

The layout: `security.py` (listen address, API key, media folders, uploads), `runs.py` (the one worker thread and
its bounded queue), `openai_api.py` (request and response shapes), `app.py` (the routes), `static/` (the page).
FastAPI and uvicorn come with the `serve` extra and are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from ..errors import FlexSelectError


def add_serve_command(sub) -> None:
    from ..cli import add_model_arguments, add_positions_argument

    p = sub.add_parser(
        "serve",
        help="a local video QA web page and an OpenAI-compatible API",
        description="Serve one model: a page at / and POST /v1/chat/completions with video parts.",
    )
    add_model_arguments(p)
    add_positions_argument(p)
    g = p.add_argument_group("server")
    g.add_argument(
        "--media-dir",
        action="append",
        required=True,
        metavar="DIR",
        help="folder the server may read videos from (repeat for more); nothing else is readable",
    )
    g.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; others need --api-key)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    g.add_argument("--queue", type=int, default=4, help="questions that may wait behind the running one (default 4)")
    g.add_argument("--max-upload-mb", type=int, default=2048, help="largest upload in MiB (default 2048)")
    g.add_argument("--model-id", help="the model name clients see in /v1/models (default: the checkpoint's name)")
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import Settings, create_app
    except ImportError as e:
        raise FlexSelectError(
            f"flexselect serve needs the serve extra ({e.name} is missing): pip install 'flexselect[serve]'"
        ) from None
    from ..cli import load_pipeline
    from .security import check_listen

    check_listen(args.host, args.api_key)
    for folder in args.media_dir:
        if not Path(folder).expanduser().is_dir():
            raise FlexSelectError(f"--media-dir {folder} is not a folder; pass a folder that holds your videos")
    if args.queue < 0 or args.max_upload_mb <= 0:
        raise FlexSelectError("--queue must be >= 0 and --max-upload-mb > 0")
    if args.model is None and args.gguf is None:
        raise FlexSelectError("no model given: pass --model PATH (or --gguf + --mmproj)")
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))  # bound before the model loads: a busy port fails in a second, not later
    except OSError as e:
        raise FlexSelectError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port") from None
    pipe = load_pipeline(args)
    model_id = args.model_id or Path(args.model or args.gguf).name.removesuffix(".gguf")
    app = create_app(
        pipe,
        Settings(
            model_id=model_id,
            media_dirs=args.media_dir,
            host=args.host,
            api_key=args.api_key,
            max_waiting=args.queue,
            max_upload_mb=args.max_upload_mb,
        ),
    )
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"flexselect serve: http://{shown}:{port}/ (model {model_id})", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)).run(sockets=[sock])
    return 0
