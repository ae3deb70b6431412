"""`adl serve` under load, measured (not a test): real tweets on loopback against the offline Predictor.

    .venv/bin/python bench/serve.py [--work /tmp/serve-bench] [--n 256] [--seconds 15] [--screenshot docs/serve-page.png]

Needs wrk (Debian: apt-get install wrk), the load generator.

Set-up (skipped when --work already holds it), the commands a user would type:

    adl extract --model minilm --dataset tweets --limit 1000 --out WORK/c-tweets
    adl train --cache WORK/c-tweets --head adalayers --max-epochs 3 --out WORK/runs/sentiment

(the tokens head, the one whose cost the predict bench measures; with no --head, adl train may keep
the pooled head or the probe)

Measured in one run, on the same --n real test tweets, in --rounds rounds. Each round measures
(b) in this process while the server idles, then (c) at concurrency 1 and 8, then (a), then (c)
at 32, then (a) again: the server's throughput at 32 is held to the mean of the two offline
measures around it, so a slower minute on this shared machine hits both sides of the ratio
(absolute times drift by +-30 % from one minute to the next here):
(a) the offline Predictor's sustained batched throughput: p(texts) in its own length-bucketed
    batches, again and again for --seconds (texts/s), as wrk runs for --seconds; with the
    Predictor's defaults and with the server's batching (adl.serve.server.for_serving), and the
    higher of the two is the reference; and, to tell the server's own cost from the batches it
    can form, the served Predictor on the same texts in random groups of 32 (the batches a
    server sees at concurrency 32: 32 tweets of mixed lengths, not 32 of a sorted 192);
(b) the bare single-text forward: the backbone alone (no heads, no tokenising) on one tweet at
    a time, median over the tweets (ms);
(c) the server (`adl serve --run WORK/runs/sentiment`, default flags) driven by wrk, closed
    loop at concurrency 1, 8 and 32 (keep-alive connections), one tweet per request, for
    --seconds per level after a 2 s warm-up: requests/s and p50/p95/p99 latency, and what the
    server did meanwhile: backbone calls (texts and milliseconds each), the share of the time a
    backbone call was running, and the cores its event loop used.
(d) overload, after the rounds: a second server with --max-concurrent-requests 64 driven by wrk
    at concurrency 256 for --seconds: accepted requests/s, the share answered 429, and p50/p99
    of the admitted and of the refused requests (server side, from its access log).
The ratios are computed per round; the result is their median.
Targets: (c) at concurrency 32 >= 0.8 x (a) and >= 0.9 x the groups of 32; p50 of (c) at concurrency
1 <= (b) + 10 ms. The load
generator shares the machine's cores with the server, as a client on the same host would; wrk is
C and takes little of them.

--screenshot PATH also serves WORK/runs/ner when present (adl extract --dataset wnut16 ... and
adl train into WORK/runs/ner) and saves the page at / after it has run one tweet, through
Debian's chromium (playwright, /usr/bin/chromium). Results go to bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import shutil
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from adl.extract.datasets import load_dataset
from adl.serve import Predictor
from adl.serve.server import for_serving

ROOT = Path(__file__).resolve().parents[1]
ADL = [sys.executable, "-m", "adl"]
LEVELS = (1, 8, 32)
SUMMARY = ("median over rounds; each round measures the single-text forward, the server at 1 and 8, the offline "
           "reference, the server at 32, and the offline reference again")


def setup(work: Path) -> None:
    if not (work / "c-tweets" / "manifest.json").is_file():
        subprocess.run([*ADL, "extract", "--model", "minilm", "--dataset", "tweets", "--limit", "1000",
                        "--out", str(work / "c-tweets"), "--overwrite"], check=True)
    if not (work / "runs" / "sentiment" / "metrics.json").is_file():
        subprocess.run([*ADL, "train", "--cache", str(work / "c-tweets"), "--head", "adalayers", "--max-epochs", "3",
                        "--out", str(work / "runs" / "sentiment"), "--overwrite"], check=True)


def tweets(n: int) -> list[str]:
    return [t for t in load_dataset("tweets", seed=42).splits["test"].texts if t.strip()][:n]


def sustained(p: Predictor, groups: list[list[str]], seconds: float) -> float:
    """Texts/s of ``p(group)`` over the groups, again and again for ``seconds``."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for group in groups:
            p(group)
            n += len(group)
    return n / (time.perf_counter() - start)


