"""A cache on an object store against the same cache on local disk, measured (not a test).

    .venv/bin/python bench/storage.py [--limit 1000] [--memory-gb 0.15] [--repeats 2]

The store is a real S3 HTTP API on loopback: moto's server, in a process of its own (so its
request handling does not share this process's interpreter). The real all-MiniLM-L6-v2 on
the real tweets (--limit examples per split), pooled and tokens views, float16, zarr:

(a) extraction wall time: `adl extract` into a folder vs into s3:// (the manifest's
    extraction_seconds: data, tokenising, model, forward loop, writes, checksums);
(b) one training epoch streamed from each: `adl train --max-epochs 1` with the tokens head
    (adalayers, --memory-gb small enough that the tokens are read in blocks, the next block
    read while the current one trains) and the pooled head (adalayers-pooled, loaded whole);
    the epoch's seconds from history.csv (training + validation);
(c) the loopback server's own speed: the tokens view of train read once, whole, from each,
    with nothing else running (MB/s): the part of any gap that is the server's.

Every CLI run is a subprocess through `python -m adl`. Timings are the best of --repeats
interleaved runs (the machine is shared: the load average is recorded). Results go to
bench/results/storage.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's adl, as the `python -m adl` runs below (cwd=ROOT) use
BUCKET = "adl-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, dict]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ACCESS_KEY_ID": "AKIABENCH0000000000", "AWS_SECRET_ACCESS_KEY": "bench-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}
    return proc, env


def adl(env: dict, *args) -> float:
    """Run `python -m adl ARGS`; -> wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "adl", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise SystemExit(f"adl {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def epoch_seconds(run: Path) -> float:
    with open(run / "history.csv") as f:
        return float(next(csv.DictReader(f))["seconds"])


def read_mbps(where: str) -> float:
    from adl.cache import open_cache

    cache = open_cache(where)
    values, _ = cache.read("train", "tokens")
    t0 = time.perf_counter()
    x = values[:]
    seconds = time.perf_counter() - t0
    return x.nbytes / 2 / 1e6 / seconds  # stored float16 bytes per second


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=1000, help="examples per split")
    ap.add_argument("--memory-gb", type=float, default=0.15, help="tokens budget: small, so the epoch streams")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "storage.json"))
    args = ap.parse_args()

    server, env = start_server()
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    work = Path(tempfile.mkdtemp(prefix="adl-bench-storage-"))
    places = {"local": str(work / "cache"), "s3": f"s3://{BUCKET}/cache"}
    extract = ["extract", "--model", "minilm", "--dataset", "tweets", "--limit", args.limit,
               "--views", "pooled,tokens", "--overwrite"]
    heads = {"tokens": ["--head", "adalayers", "--memory-gb", args.memory_gb],
             "pooled": ["--head", "adalayers-pooled"]}
    res: dict = {"extract_s": {p: [] for p in places}, "extract_wall_s": {p: [] for p in places},
                 "epoch_s": {f"{h}/{p}": [] for h in heads for p in places}, "read_mbps": {p: [] for p in places}}
    try:
        for rep in range(args.repeats):
            for place, where in places.items():
                res["extract_wall_s"][place].append(adl(env, *extract, "--out", where))
                from adl.cache import open_cache

                res["extract_s"][place].append(open_cache(where).manifest["extraction_seconds"])
            for place, where in places.items():
                for head, flags in heads.items():
                    run = work / f"run-{head}-{place}-{rep}"
                    adl(env, "train", "--cache", where, *flags, "--max-epochs", 1, "--out", run)
                    res["epoch_s"][f"{head}/{place}"].append(epoch_seconds(run))
                res["read_mbps"][place].append(read_mbps(where))
        from adl.cache import open_cache

        cache = open_cache(places["local"])
        sizes = {v: sum(cache.nbytes(s, v) for s in cache.splits) for v in cache.views}
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)

    best = {k: {p: min(v) for p, v in d.items()} for k, d in res.items() if k != "read_mbps"}
    best["read_mbps"] = {p: max(v) for p, v in res["read_mbps"].items()}
    ratios = {
        "extract_s3_over_local": best["extract_s"]["s3"] / best["extract_s"]["local"],
        "epoch_tokens_s3_over_local": best["epoch_s"]["tokens/s3"] / best["epoch_s"]["tokens/local"],
        "epoch_pooled_s3_over_local": best["epoch_s"]["pooled/s3"] / best["epoch_s"]["pooled/local"],
        "read_local_over_s3": best["read_mbps"]["local"] / best["read_mbps"]["s3"],
    }
    out = {"args": vars(args), "cache_bytes": sizes, "runs": res, "best": best, "ratios": ratios,
           "target": "tokens epoch streamed from s3 within 1.3x local",
           "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "platform": platform.platform()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"best": best, "ratios": ratios, "cache_bytes": sizes}, indent=2))


if __name__ == "__main__":
    main()
