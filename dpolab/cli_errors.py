"""Command-line mistakes (a misspelt option, command or name) as ONE line with a suggestion.

argparse prints its usage block and then the error, and reports an unknown option of `dpolab train`
as an error of the top-level `dpolab` parser. Here every parser's `error` says, on one line, which
command refused what, the closest valid spelling (difflib) and where the full list is.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys


def did_you_mean(word: str, choices) -> str:
    """' (did you mean X?)' for the closest of `choices`, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def one_line_errors(parser: argparse.ArgumentParser, subparsers: dict[str, argparse.ArgumentParser]) -> None:
    """Replace `error` of the top-level parser and of each command's parser by a one-line version;
    `parser.commands` keeps the command parsers (for `unknown_options`)."""
    commands = list(subparsers)
    parser.commands = dict(subparsers)

    def top_error(message: str):
        bad = re.search(r"invalid choice: '([^']*)'", message)
        if bad:
            message = f"unknown command {bad.group(1)!r}{did_you_mean(bad.group(1), commands)}; commands: {', '.join(commands)}"
        elif "required: command" in message:
            message = f"no command given; commands: {', '.join(commands)}"
        _exit(parser.prog, message, parser.prog)

    parser.error = top_error
    for name, sub in subparsers.items():
        sub.error = lambda message, sub=sub: _exit(sub.prog, message, sub.prog)


def unknown_options(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    """Exit with one line for options the command does not have (first one named, with a suggestion)."""
    first = next((a for a in extra if a.startswith("-")), extra[0])
    options = [s for action in parser._actions for s in action.option_strings]  # argparse keeps no public list
    hint = did_you_mean(first.split("=")[0], options) if first.startswith("-") else ""
    what = "unknown option" if first.startswith("-") else "unexpected argument"
    _exit(parser.prog, f"{what} {first!r}{hint}", parser.prog)


def _exit(prog: str, message: str, help_prog: str):
    print(f"{prog}: error: {message}; see `{help_prog} --help`", file=sys.stderr)
    sys.exit(2)