def batched(predictors: dict[str, Predictor], texts: list[str], seconds: float) -> dict:
    """(a) sustained batched throughput of ``p(texts)``, per Predictor configuration; ``best`` is
    the higher, the reference the server is held to. And, as a diagnosis, the served Predictor
    on the texts in random groups of 32, the batches a server sees at concurrency 32: what the
    server could reach with no cost of its own."""
    out = {name: sustained(p, [texts], seconds) for name, p in predictors.items()}
    shuffled = random.Random(0).sample(texts, len(texts))
    groups = [shuffled[i:i + 32] for i in range(0, len(shuffled), 32)]
    return {**out, "best": max(out.values()),
            "as served, groups of 32": sustained(predictors["as served"], groups, seconds)}


def single(p: Predictor, texts: list[str]) -> dict:
    """(b) the bare backbone on one text at a time, and one Predictor call per text (ms)."""
    p(texts[:32])  # warm-up
    tok, model = p.tokenizer("sequence"), p.backbone.model
    encoded = [tok(t, truncation=True, max_length=p.max_length, return_tensors="pt") for t in texts]
    bare = []
    with torch.inference_mode():
        model(**encoded[0])
        for enc in encoded:
            t = time.perf_counter()
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            bare.append(time.perf_counter() - t)
    one_call = []
    for text in texts[:64]:
        t = time.perf_counter()
        p([text])
        one_call.append(time.perf_counter() - t)
    return {"bare_single_forward_ms": 1000 * statistics.median(bare),
            "predictor_single_call_ms": 1000 * statistics.median(one_call)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(runs: list[Path], *flags: str, log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """``adl serve`` on a free loopback port; its output (the access log) to ``log``, if given."""
    port = free_port()
    argv = [*ADL, "serve", *[a for r in runs for a in ("--run", str(r))], "--port", str(port), *flags]
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(argv, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=120)


LUA = """-- written by bench/serve.py: POST one tweet per request, cycling through BODIES
BODIES = {%s}
local i = 0
request = function()
  i = i %% #BODIES + 1
  return wrk.format("POST", "/v1/predict", {["Content-Type"] = "application/json"}, BODIES[i])
end
done = function(summary, latency, requests)
  io.write(string.format('ADL {"requests": %%d, "duration_us": %%d, "errors": %%d, "non_2xx": %%d, ' ..
    '"p50_us": %%d, "p95_us": %%d, "p99_us": %%d}\\n', summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def lua_string(text: str) -> str:
    """``text`` as a Lua long-bracket literal whose level does not occur in it."""
    level = next(n for n in range(100) if f"]{'=' * n}]" not in text)
    return f"[{'=' * level}[{text}]{'=' * level}]"


def run_wrk(url: str, script: Path, concurrency: int, duration: float) -> dict:
    """One wrk run (C, one thread, ``concurrency`` keep-alive connections) -> its ADL summary line."""
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{int(duration)}s", "--timeout", "60s", "-s",
                          str(script), url], capture_output=True, text=True, check=True).stdout
    return json.loads(next(line[4:] for line in out.splitlines() if line.startswith("ADL ")))


def load(url: str, texts: list[str], concurrency: int, seconds: float, work: Path) -> dict:
    """Closed loop with wrk (C, one thread, ``concurrency`` keep-alive connections, each sends its
    next tweet as soon as its answer is back) for ``seconds`` after a 2 s warm-up. A C generator
    takes little of the two cores the server shares with it: with the earlier httpx client, the
    server's batches at concurrency 32 held 13 texts on average; with wrk they hold 32."""
    script = work / "post.lua"
    script.write_text(LUA % ", ".join(lua_string(json.dumps({"texts": [t]})) for t in texts))

    run_wrk(url, script, concurrency, 2)  # warm-up: connections, allocator, the first batches
    r = run_wrk(url, script, concurrency, seconds)
    if r["errors"] or r["non_2xx"]:
        raise SystemExit(f"wrk saw {r['errors']} socket errors and {r['non_2xx']} non-2xx answers at "
                         f"concurrency {concurrency}")
    return {"concurrency": concurrency, "requests": r["requests"],
            "requests_per_s": r["requests"] / (r["duration_us"] / 1e6),
            "p50_ms": r["p50_us"] / 1000, "p95_ms": r["p95_us"] / 1000, "p99_ms": r["p99_us"] / 1000}


ACCESS_LINE = re.compile(r'"POST /v1/predict HTTP/[\d.]+" (\d{3}) ([\d.]+)ms request_id=')


def overload(run: Path, texts: list[str], seconds: int, work: Path, concurrency: int = 256,
             admitted: int = 64) -> dict:
    """(d) Overload: wrk at ``concurrency`` against ``adl serve --max-concurrent-requests admitted``
    (default flags otherwise), closed loop, one tweet per request, for ``seconds`` after a 2 s
    warm-up. Accepted requests/s and the share of 429s from wrk's counts; the latency of the
    admitted and of the refused requests from the server's access log (each line: status, ms),
    over the timed window; wrk's own percentiles mix both."""
    log = work / "overload-server.log"
    proc, url = start_server([run], "--max-concurrent-requests", str(admitted), log=log)
    script = work / "post.lua"
    script.write_text(LUA % ", ".join(lua_string(json.dumps({"texts": [t]})) for t in texts))
    try:
        run_wrk(url, script, concurrency, 2)
        time.sleep(1)  # the warm-up's last answers are logged before the window opens
        start = log.stat().st_size
        r = run_wrk(url, script, concurrency, seconds)
        time.sleep(1)
        with open(log) as f:
            f.seek(start)
            lines = [(int(m.group(1)), float(m.group(2))) for m in map(ACCESS_LINE.search, f) if m]
    finally:
        code = stop_server(proc)
    ok = sorted(ms for status, ms in lines if status == 200)
    refused = sorted(ms for status, ms in lines if status == 429)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None  # noqa: E731
    statuses = {str(st): sum(1 for s_, _ in lines if s_ == st) for st in sorted({st for st, _ in lines})}
    wall = r["duration_us"] / 1e6
    return {"concurrency": concurrency, "max_concurrent_requests": admitted, "seconds": wall,
            "requests": r["requests"], "non_2xx": r["non_2xx"], "socket_errors": r["errors"],
            **admission(statuses, wall),
            "server_statuses": statuses, "admitted_p50_ms": pct(ok, .5), "admitted_p99_ms": pct(ok, .99),
            "refused_p50_ms": pct(refused, .5), "refused_p99_ms": pct(refused, .99),
            "wrk_p50_ms_all": r["p50_us"] / 1000, "wrk_p99_ms_all": r["p99_us"] / 1000, "server_exit_code": code}


def admission(statuses: dict[str, int], seconds: float) -> dict:
    """Accepted requests/s and the share answered 429, from the server's own count of the answers
    it sent in the window (wrk counts only the requests it saw complete: an admitted request
    that waits longer than the window is never counted there)."""
    answered = sum(statuses.values())
    return {"accepted_per_s": statuses.get("200", 0) / seconds, "share_429": statuses.get("429", 0) / max(answered, 1)}


def batch_counters(url: str) -> dict:
    text = httpx.get(url + "/metrics").text
    get = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
           if line.startswith(("adl_batch_texts_sum", "adl_batch_texts_count", "adl_batch_seconds_sum"))}
    return {"batches": int(get["adl_batch_texts_count"]), "texts": get["adl_batch_texts_sum"],
            "batch_seconds": get["adl_batch_seconds_sum"]}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds used so far by each thread of process ``pid`` (Linux /proc)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        out[tid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def level(url: str, pid: int, texts: list[str], concurrency: int, seconds: int, work: Path) -> dict:
    """One concurrency level, with what the server did meanwhile: its backbone calls (count, texts,
    seconds) and the CPU its event loop (the main thread) and the rest of its threads used."""
    counted, cpu = batch_counters(url), thread_cpu(pid)
    r = load(url, texts, concurrency, seconds, work)
    after, cpu_after = batch_counters(url), thread_cpu(pid)
    wall = seconds + 2  # wrk's warm-up included: the counters saw it too
    n = after["batches"] - counted["batches"]
    used = {tid: cpu_after[tid] - cpu.get(tid, 0.0) for tid in cpu_after}
    main = used.pop(str(pid), 0.0)
    return {**r, "batches": n, "mean_texts_per_batch": (after["texts"] - counted["texts"]) / max(n, 1),
            "mean_batch_ms": 1000 * (after["batch_seconds"] - counted["batch_seconds"]) / max(n, 1),
            "backbone_busy": (after["batch_seconds"] - counted["batch_seconds"]) / wall,
            "cores_event_loop": main / wall, "cores_other_threads": sum(used.values()) / wall}


def screenshot(work: Path, path: Path) -> None:
    from playwright.sync_api import sync_playwright

    runs = [r for r in (work / "runs" / "sentiment", work / "runs" / "ner") if (r / "metrics.json").is_file()]
    proc, url = start_server(runs)
    text = "Just watched the new Batman movie with Sarah in London, absolutely loved it!"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1000, "height": 640}, device_scale_factor=1)
            page.goto(url + "/?" + str(httpx.QueryParams({"text": text})))
            page.wait_for_selector("body[data-state=done]", timeout=120_000)
            page.screenshot(path=str(path), full_page=True)
            browser.close()
    finally:
        stop_server(proc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/serve-bench")
    ap.add_argument("--n", type=int, default=256, help="distinct real tweets")
    ap.add_argument("--seconds", type=int, default=15, help="timed load per concurrency level (wrk -d)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of offline + server at 1, 8, 32")
    ap.add_argument("--screenshot", default=None)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench/serve.py needs wrk, the load generator: apt-get install wrk")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    setup(work)
    run = work / "runs" / "sentiment"
    texts = tweets(args.n)
    t0, load_avg = time.perf_counter(), [os.getloadavg()[0]]
    predictors = {"defaults": Predictor([run], device="cpu"), "as served": for_serving(Predictor([run], device="cpu"))}
    proc, url = start_server([run])
    rounds = []
    try:
        for i in range(args.rounds):  # offline and server alternate, so a slower minute hits both sides
            off = single(predictors["defaults"], texts)
            by = {c: level(url, proc.pid, texts, c, args.seconds, work) for c in LEVELS[:-1]}
            off["batched_before"] = batched(predictors, texts, args.seconds)
            by[32] = level(url, proc.pid, texts, 32, args.seconds, work)
            off["batched_after"] = batched(predictors, texts, args.seconds)
            reference = (off["batched_before"]["best"] + off["batched_after"]["best"]) / 2
            groups = (off["batched_before"]["as served, groups of 32"] + off["batched_after"]["as served, groups of 32"]) / 2
            off["batched_texts_per_s"], off["groups_of_32_texts_per_s"] = reference, groups
            print(json.dumps({"round": i, "offline": off, "server": by}), flush=True)
            rounds.append({"offline": off, "server": list(by.values()),
                           "throughput_c32_over_offline": by[32]["requests_per_s"] / reference,
                           "throughput_c32_over_groups_of_32": by[32]["requests_per_s"] / groups,
                           "groups_of_32_over_offline": groups / reference,
                           "p50_c1_minus_bare_single_ms": by[1]["p50_ms"] - off["bare_single_forward_ms"]})
            load_avg.append(os.getloadavg()[0])
    finally:
        code = stop_server(proc)
    over = overload(run, texts, args.seconds, work)
    print(json.dumps({"overload": over}), flush=True)
    ratio = statistics.median(r["throughput_c32_over_offline"] for r in rounds)
    own = statistics.median(r["throughput_c32_over_groups_of_32"] for r in rounds)
    composition = statistics.median(r["groups_of_32_over_offline"] for r in rounds)
    extra = statistics.median(r["p50_c1_minus_bare_single_ms"] for r in rounds)
    result = {
        "rounds": rounds, "server_exit_code": code, "overload": over,
        "throughput_c32_over_offline": ratio, "p50_c1_minus_bare_single_ms": extra,
        "throughput_c32_over_groups_of_32": own, "groups_of_32_over_offline": composition,
        "summary": SUMMARY,
        "targets": {"throughput_c32_over_offline": ">= 0.8", "p50_c1_minus_bare_single_ms": "<= 10",
                    "throughput_c32_over_groups_of_32": ">= 0.9"},
        "n_texts": len(texts), "seconds_per_level": args.seconds, "load_generator": "wrk -t1 (Debian wrk 4.1)",
        "seconds": time.perf_counter() - t0, "load_average_1min": load_avg,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "command": "bench/serve.py " + " ".join(sys.argv[1:]),
    }
    if args.screenshot:
        screenshot(work, Path(args.screenshot))
    out = ROOT / "bench" / "results" / "serve.json"
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(table(rounds))
    print(f"throughput at 32 / offline batched: {ratio:.2f}x (target >= 0.8), per round: "
          + ", ".join(f"{r['throughput_c32_over_offline']:.2f}" for r in rounds))
    print(f"  of which: the server against the Predictor on random groups of 32 of the same texts {own:.2f}x; "
          f"those groups against the whole set at once {composition:.2f}x")
    print(f"p50 at 1 - bare single forward: {extra:+.1f} ms (target <= +10), per round: "
          + ", ".join(f"{r['p50_c1_minus_bare_single_ms']:+.1f}" for r in rounds))
    print(f"overload (c{over['concurrency']}, {over['max_concurrent_requests']} admitted): "
          f"{over['accepted_per_s']:.1f} accepted req/s, {100 * over['share_429']:.1f}% answered 429; admitted p50 "
          f"{over['admitted_p50_ms']} ms, p99 {over['admitted_p99_ms']} ms; refused p50 {over['refused_p50_ms']} ms, "
          f"p99 {over['refused_p99_ms']} ms (server side)")
    print(f"wrote {out}")


def table(rounds: list[dict]) -> str:
    """Markdown: per round, the offline reference and the three levels."""
    lines = ["| round | concurrency | req/s | p50 ms | p95 | p99 | texts/batch | ms/batch | backbone busy | "
             "event loop (cores) | offline texts/s | bare forward ms |", "|---|" * 1 + "---|" * 11]
    for i, r in enumerate(rounds):
        o = r["offline"]
        for lv in r["server"]:
            lines.append(f"| {i} | {lv['concurrency']} | {lv['requests_per_s']:.1f} | {lv['p50_ms']:.1f} | "
                         f"{lv['p95_ms']:.1f} | {lv['p99_ms']:.1f} | {lv['mean_texts_per_batch']:.1f} | "
                         f"{lv['mean_batch_ms']:.1f} | {100 * lv['backbone_busy']:.0f}% | {lv['cores_event_loop']:.2f} | "
                         f"{o['batched_texts_per_s']:.1f} | {o['bare_single_forward_ms']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
