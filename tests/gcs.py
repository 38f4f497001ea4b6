"""A real GCS JSON API on 127.0.0.1 for storage tests: gcp-storage-emulator's server, reached as pyarrow
reaches Google Cloud Storage, with Google's default credentials: GOOGLE_APPLICATION_CREDENTIALS names an
authorized-user file whose token endpoint is a local OAuth stand-in that grants every refresh (pyarrow
refuses to send a request without a token, and has no emulator switch). A gs:// location names the
endpoint in its query, as a user's does for a GCS-compatible store."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import quote


class _TokenEndpoint(BaseHTTPRequestHandler):
    """OAuth 2 token refresh: any request gets a bearer token for an hour."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"access_token": "test-token", "expires_in": 3600, "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def gcs_server() -> Iterator[str]:
    """Start the emulator and the token endpoint, export GOOGLE_APPLICATION_CREDENTIALS, yield the emulator's
    host:port; stop both and restore the environment on exit."""
    from gcp_storage_emulator.server import create_server

    tokens = ThreadingHTTPServer(("127.0.0.1", 0), _TokenEndpoint)
    threading.Thread(target=tokens.serve_forever, daemon=True).start()
    emulator = create_server("127.0.0.1", 0, in_memory=True)
    emulator.start()
    saved = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    with tempfile.TemporaryDirectory(prefix="gcs-credentials-") as directory:
        credentials = os.path.join(directory, "authorized_user.json")
        with open(credentials, "w", encoding="utf-8") as handle:
            json.dump({"type": "authorized_user", "client_id": "test", "client_secret": "test", "refresh_token": "test",
                       "token_uri": f"http://127.0.0.1:{tokens.server_port}/token"}, handle)
        os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = credentials
        try:
            yield f"127.0.0.1:{emulator._api._httpd.server_port}"  # the emulator names no public accessor
        finally:
            emulator.stop()
            tokens.shutdown()
            tokens.server_close()
            if saved is None:
                os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
            else:
                os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = saved


def new_bucket(endpoint: str) -> str:
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(f"http://{endpoint}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()
    return name


def list_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    """The bucket's object names under prefix, without the empty "dir/" markers pyarrow writes."""
    url = f"http://{endpoint}/storage/v1/b/{bucket}/o?prefix={quote(prefix)}"
    items = json.load(urllib.request.urlopen(url, timeout=10)).get("items", [])
    return sorted(item["name"] for item in items if not item["name"].endswith("/"))
