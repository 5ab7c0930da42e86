"""README.md tables generated from code (the config keys, the families): find the table under a heading, replace
it. Each generator has a test comparing README.md with what it prints."""
from __future__ import annotations

import re


def _span(readme: str, heading: str) -> tuple[int, int]:
    """Where the first table after `heading` (a whole line, e.g. "### Config keys") sits in the text."""
    section = readme.index(heading + "\n")
    start = readme.index("\n|", section) + 1
    end = re.compile(r"^(?!\|)", re.M).search(readme, start).start()
    return start, end


def table_in(readme: str, heading: str) -> str:
    start, end = _span(readme, heading)
    return readme[start:end]


def with_table(readme: str, heading: str, table: str) -> str:
    start, end = _span(readme, heading)
    return readme[:start] + table + readme[end:]


def rewrite(path: str, heading: str, table: str) -> None:
    """Replace the table under `heading` in the file at `path`."""
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(with_table(text, heading, table))
