"""Serve the OHIF viewer next to the node's Orthanc, on one origin, without Docker.

    python deploy/viewer/serve.py --ohif .cache/ohif/package/dist --orthanc http://127.0.0.1:8042

Static files come from OHIF's published build (npm ``@ohif/app``, see ``make viewer``), with
``app-config.js`` replaced by ours; ``/dicom-web/...`` is passed through to Orthanc, so the
browser sees one origin and needs no CORS. Unknown paths get ``index.html`` (OHIF routes in the
browser). Orthanc credentials, when it needs them, come from ``ORTHANC_USER``/``ORTHANC_PASSWORD``.
Standard library only: this is a convenience for a workstation, compose runs OHIF in Orthanc.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CONFIG = Path(__file__).with_name("app-config.js")
# cross-origin isolation lets OHIF use SharedArrayBuffer for volume loading
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}


def make_handler(dist: Path, orthanc: str, auth: str | None):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # quiet: one line per request is noise here
            pass

        def do_GET(self):
            if self.path.startswith("/dicom-web/"):
                return self._proxy()
            path = self.path.split("?", 1)[0].lstrip("/")
            file = CONFIG if path == "app-config.js" else dist / path
            inside = file == CONFIG or dist.resolve() in file.resolve().parents
            if not (inside and file.is_file()):
                file = dist / "index.html"
            body = file.read_bytes()
            self._reply(200, mimetypes.guess_type(file.name)[0] or "application/octet-stream", body)

        def _proxy(self):
            req = urllib.request.Request(orthanc.rstrip("/") + self.path)
            for h in ("Accept",):
                if self.headers.get(h):
                    req.add_header(h, self.headers[h])
            if auth:
                req.add_header("Authorization", auth)
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    self._reply(r.status, r.headers.get("Content-Type", ""), r.read())
            except urllib.error.HTTPError as e:
                self._reply(e.code, e.headers.get("Content-Type", "text/plain"), e.read())

        def _reply(self, code: int, ctype: str, body: bytes):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in ISOLATION.items():
                self.send_header(k, v)
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            self.end_headers()
            self.wfile.write(body)

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ohif", type=Path, required=True, help="OHIF's built dist/ folder")
    ap.add_argument("--orthanc", default="http://127.0.0.1:8042", help="Orthanc's HTTP base URL")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=3000)
    args = ap.parse_args()
    if not (args.ohif / "index.html").is_file():
        raise SystemExit(f"error: {args.ohif} is not OHIF's dist folder (no index.html); run `make viewer`")
    user, password = os.environ.get("ORTHANC_USER"), os.environ.get("ORTHANC_PASSWORD")
    auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode() if user else None
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.ohif, args.orthanc, auth))
    print(f"OHIF on http://{args.host}:{args.port}/ (Orthanc {args.orthanc})", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
