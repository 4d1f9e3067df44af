"""Serve a trained model over HTTP: ``python -m seq2seq.serve ckpt=PATH [port=8000] [host=127.0.0.1]``;
``--help`` lists the options (conf/serve.yaml: translate.py's decoding options, the address, limits).

The port is taken and the options checked before the model loads, so a mistake fails in a second.
SIGTERM and Ctrl-C (SIGINT) stop accepting, finish the requests in flight (at most
``shutdown_timeout`` seconds), then exit as a signalled process does: killed by SIGTERM, 130 after Ctrl-C.
"""

from __future__ import annotations

import logging
import math
import socket
import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from seq2seq.checkpoints import require_file
from seq2seq.cli import EXIT_SIGINT, command, quiet_third_party, reject_added_keys, run_cli
from seq2seq.decoding import DecodingSettings
from seq2seq.errors import UserError, is_int, is_number
from seq2seq.serve.auth import ApiKeys

log = logging.getLogger("seq2seq.serve")


def check_options(cfg: DictConfig) -> list[str]:
    """The checkpoints, with every server option checked (the limits are checked with the model)."""
    paths = [cfg.ckpt] if isinstance(cfg.ckpt, str) else list(cfg.ckpt)
    for path in paths:
        require_file(path)
    if not (is_int(cfg.port) and 0 <= cfg.port <= 65535):
        raise UserError(f"port must be an integer from 0 to 65535, got {cfg.port!r}")
    for name in ("batch_window_ms", "shutdown_timeout"):
        if not (is_number(cfg[name]) and 0 <= cfg[name] < math.inf):
            raise UserError(f"{name} must be a number >= 0, got {cfg[name]!r}")
    if not (is_int(cfg.round_batches) and cfg.round_batches >= 1):
        raise UserError(f"round_batches must be an integer of at least 1, got {cfg.round_batches!r}")
    origins = OmegaConf.to_container(cfg.cors_origins) if OmegaConf.is_list(cfg.cors_origins) else None
    if origins is None or not all(isinstance(o, str) for o in origins):
        raise UserError(f"cors_origins must be a list of origins, e.g. ['*'], got {cfg.cors_origins!r}")
    return paths


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one), or a one-line error saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog from now on, until the server accepts them
    except OSError as err:
        hint = " (another server has it: choose another with port=N)" if port else ""
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}{hint}") from None
    return sock


@hydra.main(version_base="1.3", config_path="../../conf", config_name="serve")
@command
def main(cfg: DictConfig) -> None:
    reject_added_keys(cfg)  # the options are those of its config: +beems=5 is a typo
    paths = check_options(cfg)
    defaults = DecodingSettings.from_config(cfg)  # translate.py's settings; alpha=auto: the checkpoint's
    keys = ApiKeys(cfg.api_keys_file)
    sock = listen(cfg.host, cfg.port)
    try:
        import uvicorn

        from seq2seq.serve.app import create_app
    except ImportError as err:
        raise UserError(
            f"the server needs the serve extra ({err.name} is missing): pip install -e '.[serve]'"
        ) from None
    from seq2seq.serve.batching import decoding_thread
    from seq2seq.serve.protocol import Limits, RequestError
    from seq2seq.serve.service import TranslationService
    from seq2seq.translator import Translator

    quiet_third_party()
    started = time.perf_counter()
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    thread = decoding_thread()  # loads and decodes: the process's one thread that runs torch
    translator = thread.submit(Translator.from_checkpoints, paths, device, cfg.precision).result()
    limits = Limits.from_config(cfg, translator.max_src_len)
    try:
        limits.check_settings(defaults)
    except RequestError as err:  # the server's own settings break its own limits
        raise UserError(f"the decoding options: {err.message}") from None
    service = TranslationService(
        paths,
        translator,
        defaults,
        limits,
        window=cfg.batch_window_ms / 1000,
        round_batches=cfg.round_batches,
        thread=thread,
        languages=(cfg.source_lang, cfg.target_lang),
    )
    source, target = service.languages
    log.info(
        "%s loaded in %.1f s (%s to %s, %s on %s)%s",
        ", ".join(paths),
        time.perf_counter() - started,
        source or "?",
        target or "?",
        translator.precision,
        translator.device,
        "; API keys required" if keys.required else "",
    )
    app = create_app(service, keys, list(cfg.cors_origins))
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=sock.getsockname()[1],  # port=0: the one the system chose, for uvicorn's start-up line
        log_config=None,  # Hydra's logging (stderr)
        access_log=cfg.access_log,
        timeout_graceful_shutdown=cfg.shutdown_timeout,
    )
    address = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    log.info("Serving on http://%s:%d/ (Ctrl-C stops)", address, config.port)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has finished the requests in flight
        print("Stopped (Ctrl-C) after the requests in flight", file=sys.stderr)
        sys.exit(EXIT_SIGINT)


if __name__ == "__main__":
    run_cli(main)
