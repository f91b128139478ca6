#!/usr/bin/env python3
"""Generate the values table of the chart's README.md from the comments in values.yaml.

    python helm/refresher/docs/generate.py           # (re)write the table in README.md
    python helm/refresher/docs/generate.py --check   # exit 1 if README.md is stale

A key is documented by a comment block right above it that starts with `# --`; the
block goes on over lines indented at least three spaces after the `#` (a line like
`#  - name: x` starts an example, which stays in values.yaml only). The table goes
between the `<!-- values:start -->` and `<!-- values:end -->` markers in README.md;
everything else there is written by hand. tests/test_helm_chart.py checks it is current.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent.parent
VALUES = CHART / "values.yaml"
README = CHART / "README.md"
START, END = "<!-- values:start -->", "<!-- values:end -->"

_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w.-]*):(?:\s|$)")
_DOC = re.compile(r"^\s*# -- ?(?P<text>.*)$")
_MORE = re.compile(r"^\s*#\s{3,}(?P<text>\S.*)$")
_INLINE_LIMIT = 100


def documented_keys(text: str) -> list[tuple[str, str]]:
    """(dotted key, description) for every key with a `# --` block, in file order."""
    found: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    collecting = False
    for line in text.splitlines():
        doc = _DOC.match(line)
        if doc:
            pending, collecting = [doc["text"].strip()], True
            continue
        if line.lstrip().startswith("#"):
            more = _MORE.match(line)
            if collecting and more and pending is not None:
                pending.append(more["text"].strip())
            else:
                collecting = False
            continue
        key = _KEY.match(line)
        if not key:
            continue
        indent = len(key["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key["key"]))
        if pending is not None:
            found.append((".".join(k for _, k in stack), " ".join(pending)))
        pending, collecting = None, False
    return found


def _lookup(values: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        values = values[part]
    return values


def _default(value: Any, has_documented_children: bool) -> str:
    text = json.dumps(value, ensure_ascii=False)
    if len(text) <= _INLINE_LIMIT:
        return f"`{text}`"
    return "" if has_documented_children else "see values.yaml"


def _markdown(text: str) -> str:
    """One table cell: single spaces, no pipes, no `<...>` that GitHub would eat as HTML."""
    text = re.sub(r"\s+", " ", text).replace("|", "\\|")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def table(values_text: str) -> str:
    values = yaml.safe_load(values_text)
    keys = documented_keys(values_text)
    names = [k for k, _ in keys]
    rows = ["| Key | Default | Description |", "| --- | --- | --- |"]
    for key, description in keys:
        parent = any(other.startswith(key + ".") for other in names)
        default = _default(_lookup(values, key), parent)
        rows.append(f"| `{key}` | {default} | {_markdown(description)} |")
    return "\n".join(rows)


def render(readme: str, values_text: str) -> str:
    """README.md with the table between the markers regenerated."""
    head, sep, rest = readme.partition(START)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise ValueError(f"README.md needs the markers {START} and {END}")
    return f"{head}{START}\n{table(values_text)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md is stale")
    parser.add_argument("--output", type=Path, default=README, help="the README to update")
    args = parser.parse_args(argv)
    current = args.output.read_text() if args.output.exists() else README.read_text()
    text = render(current, VALUES.read_text())
    if args.check:
        if not args.output.exists() or args.output.read_text() != text:
            print(f"{args.output} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
