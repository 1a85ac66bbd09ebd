"""``--help`` of ``mc-proxy`` and ``mcproxyctl`` is complete, and the operations guide covers it."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcproxy.admin.cli import build_parser as ctl_parser
from mcproxy.cli import build_parser as proxy_parser

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command as ``(words, parser)``, the program itself first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


PARSERS = {"mc-proxy": proxy_parser(), "mcproxyctl": ctl_parser()}
COMMANDS = [
    (program, words, parser) for program, top in PARSERS.items() for words, parser in _commands(top)
]
LEAVES = [
    (program, words, parser)
    for program, words, parser in COMMANDS
    if not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
]


def _ids(items: list[tuple[str, tuple[str, ...], argparse.ArgumentParser]]) -> list[str]:
    return [" ".join((program, *words)) for program, words, _ in items]


@pytest.mark.parametrize(("program", "words", "parser"), COMMANDS, ids=_ids(COMMANDS))
def test_every_command_and_argument_has_help(
    program: str, words: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    assert parser.description, "no description"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help, f"{choice.dest} has no help"
        else:
            assert action.help, f"{action.option_strings or action.dest} has no help"
    parser.format_help()  # renders without error


@pytest.mark.parametrize(("program", "words", "parser"), LEAVES, ids=_ids(LEAVES))
def test_operations_guide_shows_every_command_and_option(
    program: str, words: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    guide = OPERATIONS.read_text()
    assert " ".join((program, *words)) in guide
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and option not in ("--help", "--version"):
                assert option in guide, f"{option} is not in docs/operations.md"
