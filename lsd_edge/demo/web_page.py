"""The in-browser student page (`lsd-edge demo --web`): the student answers in the page itself, with
transformers.js on onnxruntime-web (WASM, or WebGPU where the browser has it); no server does inference.

This module finds what the page needs and serves it with the standard library's `http.server`:

- `/` and the page's own files (`lsd_edge/demo/web/`);
- `/settings.json`: which export and variant the page loads, and where from;
- `/models/student/...`: the export folder, read-only (`lsd_edge.runtime.onnx.layout`);
- `/assets/...`: transformers.js's browser bundle and onnxruntime-web's .wasm/.mjs files, from the
  pinned npm packages in a node_modules folder (`--web-assets`, else $LSD_EDGE_WEB_ASSETS, else the
  checkout's `web/node_modules`), and nothing else from there.

Every asset is local, so the page works offline. Responses carry COOP/COEP headers: the page is then
cross-origin isolated and onnxruntime-web may use threads (SharedArrayBuffer).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import lsd_edge
from lsd_edge.errors import LsdEdgeError
from lsd_edge.runtime.onnx.layout import JS_DTYPE, read_json_file, variants_in
from lsd_edge.workspace import RUNS_ROOT, is_export_folder, latest_run

PAGE_DIR = Path(__file__).parent / "web"
PAGE_FILES = ("index.html", "app.js", "worker.js", "style.css")
ASSETS_ENV = "LSD_EDGE_WEB_ASSETS"
REPO_ASSETS = Path(lsd_edge.__file__).resolve().parents[1] / "web" / "node_modules"
INSTALL = "cd web && ONNXRUNTIME_NODE_INSTALL=skip npm install --ignore-scripts"
TRANSFORMERS = "@huggingface/transformers"
# The only folders of node_modules the server hands out: the browser bundle and ORT's WASM builds.
ASSET_DIRS = (f"{TRANSFORMERS}/dist", "onnxruntime-web/dist")
MODEL_PREFIX = "/models/student/"
ASSETS_PREFIX = "/assets/"
MIME = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".onnx": "application/octet-stream",
    ".onnx_data": "application/octet-stream",
    ".jinja": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".png": "image/png",
}
HEADERS = {
    # Cross-origin isolation lets onnxruntime-web run threads; every asset is same-origin anyway.
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    # An export may be written again under the same name: the browser must not keep the old files.
    "Cache-Control": "no-cache",
}
CHUNK = 1 << 20


class WebDemoError(LsdEdgeError):
    """An in-browser page that cannot be served: no JS assets, no usable export, a taken port."""


@dataclass(frozen=True)
class WebSettings:
    """What the page loads: an export folder in one variant, and the JS assets it runs on."""

    export: Path
    variant: str  # lsd-edge's name: fp32, int8, int4, fp16
    variants: tuple[str, ...]  # every complete variant in the folder
    assets: Path  # a node_modules folder
    max_new_tokens: int = 64
    notes: list[str] = field(default_factory=list)

    @property
    def dtype(self) -> str:
        """The variant as transformers.js names it (int4 -> q4)."""
        return JS_DTYPE[self.variant]

    def page_json(self) -> dict:
        """`/settings.json`: what `app.js` reads before it loads the model."""
        return {
            "name": self.export.name,
            "model_root": "/models/",
            "model_id": MODEL_PREFIX.strip("/").split("/")[-1],
            "variant": self.variant,
            "dtype": self.dtype,
            "variants": {v: JS_DTYPE[v] for v in self.variants},
            "transformers": f"{ASSETS_PREFIX}{TRANSFORMERS}/dist/transformers.min.js",
            "transformers_version": assets_version(self.assets),
            "wasm_prefix": f"{ASSETS_PREFIX}onnxruntime-web/dist/",
            "max_new_tokens": self.max_new_tokens,
        }


# ----------------------------------------------------------------------------- finding what it serves


def has_assets(folder: Path) -> bool:
    return (folder / TRANSFORMERS / "dist" / "transformers.min.js").is_file() and (
        folder / "onnxruntime-web" / "dist"
    ).is_dir()


def find_assets(given: str | Path | None = None) -> Path:
    """The node_modules folder with the pinned packages: `given`, else $LSD_EDGE_WEB_ASSETS, else the
    checkout's web/node_modules. A folder named but lacking them is an error, not a fallback."""
    env = os.environ.get(ASSETS_ENV)
    if given is not None:
        source, folder = "--web-assets", Path(given)
    elif env:
        source, folder = f"${ASSETS_ENV}", Path(env)
    else:
        source, folder = "the checkout", REPO_ASSETS
    for candidate in (folder, folder / "node_modules"):  # node_modules itself, or the folder holding it
        if has_assets(candidate):
            return candidate
    raise WebDemoError(
        f"{folder} ({source}): no {TRANSFORMERS} with onnxruntime-web there; run `{INSTALL}` in the "
        "lsd-edge checkout, or pass --web-assets DIR (a node_modules folder that has them)"
    )


