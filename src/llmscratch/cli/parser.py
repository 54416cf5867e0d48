"""The jsonargparse parser the command line is built of (imported when a command line is parsed, not before)."""

from __future__ import annotations

import re
import sys

from jsonargparse import ActionConfigFile, ArgumentParser

from llmscratch.cli.base import Verb


class Parser(ArgumentParser):
    """Parse errors as one line on stderr and exit code 2, like every other user mistake."""

    def error(self, message, *args, **kwargs):
        # jsonargparse's messages span lines ('Parser key "x":' then the reason): fold them into one.
        text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        text = _out_of_range(text)[:400] or "invalid arguments"
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(f"llmscratch: error: {text} (see `{prog} --help`)\n")
        sys.exit(2)


def add_verb(subcommands, name: str, prog: str, verb: Verb, with_options: bool) -> None:
    """Add `verb` as `name` to `subcommands`: a parser with `--config`, and the verb's own options when
    `with_options` (else only its name and description, enough for the lists of `--help`)."""
    p = Parser(prog=prog, description=verb.description)
    p.add_argument("--config", action=ActionConfigFile, help="YAML file of option values (keys use underscores)")
    subcommands.add_subcommand(name, p, help=verb.description)
    if with_options:
        verb.parser(p)


def add_group(subcommands, name: str, description: str, summary: str):
    """Add a group of verbs as `name` to `subcommands`; returns the subcommands its verbs go into."""
    p = Parser(prog=f"llmscratch {name}", description=description)
    subcommands.add_subcommand(name, p, help=summary)
    return p.add_subcommands(dest="action", required=True)


_KEY = re.compile(r'Parser key "([^"]+)":')
_RULE = re.compile(r"(?:(\S+) )?does not conform to restriction (.+?)(?: - |$| Given value)")
_VALUE = re.compile(r"Given value: (\S+)|Got value: (\S+)|base 10: '([^']*)'|to float: '([^']*)'")
_INTEGER = re.compile(r"int\(\)|<class 'int'>|Int\b|Seed|Port|VocabSize")


def _out_of_range(text: str) -> str:
    """jsonargparse's messages about one option's value — 'Parser key "top_p": Not of type TopP: 1.5 does not
    conform to restriction v>0 and v<=1', or a value that is no number — as '--top-p 1.5: out of range;
    allowed: > 0 and <= 1' or '--seed 1.5: expected a whole number' (the flag as typed, dotted options kept)."""
    key = _KEY.search(text)
    if not key:
        return text
    name = key.group(1)
    flag = "--" + name if "." in name else "--" + name.replace("_", "-")
    rule = _RULE.search(text)
    given = _VALUE.search(text)
    value = next((g for g in given.groups() if g is not None), "") if given else ""
    if rule:
        if rule.group(1) and not rule.group(1).endswith(":"):
            value = rule.group(1)
        allowed = re.sub(r"v\s*(>=|<=|>|<|==|!=)\s*", r"\1 ", rule.group(2))
        return f"{flag} {value}: out of range; allowed: {allowed}"
    if "invalid literal" in text or "could not convert" in text or "Expected a <class" in text:
        kind = "a whole number" if _INTEGER.search(text) else "a number"
        if "<class 'bool'>" in text or "bool" in text.split("Expected a")[-1][:30]:
            kind = "true or false"
        return f"{flag} {value}: expected {kind}"
    return text
