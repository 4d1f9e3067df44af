"""The documentation's commands and links stay true to the code.

Every `python train.py`, `python -m seq2seq.prepare`, `python translate.py` and `python -m seq2seq.serve`
command in a shell block of README.md or docs/ has its overrides composed with the config it names, so
an unknown key or a missing group option fails naming the page and line; every relative link points to
a file (and a heading) that exists.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

import seq2seq  # noqa: F401  (registers the decoding group's base node in Hydra's ConfigStore)

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
# The words after `python` that start a command, and the config (conf/NAME.yaml) it composes.
COMMANDS = {
    ("train.py",): "config",
    ("-m", "seq2seq.prepare"): "prepare",
    ("translate.py",): "translate",
    ("-m", "seq2seq.serve"): "serve",
}
SHELL_OPERATOR = re.compile(r"^[();<>|&]+$")
# Values a reader fills in: outputs/.../x.ckpt, best-step…-bleu….ckpt, ${SLURM_JOB_ID}, $N.
PLACEHOLDER = re.compile(r"\.\.\.|…|\$")
FENCE = re.compile(r"^\s*(`{3,})\s*([\w+-]*)")


@dataclass(frozen=True)
class DocCommand:
    """One command of a shell block: where it is, which config it composes, its overrides."""

    where: str  # page:line, the line where the command starts
    config_name: str
    overrides: tuple[str, ...]


def fenced_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number of the first line inside, language, lines) of each fenced code block."""
    blocks, lines = [], text.split("\n")
    number = 0
    while number < len(lines):
        opening = FENCE.match(lines[number])
        number += 1
        if not opening:
            continue
        fence, language, start, body = opening.group(1), opening.group(2).lower(), number + 1, []
        while number < len(lines) and not lines[number].strip().startswith(fence):
            body.append(lines[number])
            number += 1
        number += 1  # the closing fence
        blocks.append((start, language, body))
    return blocks


def shell_lines(start: int, body: list[str]) -> list[tuple[int, str]]:
    """(line number, logical line) of a shell block: continuation lines joined, console prompts removed."""
    logical, pending, pending_start = [], "", start
    for number, line in enumerate(body, start):
        if not pending:
            pending_start = number
            line = line.removeprefix("$ ")
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append((pending_start, pending + line))
        pending = ""
    if pending:
        logical.append((pending_start, pending))
    return logical


def command_overrides(words: list[str]) -> tuple[str, tuple[str, ...]] | None:
    """(config name, checkable overrides) of a shell line that runs one of COMMANDS, else None."""
    for position, word in enumerate(words):
        if not (word == "python" or word.endswith("/python")):
            continue
        after = words[position + 1 :]
        started = [
            (name, after[len(head) :]) for head, name in COMMANDS.items() if tuple(after[: len(head)]) == head
        ]
        if not started:
            continue
        config_name, arguments = started[0]
        overrides = []
        for argument in arguments:
            if SHELL_OPERATOR.match(argument):
                break  # a pipe or redirection: the command's arguments end here
            overrides.extend(checkable(argument))
        return config_name, tuple(overrides)
    return None


def checkable(argument: str) -> list[str]:
    """The override to compose for one command-line word: none for flags (-m, --help), a bare `...`,
    and Hydra's own keys (hydra.run.dir, hydra/launcher: the launcher plugins are optional extras); a
    placeholder value replaced by a word, so that the key is still checked; a sweep's first value."""
    key, equals, value = argument.partition("=")
    if argument.startswith("-") or not equals or key.lstrip("+~").startswith(("hydra.", "hydra/")):
        return []
    if PLACEHOLDER.search(value):
        return [f"{key}=placeholder"]
    (override,) = OverridesParser.create().parse_overrides([argument])
    if override.is_sweep_override():
        return [f"{key}={next(iter(override.sweep_string_iterator()))}"]
    return [argument]


def doc_commands() -> list[DocCommand]:
    """Every command of COMMANDS in the shell blocks of README.md and docs/."""
    commands = []
    for page in PAGES:
        for start, language, body in fenced_blocks(page.read_text(encoding="utf-8")):
            if language not in SHELL_LANGUAGES:
                continue
            for number, line in shell_lines(start, body):
                found = command_overrides(shlex.split(line, comments=True))
                if found:
                    where = f"{page.relative_to(REPO)}:{number}"
                    commands.append(DocCommand(where, *found))
    return commands