def assets_version(folder: Path) -> str:
    try:
        return json.loads((folder / TRANSFORMERS / "package.json").read_text(encoding="utf-8"))["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def find_export(export_dir: str | Path | None, runs_root: str | Path = RUNS_ROOT) -> Path:
    """`export_dir`, else the latest run's export (`<run>/onnx`, else its other onnx* folders)."""
    if export_dir is not None:
        return Path(export_dir)
    ws = latest_run(runs_root)
    if ws is None:
        raise WebDemoError(
            f"no EXPORT_DIR given and no finished run under {runs_root}/; run `lsd-edge distill "
            "recipes/tiny.toml` and `lsd-edge export --int8` first, or pass EXPORT_DIR"
        )
    exports = ws.exports()
    if not exports:
        raise WebDemoError(
            f"{ws.root}: the latest run has no ONNX export; run `lsd-edge export --int8` first"
        )
    return ws.onnx if ws.onnx in exports else exports[0]


def check_export(folder: Path) -> tuple[tuple[str, ...], str | None]:
    """The complete variants of an export folder and its default variant (from config.json's
    transformers.js_config.dtype), or one line saying why the page cannot load it."""
    if not folder.is_dir() or not is_export_folder(folder):
        raise WebDemoError(f"{folder}: no ONNX export there; run `lsd-edge export --int8` or pass EXPORT_DIR")
    variants = tuple(variants_in(folder))
    if not variants:
        raise WebDemoError(
            f"{folder}: no complete set of graphs under onnx/; re-run `lsd-edge export --int8`"
        )
    config = read_json_file(folder / "config.json", "config.json")
    js = config.get("transformers.js_config")
    if not isinstance(js, dict):
        raise WebDemoError(
            f"{folder}/config.json: no transformers.js_config (an export before the page); re-run `lsd-edge export`"
        )
    by_dtype = {d: v for v, d in JS_DTYPE.items()}
    default = by_dtype.get(js.get("dtype"))
    return variants, default if default in variants else None


def web_settings(
    export_dir: str | Path | None,
    variant: str | None = None,
    assets: str | Path | None = None,
    max_new_tokens: int = 64,
    runs_root: str | Path = RUNS_ROOT,
) -> WebSettings:
    """Everything the page needs, checked before anything is served."""
    if variant is not None and variant not in JS_DTYPE:
        raise WebDemoError(f"--variant {variant}: choose one of {', '.join(JS_DTYPE)}")
    folder = find_export(export_dir, runs_root)
    variants, default = check_export(folder)
    if variant is None:
        variant = default or next((v for v in variants if v != "fp32"), variants[0])
    elif variant not in variants:
        raise WebDemoError(
            f"--variant {variant}: {folder} has {', '.join(variants)}; pick one of them "
            f"(or export it: `lsd-edge export --{variant}`)"
        )
    return WebSettings(folder, variant, variants, find_assets(assets), max_new_tokens)


# ---------------------------------------------------------------------------------------- the server


def safe_join(root: Path, rel: str) -> Path | None:
    """`root/rel` when it names a file inside `root`: no '..', no hidden names, no link out of it."""
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") or p.startswith(".") or "\\" in p or "\0" in p for p in parts):
        return None
    base = root.resolve()
    path = (base / rel).resolve()
    return path if path.is_relative_to(base) and path.is_file() else None


def route(settings: WebSettings, url: str) -> Path | bytes | None:
    """What a GET of `url` answers: a file, generated bytes, or None (404)."""
    path = unquote(urlsplit(url).path)
    if path in ("/", "/index.html"):
        return PAGE_DIR / "index.html"
    if path == "/settings.json":
        return json.dumps(settings.page_json()).encode()
    if path.startswith(MODEL_PREFIX):
        return safe_join(settings.export, path[len(MODEL_PREFIX) :])
    if path.startswith(ASSETS_PREFIX):
        rel = path[len(ASSETS_PREFIX) :]
        if not any(rel.startswith(d + "/") for d in ASSET_DIRS):
            return None
        return safe_join(settings.assets, rel)
    name = path.lstrip("/")
    return PAGE_DIR / name if name in PAGE_FILES else None


def mime_type(name: str) -> str:
    return MIME.get(Path(name).suffix, "application/octet-stream")


class PageHandler(BaseHTTPRequestHandler):
    """GET and HEAD only; anything else is answered 501 by http.server itself."""

    server: PageServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.answer(send_body=True)

    def do_HEAD(self) -> None:
        self.answer(send_body=False)

    def answer(self, send_body: bool) -> None:
        found = route(self.server.settings, self.path)
        if found is None:
            body = b"not found\n"
            self.head(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", len(body))
            if send_body:
                self.wfile.write(body)
            return
        if isinstance(found, bytes):
            self.head(HTTPStatus.OK, "application/json", len(found))
            if send_body:
                self.wfile.write(found)
            return
        self.head(HTTPStatus.OK, mime_type(found.name), found.stat().st_size)
        self.server.served.append(urlsplit(self.path).path)
        if send_body:
            with found.open("rb") as f:
                shutil.copyfileobj(f, self.wfile, CHUNK)

    def head(self, status: HTTPStatus, content_type: str, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for key, value in HEADERS.items():
            self.send_header(key, value)
        self.end_headers()

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the tab was closed mid-download
            pass

    def log_message(self, format: str, *args) -> None:  # one line per file would bury the URL
        pass


class PageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], settings: WebSettings):
        self.settings = settings
        self.served: deque[str] = deque(maxlen=1000)  # the files handed out lately, for tests and bug reports
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, PageHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"


def make_server(settings: WebSettings, host: str = "127.0.0.1", port: int = 7860) -> PageServer:
    """Bind the page's server (port 0: any free port); `serve_forever()` then answers requests."""
    try:
        return PageServer((host, port), settings)
    except OSError as e:
        why = "the port is taken" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise WebDemoError(f"cannot serve on {host}:{port}: {why}; pass another --port (or --host)") from None


def serve(server: PageServer) -> None:
    """Answer requests until Ctrl+C, then close the socket."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
