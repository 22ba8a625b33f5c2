"""``python -m jmerge.cli``: the console script."""

from jmerge.cli import entry

entry()
