"""The server under load: N concurrent clients on 127.0.0.1 send a bounded number of requests, against
translate.py's batched file throughput on the same lines, in the same run.

    python bench/serve_load.py --ckpt outputs/.../checkpoints/best-....ckpt --input test.de \\
        [--limit 1000] [--clients 16] [--requests 10000] [--lines-per-request 1] [--server key=value]
        [key=value ...]

The ``key=value`` options go to both commands (decoding settings, ``precision``, ``device``);
``--server KEY=VALUE`` (repeatable) to the server only (``batch_window_ms``, ``round_batches``). First
``translate.py`` translates the ``--limit`` first lines of ``--input`` as a file, twice (its own report
gives the seconds spent translating, without loading the model); then ``python -m seq2seq.serve``
starts on a free port and ``--clients`` clients (asyncio tasks, each keeping its connection) send
``--requests`` requests of ``--lines-per-request`` consecutive lines each, going round the lines.
Every answer is checked against translate.py's lines: nothing lost, nothing reordered (with
``precision=fp32 quantize=none`` exactly; in bf16 or int8 a line's translation can follow the lines
decoded with it, in translate.py as in the server, and the answers that differ are counted). Prints
sentences/s, latency (p50, p99), the cores the server and the clients kept busy (on one machine they
share its cores), the server's decoding rounds (lines per round: how well requests met), its resident
memory after start-up and after each tenth of the requests, and the served throughput as a share of
translate.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]


def translate_file(ckpt: str, lines: list[str], folder: Path, options: list[str]) -> tuple[list[str], float]:
    """translate.py's translations of ``lines`` and its sentences/s (time spent translating)."""
    source, output = folder / "input.txt", folder / "output.txt"
    source.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    command = [sys.executable, "translate.py", f"ckpt={ckpt}", f"input={source}", f"output={output}"]
    result = subprocess.run([*command, "progress=false", *options], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"translate.py failed:\n{result.stderr[-2000:]}")
    rate = re.search(r"\(([\d.]+) sentences/s", result.stderr)
    assert rate, result.stderr[-2000:]
    return output.read_text(encoding="utf-8").splitlines(), float(rate.group(1))


def start_server(ckpt: str, options: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "seq2seq.serve", f"ckpt={ckpt}", "port=0", "access_log=false"]
    with open(log, "w") as stderr:
        process = subprocess.Popen([*command, *options], cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 300
    while not (found := re.search(r"Serving on (http://127\.0\.0\.1:\d+)/", log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)
    url = found.group(1)
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def megabytes(process: subprocess.Popen) -> float:
    return psutil.Process(process.pid).memory_info().rss / 2**20


def cpu_seconds(process: subprocess.Popen) -> float:
    times = psutil.Process(process.pid).cpu_times()
    return times.user + times.system


async def load(
    url: str, lines: list[str], expected: list[str], args: argparse.Namespace, server: subprocess.Popen
) -> dict:
    """Send the requests from ``args.clients`` clients; latencies, wrong answers and memory samples."""
    todo = iter(range(args.requests))
    latencies: list[float] = []
    wrong: list[int] = []  # answered, but not with translate.py's lines
    failed: list[int] = []  # an error, or not one translation per line
    memory: list[float] = []  # after each tenth of the requests
    tenth = max(1, args.requests // 10)

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            for request in todo:
                rows = [
                    (request * args.lines_per_request + k) % len(lines) for k in range(args.lines_per_request)
                ]
                started = time.perf_counter()
                answer = await http.post("/translate", json={"src": [lines[row] for row in rows]})
                latencies.append(time.perf_counter() - started)
                translations = answer.json()["tgt"] if answer.status_code == 200 else None
                if translations is None or len(translations) != len(rows):
                    failed.append(request)
                elif translations != [expected[row] for row in rows]:
                    wrong.append(request)
                if len(latencies) % tenth == 0:
                    memory.append(megabytes(server))

    rounds_before = httpx.get(f"{url}/health").json()["rounds"]
    started, cpu_started = time.perf_counter(), (time.process_time(), cpu_seconds(server))
    await asyncio.gather(*(client() for _ in range(args.clients)))
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "rounds": httpx.get(f"{url}/health").json()["rounds"] - rounds_before,
        "client_cores": (time.process_time() - cpu_started[0]) / seconds,
        "server_cores": (cpu_seconds(server) - cpu_started[1]) / seconds,
        "latencies": latencies,
        "wrong": wrong,
        "failed": failed,
        "memory": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--input", required=True, help="source lines (the test split's, e.g. test.src)")
    parser.add_argument("--limit", type=int, default=1000, help="the first N lines of --input")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--lines-per-request", type=int, default=1)
    parser.add_argument("--server", action="append", default=[], help="key=value for the server only")
    parser.add_argument("options", nargs="*", help="key=value for translate.py and the server alike")
    args = parser.parse_args()
    lines = Path(args.input).read_text(encoding="utf-8").splitlines()[: args.limit]

    with tempfile.TemporaryDirectory() as folder:
        # A first run builds what the translator builds on first use (a shortlist), not timed.
        translate_file(args.ckpt, lines[:10], Path(folder), args.options)
        # Twice: one run of a thousand lines lasts seconds, and its rate moves with the host by 5-10 %.
        expected, first_rate = translate_file(args.ckpt, lines, Path(folder), args.options)
        _, second_rate = translate_file(args.ckpt, lines, Path(folder), args.options)
        file_rate = (first_rate + second_rate) / 2
        print(
            f"translate.py: {len(lines)} lines, {first_rate:.1f} and {second_rate:.1f} sentences/s (batched"
            f" file; their mean, {file_rate:.1f}, is the reference)",
            flush=True,
        )
        server, url = start_server(args.ckpt, [*args.options, *args.server], Path(folder) / "server.log")
        try:
            started_mb = megabytes(server)
            result = asyncio.run(load(url, lines, expected, args, server))
        finally:
            server.terminate()
            server.wait(timeout=120)

    sentences = args.requests * args.lines_per_request
    rate = sentences / result["seconds"]
    latencies = sorted(result["latencies"])
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(
        f"served: {args.requests} requests of {args.lines_per_request} line(s) from {args.clients} clients in"
        f" {result['seconds']:.1f} s: {rate:.1f} sentences/s ({rate / file_rate:.0%} of translate.py's);"
        f" latency p50 {statistics.median(latencies) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"
    )
    print(
        f"CPU (cores busy on average): the server {result['server_cores']:.2f}, the clients (this process)"
        f" {result['client_cores']:.2f}; {result['rounds']} decoding rounds,"
        f" {sentences / max(result['rounds'], 1):.1f} lines a round"
    )
    tenths = " ".join(f"{mb:.0f}" for mb in result["memory"])
    print(
        f"server memory (RSS, MB): {started_mb:.0f} after start-up; after each tenth of the requests:"
        f" {tenths}"
    )
    wrong, failed = result["wrong"], result["failed"]
    equal = len(latencies) - len(wrong) - len(failed)
    print(f"answers: {equal} of {args.requests} equal to translate.py's lines, {len(failed)} failed")
    if wrong:
        # In bf16 or int8 a line's translation can follow the lines decoded with it (docs/translating.md);
        # precision=fp32 quantize=none makes this check exact.
        print(f"{len(wrong)} answers differ from translate.py's, e.g. request {wrong[0]}")
    if failed:
        sys.exit(f"{len(failed)} requests failed or lost lines, e.g. request {failed[0]}")


if __name__ == "__main__":
    main()
