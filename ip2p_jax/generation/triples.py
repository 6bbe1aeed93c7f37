"""Caption triples (input caption, instruction, edited caption), one JSON object a line: the input of IP2P's data
generation (paper 3.1.1; ``generate_data.py``)."""

from __future__ import annotations

import dataclasses
import json
import os

TRIPLE_KEYS = ("input", "edit", "output")


class TripleError(ValueError):
    """A triple that cannot be generated: not a JSON object, a missing or empty caption, a caption over 77
    tokens, captions that do not align as asked."""


@dataclasses.dataclass(frozen=True)
class Triple:
    """One line of the triples file.

    Attributes:
      index: 0-based line number (blank lines count).
      input, edit, output: input caption, instruction, edited caption.
    """

    index: int
    input: str
    edit: str
    output: str

    @property
    def name(self) -> str:
        """The triple's folder, as the reference names it."""
        return f"{self.index:07d}"


def parse_triple(index: int, line: str) -> Triple:
    """One JSONL line -> ``Triple``; raises ``TripleError`` naming what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise TripleError(f"not JSON ({error})") from error
    if not isinstance(record, dict):
        raise TripleError(f"not a JSON object: {type(record).__name__}")
    missing = [key for key in TRIPLE_KEYS if key not in record]
    if missing:
        raise TripleError(f"missing {missing}")
    for key in TRIPLE_KEYS:
        if not isinstance(record[key], str) or not record[key].strip():
            raise TripleError(f"{key!r} is not a non-empty string: {record[key]!r}")
    return Triple(index, record["input"], record["edit"], record["output"])


def read_triples(path: str | os.PathLike) -> tuple[list[Triple], list[tuple[int, str]]]:
    """The triples of a JSONL file and the bad lines as ``(line number (1-based), reason)``; blank lines are
    skipped silently."""
    triples, errors = [], []
    with open(path) as lines:
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                triples.append(parse_triple(index, line))
            except TripleError as error:
                errors.append((index + 1, str(error)))
    return triples, errors
