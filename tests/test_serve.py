"""The server (python -m seq2seq.serve) over real HTTP on 127.0.0.1, on a tiny trained attention model:
answers equal translate.py's, batching, refusals, LibreTranslate's shape, API keys, SIGTERM and SIGINT."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from seq2seq.translator import Translator  # noqa: E402
from tests.test_training import REPO, run_script  # noqa: E402

pytestmark = pytest.mark.slow

# Sentences of the synthetic reverse task, a blank and a white-space line, one longer than the model's
# 16 source subwords (translate.py truncates it, with a warning), unknown words and a stray CR.
LINES = [
    "w1 w2 w3",
    "w4 w5 w6 w7 w8",
    "",
    "   ",
    " ".join(f"w{i % 20}" for i in range(40)),
    "w3 w3 w9 w12",
    "w19 w0 w5",
    "unknown zz w2",
    "w7\r",
    "w10 w11 w12 w13 w14 w15 w16",
    "w2",
]
# The test server's settings (and translate.py's, compared): small batches, so that a request of many
# lines takes several decoding rounds; no int8, whose activations are quantized with a scale per batch,
# so that a line's translation would depend on the lines decoded with it (in translate.py as here).
SETTINGS = ["beam=3", "batch_tokens=120", "precision=fp32", "quantize=none"]


class Server:
    """``python -m seq2seq.serve`` in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, checkpoint: Path, log: Path, *options: str) -> None:
        self.log = log
        command = [sys.executable, "-m", "seq2seq.serve", f"ckpt={checkpoint}", "port=0", "access_log=false"]
        with open(log, "w") as stderr:
            self.process = subprocess.Popen(
                [*command, *options],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, "HYDRA_FULL_ERROR": "0"},
            )
        deadline = time.monotonic() + 120
        while not (found := re.search(r"Serving on (http://127\.0\.0\.1:\d+)/", log.read_text())):
            assert self.process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        self.url = found.group(1)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        while self.client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)

    def translate(self, **body) -> httpx.Response:
        return self.client.post("/translate", json=body)

    def stop(self, how: signal.Signals = signal.SIGTERM) -> int:
        """Send ``how``; the exit status (negative: killed by that signal)."""
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(how)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(served_checkpoint, tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    running = Server(
        served_checkpoint,
        log,
        *SETTINGS,
        "batch_window_ms=50",
        "max_lines=200",
        "max_bytes=20000",
        "source_lang=de",
        "target_lang=en",
    )
    yield running
    running.stop()


def run_serve(*options: str) -> subprocess.CompletedProcess:
    """``python -m seq2seq.serve`` expected to stop by itself (a mistake): a minute at most."""
    return subprocess.run(
        [sys.executable, "-m", "seq2seq.serve", *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )


def translate_py(checkpoint: Path, lines: list[str], folder: Path, *options: str) -> list[str]:
    """translate.py's output lines for ``lines``."""
    source, output = folder / "in.txt", folder / "out.txt"
    source.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    result = run_script(
        "translate.py",
        f"ckpt={checkpoint}",
        f"input={source}",
        f"output={output}",
        "progress=false",
        *options,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return output.read_text(encoding="utf-8").splitlines()


def test_each_answer_is_what_translate_py_writes_for_that_line(server, served_checkpoint, tmp_path):
    expected = translate_py(served_checkpoint, LINES, tmp_path, *SETTINGS)
    answer = server.translate(src=LINES)
    assert answer.status_code == 200, answer.text
    assert answer.json()["tgt"] == expected
    assert expected[2] == expected[3] == "" and expected[0] == "w3 w2 w1"  # the model has learned the task
    # Per-request settings, with the n-best lists and their scores (translate.py: "i ||| text ||| score").
    nbest = translate_py(served_checkpoint, LINES, tmp_path, *SETTINGS, "beam=2", "nbest=2", "alpha=0.5")
    answer = server.translate(src=LINES, beam=2, nbest=2, alpha=0.5).json()
    served = [
        f"{i} ||| {h['text']} ||| {h['score']:.4f}" for i, hyps in enumerate(answer["nbest"]) for h in hyps
    ]
    assert served == nbest
    assert answer["tgt"] == [hyps[0]["text"] for hyps in answer["nbest"]]


def test_concurrent_requests_are_decoded_together_each_answer_in_its_order(
    server, served_checkpoint, tmp_path
):
    expected = dict(zip(LINES, translate_py(served_checkpoint, LINES, tmp_path, *SETTINGS), strict=True))
    requests = [[LINES[(start + k) % len(LINES)] for k in range(start % 5 + 1)] for start in range(40)]
    before = server.client.get("/health").json()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda lines: server.translate(src=lines).json()["tgt"], requests))
    assert answers == [[expected[line] for line in lines] for lines in requests]
    after = server.client.get("/health").json()
    assert after["lines"] - before["lines"] == sum(map(len, requests))
    assert after["rounds"] - before["rounds"] < len(requests) / 2  # requests that came together met


# The short request with the long one's settings, and with others (the page asks for an n-best list):
# rounds used to serve only the oldest request's settings, so the second waited for all of the long one.
@pytest.mark.parametrize("short_settings", [{}, {"beam": 2, "nbest": 2}], ids=["same settings", "others"])
def test_a_long_request_does_not_hold_up_a_short_one(server, short_settings):
    long_lines = [f"w{i % 20} w{(i * 7) % 20} w{(i * 3) % 20} w5 w6 w7 w8 w9" for i in range(200)]
    timings: dict[str, float] = {}

    def send(name: str, lines: list[str], **settings) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert client.post("/translate", json={"src": lines, **settings}).status_code == 200
        timings[name] = time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        decoded = server.client.get("/health").json()["lines"]
        long = pool.submit(send, "long", long_lines)
        while server.client.get("/health").json()["lines"] == decoded:
            time.sleep(0.01)  # until the long request is being decoded, a round at a time
        assert not long.done(), "the long request finished too soon to test anything"
        pool.submit(send, "short", ["w1 w2 w3"], **short_settings).result()
        long.result()
    assert timings["short"] < timings["long"]


PAIR = {"source": "de", "target": "en"}
# (request, status, what the one-line error says). The server's limits: 200 lines, 20,000 bytes.
BAD_REQUESTS = [
    ({"content": b'{"src": ["w1"'}, 400, "malformed JSON"),
    ({"content": b""}, 400, "empty request"),
    ({"json": ["w1"]}, 400, "must be a JSON object"),
    ({"json": {"src": "w1 w2"}}, 400, "src must be a list of strings"),
    ({"json": {"src": ["w1", 3]}}, 400, "src[1] must be a string"),
    ({"json": {"src": ["w1\nw2"]}}, 400, "src[0] holds a line break"),
    ({"json": {"src": ["w1"] * 201}}, 413, "201 lines in one request; this server takes at most 200"),
    ({"json": {"src": ["w1 " * 7000]}}, 413, "at most 20000 (max_bytes)"),
    ({"json": {"src": ["w1"], "beem": 2}}, 400, "unknown key 'beem'; did you mean 'beam'?"),
    ({"json": {"src": ["w1"], "beam": 0}}, 400, "beam must be an integer of at least 1, got 0"),
    ({"json": {"src": ["w1"], "beam": 2, "nbest": 3}}, 400, "nbest must be between 1 and beam=2"),
    ({"json": {"src": ["w1"], "alpha": "high"}}, 400, "alpha must be a number >= 0 or 'auto'"),
    ({"json": {"src": ["w1"], "beam": 40}}, 400, "beam=40: this server allows at most 16"),
    ({"json": {"src": ["w1"], "max_len_b": 5000}}, 400, "this server allows at most 1024 (max_output_len)"),
    ({"json": {"src": ["w1"], "batch_tokens": 9}}, 400, "batch_tokens is the server's setting"),
    ({"json": {"src": ["w1"], "attention": "yes"}}, 400, "attention must be true or false"),
    ({"json": {"src": ["w1"], "text": ["w1"]}}, 400, "unknown key 'text'"),
    ({"json": {"source": "de"}}, 400, "needs src (a list of lines), or q in LibreTranslate's shape"),
    ({"json": {"q": "w1", "target": "en"}}, 400, "Invalid request: missing source parameter"),
    ({"json": {"q": "w1", "source": "fr", "target": "en"}}, 400, "translates de to en only, not fr to en"),
    ({"json": {"q": "w1", **PAIR, "format": "pdf"}}, 400, "pdf format is not supported"),
    ({"json": {"q": "w1", **PAIR, "alternatives": 3}}, 400, "below the beam size (3)"),
    ({"json": {"q": ["w1", 2], **PAIR}}, 400, "q must be a string or a list of strings"),
    ({"json": {"q": "w1", **PAIR, "apiKey": "k"}}, 400, "unknown key 'apiKey'; did you mean 'api_key'?"),
    ({"data": {"src": "w1"}}, 400, "src needs a JSON body"),
    # These five answered 500 (an exception escaped): a limit overflowed, or Python's own errors.
    ({"json": {"src": ["w1"], "max_len_a": 1e308}}, 400, "allow inf output subwords"),
    ({"content": b'{"q": "w1", "source": "de", "target": "en", "alternatives": 1e400}'}, 400, "not a number"),
    ({"content": b"[" * 5000}, 400, "malformed JSON: nested too deeply"),
    ({"content": b'{"src": ["w1 \\ud800"]}'}, 400, "src[0] holds a lone surrogate (character 3)"),
    ({"content": b'{"q": "\\ud800", "source": "de", "target": "en"}'}, 400, "q holds a lone surrogate"),
]


@pytest.mark.parametrize(("request_", "status", "message"), BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
def test_a_bad_request_gets_a_4xx_and_one_line_and_the_server_stays_up(server, request_, status, message):
    headers = {"Content-Type": "application/json"} if "content" in request_ else {}
    answer = server.client.post("/translate", headers=headers, **request_)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert message in error and "\n" not in error
    assert server.translate(src=["w1 w2 w3"]).json() == {"tgt": ["w3 w2 w1"]}


def test_wrong_routes_and_methods_answer_in_the_same_shape(server):
    assert server.client.get("/nowhere").json() == {"error": "Not Found"}
    assert server.client.get("/translate").status_code == 405


def test_attention_on_request_is_the_translators_alignment(server, served_checkpoint):
    answer = server.translate(src=["w1 w2 w3 w4", ""], beam=3, attention=True).json()
    alignment = Translator.from_checkpoint(served_checkpoint).align("w1 w2 w3 w4", server_settings())
    first = answer["attention"][0]
    assert first["source"] == alignment.source == ["▁w1", "▁w2", "▁w3", "▁w4"]
    assert first["target"] == alignment.target and first["target"][-1] == "</s>"
    assert len(first["weights"]) == len(first["target"]) and all(len(row) == 4 for row in first["weights"])
    assert all(abs(sum(row) - 1) < 1e-4 for row in first["weights"])
    assert answer["attention"][1] == {"source": [], "target": [], "weights": []}


def server_settings():
    from seq2seq.decoding import DecodingSettings

    return DecodingSettings(beam=3, batch_tokens=120)


def test_health_and_info_describe_the_model(server, served_checkpoint):
    assert server.client.get("/health").json()["status"] == "ok"
    info = server.client.get("/info").json()
    (checkpoint,) = info["checkpoints"]
    assert checkpoint["path"] == str(served_checkpoint.resolve())
    assert checkpoint["architecture"]["attention"] == "bahdanau" and info["attention"] is True
    assert checkpoint["training_data"]["task"] == "reverse" and checkpoint["step"] == 60
    assert checkpoint["scores"]["validation_bleu"] > 50  # from the run's result.json
    assert info["vocabulary"]["max_source_subwords"] == 16 and info["vocabulary"]["joint"] is True
    assert info["decoding"]["beam"] == 3 and info["decoding"]["alpha"] == "auto"
    assert info["languages"] == {"source": "de", "target": "en"} and info["precision"] == "fp32"


def test_libretranslate_clients_get_its_shapes(server):
    best = dict(zip(LINES, server.translate(src=LINES).json()["tgt"], strict=True))
    assert server.client.get("/languages").json() == [
        {"code": "de", "name": "German", "targets": ["en"]},
        {"code": "en", "name": "English", "targets": []},
    ]
    answer = server.client.post("/translate", json={"q": "w1 w2 w3", "source": "de", "target": "en"})
    assert answer.json() == {"translatedText": best["w1 w2 w3"]}
    # A list, source=auto, alternatives; a text of several lines is translated line by line.
    answer = server.client.post(
        "/translate",
        json={
            "q": ["w4 w5 w6 w7 w8", "w1 w2 w3\nw2"],
            "source": "auto",
            "target": "en",
            "alternatives": 2,
            "api_key": "",
        },
    ).json()
    assert answer["translatedText"] == [best["w4 w5 w6 w7 w8"], f"{best['w1 w2 w3']}\n{best['w2']}"]
    assert answer["detectedLanguage"] == [{"confidence": 100.0, "language": "de"}] * 2
    assert len(answer["alternatives"]) == 2 and all(len(a) <= 2 for a in answer["alternatives"])
    for text, alternatives in zip(answer["translatedText"], answer["alternatives"], strict=True):
        assert text not in alternatives and len(set(alternatives)) == len(alternatives)
    # Form fields, as LibreTranslate also takes them: urlencoded and multipart.
    form = {"q": "w1 w2 w3", "source": "de", "target": "en"}
    assert server.client.post("/translate", data=form).json() == {"translatedText": best["w1 w2 w3"]}
    multipart = server.client.post("/translate", data=PAIR, files={"q": (None, "w1 w2 w3")})
    assert multipart.json() == {"translatedText": best["w1 w2 w3"]}
    # HTML: the text between tags translated, the tags kept, scripts left alone.
    html = '<p class="x">w1 w2 w3</p> <b>w2</b><script>w1 w2</script>'
    answer = server.client.post(
        "/translate", json={"q": html, "source": "de", "target": "en", "format": "html"}
    )
    expected = f'<p class="x">{best["w1 w2 w3"]}</p> <b>{best["w2"]}</b><script>w1 w2</script>'
    assert answer.json() == {"translatedText": expected}


def test_api_keys_guard_every_route_but_health(served_checkpoint, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("\ufeffsecret-1\n# our clients\n\n", encoding="utf-8")  # saved with a byte order mark
    server = Server(served_checkpoint, tmp_path / "server.log", f"api_keys_file={keys}")
    try:
        client = server.client
        assert client.get("/health").status_code == 200
        for path in ("/", "/info", "/languages"):
            assert client.get(path).status_code == 403
            assert client.get(path, headers={"Authorization": "Bearer secret-1"}).status_code == 200
        assert client.get("/?api_key=secret-1").status_code == 200  # how the page is opened
        refused = server.translate(src=["w1"])
        assert refused.status_code == 403 and "API key" in refused.json()["error"]
        assert server.translate(src=["w1"], api_key="wrong").status_code == 403
        assert server.translate(src=["w1"], api_key="secret-1").status_code == 200
        # Without a key, a malformed body learns nothing; LibreTranslate's form field is a key too.
        assert (
            client.post("/translate", content=b"{", headers={"Content-Type": "application/json"}).status_code
            == 403
        )
        no_boundary = {"Content-Type": "multipart/form-data"}  # the form parser's own refusal
        assert client.post("/translate", content=b"q=w1", headers=no_boundary).status_code == 403
        surrogate = b'{"src": ["w1"], "api_key": "\\udc80"}'
        json_type = {"Content-Type": "application/json"}
        assert client.post("/translate", content=surrogate, headers=json_type).status_code == 403
        form = {"q": "w1", "source": "auto", "target": "en", "api_key": "secret-1"}
        # This model's languages are unknown (the toy corpus names none, and none were given).
        answer = client.post("/translate", data=form)
        assert answer.status_code == 400 and "source_lang=CODE" in answer.json()["error"]
        keys.write_text("secret-2\n")  # read again when it changes: no restart
        time.sleep(0.01)
        assert server.translate(src=["w1"], api_key="secret-1").status_code == 403
        assert server.translate(src=["w1"], api_key="secret-2").status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize(("how", "status"), [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)])
def test_a_stop_signal_finishes_the_requests_in_flight_then_exits(served_checkpoint, tmp_path, how, status):
    server = Server(served_checkpoint, tmp_path / "server.log", *SETTINGS, "batch_tokens=60")
    lines = [f"w{i % 20} w{(i * 7) % 20} w{(i * 3) % 20} w5 w6 w7 w8 w9" for i in range(1000)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(
            lambda: httpx.post(f"{server.url}/translate", json={"src": lines}, timeout=120)
        )
        while server.client.get("/health").json()["lines"] == 0:
            time.sleep(0.02)
        assert not in_flight.done(), "the request finished before the signal: make it longer"
        assert server.stop(how) == status
        answer = in_flight.result()
    assert answer.status_code == 200 and len(answer.json()["tgt"]) == 1000
    log = (tmp_path / "server.log").read_text()
    assert "stopped after 1000 lines" in log and "Traceback" not in log


def test_the_command_answers_help_and_mistakes_in_one_line(served_checkpoint, tmp_path):
    help_text = run_serve("--help")
    assert (
        help_text.returncode == 0
        and "api_keys_file: null" in help_text.stdout
        and "beam: 5" in help_text.stdout
    )
    keys = tmp_path / "empty.txt"
    keys.write_text("# nobody yet\n")
    mistakes = {
        "ckpt=missing.ckpt": "Checkpoint not found: missing.ckpt",
        f"ckpt={served_checkpoint} +beems=3": "unknown option beems; did you mean beam?",
        f"ckpt={served_checkpoint} port=70000": "port must be an integer from 0 to 65535",
        f"ckpt={served_checkpoint} round_batches=0": "round_batches must be an integer of at least 1, got 0",
        f"ckpt={served_checkpoint} beam=0": "beam must be an integer of at least 1",
        f"ckpt={served_checkpoint} api_keys_file={keys}": "holds no key",
        f"ckpt={served_checkpoint} max_output_len=20": "this server allows at most 20 (max_output_len)",
    }
    for options, message in mistakes.items():
        result = run_serve("port=0", *options.split())
        assert result.returncode == 2 and message in result.stderr, (options, result.stderr[-2000:])
        assert result.stderr.count("error:") == 1


def test_a_port_in_use_is_a_one_line_error(server, served_checkpoint):
    port = server.url.rsplit(":", 1)[1]
    result = run_serve(f"ckpt={served_checkpoint}", f"port={port}")
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