def compose_command(command: DocCommand) -> None:
    """Compose the command's config with its overrides; an error names the page and line."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(command.config_name, overrides=list(command.overrides), return_hydra_config=True)
    except Exception as error:  # any composition failure is the doc's mistake, reported as such
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise AssertionError(f"{command.where}: {' '.join(command.overrides)}: {message}") from error


DOC_COMMANDS = doc_commands()


def test_the_docs_show_each_command_with_overrides():
    names = {command.config_name for command in DOC_COMMANDS}
    assert names == {"config", "prepare", "translate", "serve"}
    assert any(command.where.startswith("README.md:") for command in DOC_COMMANDS)
    # The data page's command for your own files, with its continuation lines joined.
    assert any(
        command.where.startswith("docs/data.md:") and "data.corpus.test_tgt=test.en" in command.overrides
        for command in DOC_COMMANDS
    )


@pytest.mark.parametrize("command", DOC_COMMANDS, ids=[command.where for command in DOC_COMMANDS])
def test_a_doc_command_composes_with_the_config(command):
    compose_command(command)


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("python train.py model=huge", "model"),
        ("python train.py trainer.no_such_key=1", "no_such_key"),
        ("cat x | python translate.py ckpt=... nosuch=1 > y", "nosuch"),
    ],
)
def test_an_unknown_key_or_group_option_fails_naming_the_line(line, complaint):
    config_name, overrides = command_overrides(shlex.split(line, comments=True))
    with pytest.raises(AssertionError, match=rf"^page.md:7: .*{complaint}"):
        compose_command(DocCommand("page.md:7", config_name, overrides))


def test_placeholders_flags_hydra_keys_and_sweeps_are_read_as_a_reader_would():
    line = (
        "OMP_NUM_THREADS=1 srun python train.py -m trainer=ddp ... ckpt_path=outputs/DATE/.../last.ckpt "
        "hydra.run.dir=outputs/slurm-${SLURM_JOB_ID} hydra/launcher=slurm model.dropout=0.1,0.3 "
        "'logger=[csv,tensorboard]' > log  # a comment"
    )
    assert command_overrides(shlex.split(line, comments=True)) == (
        "config",
        ("trainer=ddp", "ckpt_path=placeholder", "model.dropout=0.1", "logger=[csv,tensorboard]"),
    )
    assert shell_lines(3, ["$ python train.py a=1 \\", "  b=2", "python translate.py"]) == [
        (3, "python train.py a=1    b=2"),
        (5, "python translate.py"),
    ]


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown page (outside code blocks)."""
    anchors, seen, fence = set(), {}, None
    for line in text.split("\n"):
        opening = FENCE.match(line)
        if opening and (fence is None or opening.group(1).startswith(fence)):
            fence = None if fence else opening.group(1)
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fence or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def prose(text: str) -> str:
    """The page without its fenced code blocks and inline code, where brackets are not links."""
    without_blocks = re.sub(r"^\s*(`{3,}).*?^\s*\1\s*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", without_blocks)


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(REPO)) for page in PAGES])
def test_every_relative_link_points_to_a_file_and_heading_that_exist(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no file {linked.relative_to(REPO)})")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text("utf-8")):
            broken.append(f"{target} (no heading #{anchor} in {linked.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {', '.join(broken)}"


# What the pages state about the default configuration, each phrase with the figures filled in from the
# config (and the model it builds): a changed default fails here, naming the page that still says the old.
BIBLE_VERSES = 31_102  # every version of the Bible package has all of them (docs/data.md)
STATED = [
    (
        "README.md",
        "({training:,} training verses, {valid:,} each for validation and test), the `small` model",
    ),
    ("README.md", "the `small` model on the CPU, for {minutes:g} minutes"),
    ("docs/training.md", "{training:,} training verses with {valid:,} held out for validation"),
    ("docs/training.md", "a joint {vocab:,}-piece sentencepiece vocabulary"),
    ("docs/training.md", "stops itself after {minutes:g} minutes of training"),
    ("docs/training.md", "`small` (CPU default: embeddings {embed}, hidden {hidden}, {layers} layer,"),
    ("docs/training.md", "{batch_tokens:,}-token batches, {vocab:,} pieces for the Bible"),
    (
        "docs/training.md",
        "(embeddings {embed}, `module.optimizer.lr={lr}`, label smoothing {smoothing}, dropout {dropout}:",
    ),
    ("docs/training.md", "`trainer.val_check_interval` batches, {val_interval} by default"),
    ("docs/training.md", "make 643 batches of the default {batch_tokens:,} tokens"),
    ("docs/training.md", "`last.ckpt` every {last_every} steps"),
    (
        "docs/clusters.md",
        "| {gpu_batch_tokens} | padded tokens per batch and GPU (the CPU default is {batch_tokens})",
    ),
    ("docs/clusters.md", "| `trainer.val_check_interval` | {gpu_val_interval} batches |"),
    ("docs/clusters.md", "`checkpoints/last.ckpt` is written every {last_every} steps"),
    ("docs/clusters.md", "({parameters_m:.2f}M parameters, joint vocabulary of {vocab:,})"),
    ("docs/clusters.md", "the CPU default stops after {minutes:g} minutes"),
    ("docs/data.md", "`data=files` asks sentencepiece for {files_vocab:,} pieces"),
    ("docs/data.md", "twice the Bible default's {vocab:,}"),
]


def default_parameters(model: dict, vocab: int) -> int:
    from seq2seq.model import Seq2Seq  # torch: only for the tests that build the model

    return sum(p.numel() for p in Seq2Seq(vocab, vocab, **model).parameters())


@pytest.fixture(scope="module")
def figures() -> dict[str, object]:
    """The default configuration's figures that the pages state."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg, gpu, files = (compose("config", overrides=o) for o in ([], ["trainer=gpu"], ["data=files"]))
    assert cfg.data.subword.joint  # "a joint ... vocabulary"
    days, hours, minutes, seconds = (int(part) for part in cfg.trainer.max_time.split(":"))
    vocab, corpus = cfg.data.subword.vocab_size, cfg.data.corpus
    return {
        "vocab": vocab,
        "files_vocab": files.data.subword.vocab_size,
        "valid": corpus.valid_size,
        "training": BIBLE_VERSES - corpus.valid_size - corpus.test_size,
        "minutes": (days * 24 + hours) * 60 + minutes + seconds / 60,
        "embed": cfg.model.embed_size,
        "hidden": cfg.model.hidden_size,
        "layers": cfg.model.num_layers,
        "lr": cfg.module.optimizer.lr,
        "smoothing": cfg.module.label_smoothing,
        "dropout": cfg.model.dropout,
        "batch_tokens": cfg.data.batch_tokens,
        "gpu_batch_tokens": gpu.data.batch_tokens,
        "val_interval": cfg.trainer.val_check_interval,
        "gpu_val_interval": gpu.trainer.val_check_interval,
        "last_every": cfg.callbacks.last_checkpoint.every_n_train_steps,
        "parameters": (parameters := default_parameters(dict(cfg.model), vocab)),
        "parameters_m": parameters / 1e6,
    }


def flowing(page: str) -> str:
    """The page's text with each run of whitespace (line breaks included) as one space."""
    return re.sub(r"\s+", " ", (REPO / page).read_text(encoding="utf-8"))


@pytest.mark.parametrize(("page", "phrase"), STATED, ids=[f"{page}:{phrase[:40]}" for page, phrase in STATED])
def test_the_docs_state_the_default_configs_figures(figures, page, phrase):
    expected = phrase.format(**figures)
    stated = expected in flowing(page)
    assert stated, f"{page} should say: {expected}"


def test_the_checkpoint_sizes_stated_follow_from_the_default_models_parameters(figures):
    """last.ckpt holds the fp32 weights and AdamW's two fp32 moments, a best checkpoint the weights alone;
    both also hold the sentencepiece model and the run's config (0.5 MB for the default, measured)."""
    sizes = re.search(
        r"`last\.ckpt` is ([\d.]+) MB and a best checkpoint ([\d.]+) MB", flowing("docs/clusters.md")
    )
    assert sizes, "docs/clusters.md no longer states the checkpoint sizes"
    last, best = (float(size) * 1e6 for size in sizes.groups())
    weights = 4 * figures["parameters"]
    assert 0 < best - weights < 1e6, (
        f"a best checkpoint: {weights / 1e6:.1f} MB of weights and under 1 MB more"
    )
    assert 0 < last - 3 * weights < 1e6, f"last.ckpt: {3 * weights / 1e6:.1f} MB and under 1 MB more"
