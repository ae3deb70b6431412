"""A real S3 HTTP API on loopback for the object-storage tests: moto in server mode.

``serve()`` starts ``moto.server.ThreadedMotoServer`` on 127.0.0.1 (a free port) and returns it
with the environment a client needs: made-up credentials, a region, and ``AWS_ENDPOINT_URL``
pointing at the server, the variable users set for MinIO, Ceph or R2. Nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECRET = "not-a-real-secret-0123456789"


def serve():
    """-> (server, env): call server.stop() when done.

    Each server has a port of its own, so s3fs's instance cache (filesystems keyed by their
    arguments, not by the AWS_ENDPOINT_URL they read) is cleared first: a filesystem an earlier
    test made in this process would still talk to that test's stopped server."""
    import s3fs
    from moto.server import ThreadedMotoServer

    s3fs.S3FileSystem.clear_instance_cache()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "AKIAADLTESTKEY000000", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
           "ADL_STORAGE_BACKOFF_S": "0.05"}
    return server, env


@contextmanager
def bucket(name: str, versioning: bool = False):
    """A server with bucket ``name``, its variables set in this process: -> (boto3 client, env)."""
    server, env = serve()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            s3c = client(env)
            s3c.create_bucket(Bucket=name)
            if versioning:
                s3c.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
            yield s3c, env
    finally:
        server.stop()


def client(env: dict):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def set_auth(env: dict, enforce: bool) -> None:
    """Make moto check signatures (every request must come from a known key) or stop checking."""
    req = urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset-auth", method="POST",
                                 data=b"0" if enforce else b"inf", headers={"Content-Type": "text/plain"})
    json.loads(urllib.request.urlopen(req, timeout=10).read())


def child_env(env: dict) -> dict:
    """os.environ + the store's variables, for `python -m adl` subprocesses of the tests."""
    return {**os.environ, **env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
