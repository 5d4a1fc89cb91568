"""One-line errors and exit statuses, flags made from the fields of a dataclass, and the table of the flags in
force that a run prints when it starts."""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from typing import Optional


# ---- Errors and exit statuses.
class UserError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2, no traceback."""


class RunFailed(Exception):
    """A run that could not do its work (it could save nothing, or lost its folder): one line, exit status 1."""


def run_command(body, interrupted: str) -> int:
    """Exit status of a command (train_breakout.py's and play.py's): 0 done, 1 failed, 2 bad input (each one line
    on stderr, no traceback), 130 interrupted (the line `interrupted` on stderr)."""
    try:
        body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return 0


def command(*words) -> str:
    """A command for a person to paste, each word quoted for the shell it runs in (a folder with spaces)."""
    words = ["python", *map(str, words)]
    return subprocess.list2cmdline(words) if os.name == "nt" else shlex.join(words)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already explains it."""

    def _get_help_string(self, action):
        return action.help if "(default" in action.help else super()._get_help_string(action)


# ---- Flags: the fields of a dataclass, each made by `flag`, its help text and default shown in --help.
POSITIVE, NOT_NEGATIVE, UNIT = "(0, inf)", "[0, inf)", "[0, 1]"


def flag(default, help: str, bounds: Optional[str] = None, new_on_resume: bool = False, **argparse_kw):
    """A flag: its default, its --help line, the interval its value must lie in (`bounds`, checked by
    check_bounds), and whether --resume accepts a new value for it."""
    return dataclasses.field(default=default, metadata=dict(help=help, bounds=bounds, new_on_resume=new_on_resume,
                                                            argparse=argparse_kw))


def flag_parser(cls, doc: str, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The command line of the dataclass `cls`; with `suppress_defaults`, only the flags given are parsed."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=HelpFormatter)
    for f in dataclasses.fields(cls):
        kw = dict(help=f.metadata["help"], **f.metadata["argparse"])
        kw["default"] = argparse.SUPPRESS if suppress_defaults else f.default
        name = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(name, action="store_true", **kw)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type.replace("Optional[", "").rstrip("]")]
            parser.add_argument(name, type=kind, **kw)
    return parser


def check_bounds(args) -> None:
    """Refuse, in one line, a flag outside its bounds."""
    for f in dataclasses.fields(args):
        value, bounds = getattr(args, f.name), f.metadata["bounds"]
        if value is None or bounds is None:
            continue
        low, high = (float(x) for x in bounds[1:-1].split(","))
        if not ((low <= value if bounds[0] == "[" else low < value)
                and (value <= high if bounds[-1] == "]" else value < high)):
            what = {POSITIVE: "must be positive", NOT_NEGATIVE: "must not be negative"}.get(bounds,
                                                                                          f"must lie in {bounds}")
            raise UserError(f"--{f.name.replace('_', '-')} {what}, got {value}")


def describe(sections: dict, width: int = 100) -> str:
    """Each section's `{name: value}` as `--name value` cells in columns of 26, packed into lines of `width`."""
    lines = []
    for title, rows in sections.items():
        lines.append(title)
        line = " "
        for cell in (f"--{k.replace('_', '-')} {v}".ljust(25) for k, v in rows.items()):
            if len(line) + 1 + len(cell.rstrip()) > width:
                lines.append(line.rstrip())
                line = " "
            line += " " + cell
        lines.append(line.rstrip())
    return "\n".join(lines)


def flags_in_force(args, resolved: dict, sections: dict) -> str:
    """The flags of the dataclass `args` as they are in force, on one screen: `resolved` replaces the values that
    follow other flags and "auto" (None leaves a flag out); booleans as on/off, a limit not given left out.
    `sections`: {title: the first flag of the section}."""
    values = {**dataclasses.asdict(args), **resolved}
    values = {k: "on" if v is True else "off" if v is False else v for k, v in values.items() if v is not None}
    names = [f.name for f in dataclasses.fields(args)]
    starts = [names.index(first) for first in sections.values()] + [len(names)]
    return describe({title: {k: values[k] for k in names[start:end] if k in values}
                     for title, start, end in zip(sections, starts, starts[1:])})


def start_up_table(args, device, on, threads: int, replay_bytes: int) -> str:
    """train_breakout.py's flags (`args`) as they are in force: the defaults that follow other flags, "auto" (`on`:
    device.Switches) and 0 (`threads`) resolved; then the replay memory's size."""
    auto = lambda name, value: ("on" if value else "off") + (" (auto)" if getattr(args, name) == "auto" else "")
    resolved = dict(learn_start=args.transitions_before_learning, block=args.steps_per_transition,
                    threads=threads, recipe=None,
                    device=f"{device}" + (" (auto)" if args.device == "auto" else ""),
                    compile=auto("compile", on.compile), overlap=auto("overlap", on.overlap),
                    eval_beside=auto("eval_beside", on.eval_beside))
    sections = {"run:": "episodes", "machine:": "env",
                f"recipe {args.recipe} (flags given replace its values):": "recipe"}
    return flags_in_force(args, resolved, sections) + (
        f"\nreplay memory: {replay_bytes / 2**30:.2f} GiB on {device} "
        f"({replay_bytes / args.memory / 1024:.1f} KB per stored transition)")
