"""Reading the official Open Images CSV files for ``regionspot-convert-openimages``
(:mod:`regionspot.tools.convert_openimages`): rows streamed with a progress bar, the header's
column indices, and the one error type, :class:`ConversionError`."""

import csv
import os
from typing import Dict, Iterator, List, Sequence, Tuple

_PROGRESS_BYTES = 1 << 22


class ConversionError(ValueError):
    """Bad input; the message names the file (and row) and what was expected."""


def progress(**kwargs):
    """A tqdm progress bar (shown on a terminal only, ``disable=None``) with ``kwargs``."""
    from tqdm import tqdm

    return tqdm(disable=None, dynamic_ncols=True, **kwargs)


def csv_rows(path: str, what: str) -> Iterator[Tuple[int, List[str]]]:
    """Yield ``(line number, fields)`` of a CSV file, streamed, with a progress bar in bytes.

    Blank lines are skipped. A UTF-8 byte-order mark is ignored.

    Raises:
        ConversionError: the file is missing or not UTF-8 text.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"{what} not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as raw, progress(total=size, unit="B", unit_scale=True,
                                            desc=f"reading {os.path.basename(path)}") as bar:
        def lines():
            pending = 0
            for number, line in enumerate(raw, 1):
                pending += len(line)
                if pending >= _PROGRESS_BYTES:
                    bar.update(pending)
                    pending = 0
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ConversionError(f"{path}, line {number}: not UTF-8 text ({e})") from None
                if number == 1 and text.startswith("\ufeff"):
                    text = text[1:]
                yield text
            bar.update(pending)

        reader = csv.reader(lines())
        try:
            for row in reader:
                if row:
                    yield reader.line_num, row
        except csv.Error as e:
            raise ConversionError(f"{path}, line {reader.line_num}: not a valid CSV row ({e})") from None


def read_header(rows: Iterator[Tuple[int, List[str]]], path: str, required: Sequence[str],
                what: str) -> Dict[str, int]:
    """Column index of each required column, from the first row; error if one is missing."""
    first = next(rows, None)
    found = [] if first is None else [c.strip() for c in first[1]]
    missing = [c for c in required if c not in found]
    if missing:
        raise ConversionError(f"{path}: expected the columns {', '.join(required)} of {what}; found "
                              f"{', '.join(found) if found else 'no header (empty file)'}")
    return {c: found.index(c) for c in required}
