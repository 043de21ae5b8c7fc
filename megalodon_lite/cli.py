"""The ``megalodon-lite`` command (also ``python -m megalodon_lite``): one subcommand per job.

Each subcommand lives in the module that does the work, which provides two functions::

    add_<name>_arguments(parser: argparse.ArgumentParser) -> None
    run_<name>(args: argparse.Namespace) -> int        # the exit status

The table below only says where; modules are imported when their subcommand runs, so
``megalodon-lite --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megalodon_lite.commands", "train a byte-level model (Megalodon or the Llama-style baseline)"),
    "sample": ("megalodon_lite.commands", "generate text from a checkpoint, printed as it comes"),
    "eval": ("megalodon_lite.commands", "validation loss, bits per byte and loss per position of a checkpoint"),
    "book": ("megalodon_lite.book", "execute the chapters and render the offline HTML book, or write the student edition"),
    "chapters": ("megalodon_lite.chapters", "copy the chapters into a folder, to read and run them in JupyterLab"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megalodon-lite", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        getattr(importlib.import_module(module), f"add_{name}_arguments")(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module, _ = COMMANDS[args.command]
    return int(getattr(importlib.import_module(module), f"run_{args.command}")(args))


if __name__ == "__main__":
    sys.exit(main())
