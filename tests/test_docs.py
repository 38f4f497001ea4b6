"""The documentation stays true: every `sparsedist ...` / `python -m sparsedist ...` command line in the
README and docs/ parses with the CLI's own parser, and every preset, space file and repository path it
names exists."""

import re
import shlex
from pathlib import Path

import pytest

from sparsedist.cli import build_parser
from sparsedist.config import preset_names

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:^|[\s`(])(?:\S*/)?(?:sparsedist|python3? -m sparsedist)\s+(?=[a-z-])")
FENCE = re.compile(r"^```.*?$(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]*sparsedist [^`\n]*)`")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*(\.\.\.)?$|^<.*>$|\$|\.\.\.")  # BASE, SOURCE, DIR..., <name>, $PWD/, tune_spaces/...


def command_lines(text: str) -> list[tuple[str, str]]:
    """(where, command) for the sparsedist command lines of a markdown text: in code blocks ("block",
    continuation lines joined) and in inline code ("inline"); optional parts written `[...]` and trailing
    comments are left out."""
    found = [("block", line) for block in FENCE.findall(text) for line in block.replace("\\\n", " ").splitlines()]
    found += [("inline", fragment) for fragment in INLINE.findall(text)]
    commands = []
    for where, line in found:
        match = COMMAND.search(line)
        if match is None or "import sparsedist" in line:
            continue
        rest = re.sub(r"\s#.*$", "", line[match.end():])
        rest = re.sub(r"\[[^\]]*\]", " ", rest).split("|")[0].split("&&")[0].split(">")[0]
        commands.append((where, rest.strip()))
    return commands


def documented_commands() -> list[tuple[str, str, str]]:
    return [(document.name, where, command) for document in DOCUMENTS
            for where, command in command_lines(document.read_text())]


def named_things(args) -> list[tuple[str, str]]:
    """(kind, name) of what a parsed command names that must exist."""
    named = [("config", c) for c in getattr(args, "config", None) or []]
    if getattr(args, "space", None):
        named.append(("path", args.space))
    return [(kind, name) for kind, name in named if not PLACEHOLDER.search(name) and "://" not in name]


def test_the_documents_hold_command_lines():
    assert len(documented_commands()) >= 40  # the extraction finds them: README and docs/ are full of them


def parse(argv: list[str]):
    """The parsed arguments, or the exit code argparse stopped with (0 for --version and --help)."""
    try:
        return build_parser(argv).parse_args(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("document, where, command", documented_commands(), ids=lambda value: str(value)[:60])
def test_every_documented_command_parses_and_names_what_exists(document, where, command):
    argv = shlex.split(command)
    args = parse(argv)
    if args != 0 and where == "inline" and all(re.fullmatch(r"[a-z]+", word) for word in argv):
        args = parse([*argv, "--help"])  # a mention of a command (`sparsedist eval`): the command exists
    assert args is not None and not isinstance(args, int) or args == 0, (
        f"{document}: `sparsedist {command}` does not parse (exit {args})")
    if isinstance(args, int):
        return
    for kind, name in named_things(args):
        exists = name in preset_names() or (REPO / name).is_file() if kind == "config" else (REPO / name).is_file()
        assert exists, f"{document}: `sparsedist {command}` names {kind} {name!r}, which does not exist"
