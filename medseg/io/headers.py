"""Where a MetaImage or NRRD header keeps its voxel data, found the way ITK's readers find it.

Both formats may point their voxels at other files (``ElementDataFile = /etc/shadow``, ``data file: ...``), and
SimpleITK follows any such reference. Searching the text for one spelling is not enough (the review that
added this module got past a regex with ``ElementDataFile: /etc/shadow`` and with a header longer than the
part searched), so each header is tokenised as its reader does:

* MetaImage (ITK MetaIO ``MET_Read``): a field name runs from the first non-space character of a line to the
  first ``=`` or ``:``; trailing blanks are trimmed and the name is compared case-sensitively. The value
  starts after any run of ``=``, ``:``, spaces and tabs and ends at ``\\n``. Reading stops at the first
  ``ElementDataFile``: whatever follows is voxel data. A name line without a separator makes MetaIO take the
  value from a *later* line, so such lines are refused rather than modelled; so are NUL bytes (MetaIO would
  compare a name only up to one). ``LOCAL`` is compared case-insensitively, as MetaIO does.
* NRRD (teem ``NrrdIO``): lines end at ``\\n``, ``\\r\\n`` or ``\\r``; the header ends at the first empty line.
  A field is ``<identifier>: <value>`` with the identifier matched case-insensitively (NRRD spec); ``data
  file`` and ``datafile`` name the data file(s).

Header length does not matter: the file is memory-mapped and searched to the end of the header. To stay on
the safe side of any difference from the real parsers, spellings that merely resemble the data-file field
(any case, any white space) count as references too.

Reference forms (both formats): a file name, ``LIST`` (names on the following lines) or a ``%d`` pattern
``<template> <min> <max> <step>``. ``DataReference`` says which; the readers decide what to accept.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import ScanReadError

_METAIO_KEY = b"ElementDataFile"
# A line start as MetaIO sees it (it skips any white space, line breaks included, before a name).
_LINE_START = rb"(?:\A|[\r\n])\s*"
_METAIO_EXACT = re.compile(_LINE_START + _METAIO_KEY + rb"[ \t]*[=:]")
_METAIO_RESEMBLING = re.compile(_LINE_START + rb"(?i:element\s*data\s*file)\s*[=:][=: \t]*([^\n]*)")
# A non-blank line with neither '=' nor ':' (line breaks: \r or \n, so a line is never longer than MetaIO's).
_METAIO_NO_SEPARATOR = re.compile(rb"(?:\A|[\r\n])[ \t\f\v]*[^\s=:][^=:\r\n]*(?=[\r\n]|\Z)")

_NRRD_HEADER_END = re.compile(rb"\r\n[\r\n]|\n[\r\n]|\r\r")
_NRRD_DATA_FILE = re.compile(rb"(?:\A|[\r\n])\s*(?i:data\s*file)\s*:(=?)[ \t]*([^\r\n]*)")


@dataclass(frozen=True)
class DataReference:
    """Where the voxels are: ``kind`` ``inline`` (in this file), ``file``, ``list`` or ``pattern``.

    ``names``: the referenced file names as written (``file``: one; ``list``: the listed ones; ``pattern``:
    the template). ``field``: the header field, for messages.
    """

    kind: str
    names: tuple[str, ...] = ()
    field: str = ""

    @property
    def inline(self) -> bool:
        return self.kind == "inline"


@contextmanager
def _mapped(path: Path) -> Iterator[bytes | mmap.mmap]:
    with open(path, "rb") as f:
        try:
            view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            yield b""
            return
        try:
            yield view
        finally:
            view.close()


def _text(raw: bytes) -> str:
    return raw.decode("latin-1").strip()


def _parse_value(value: str, following: Callable[[], bytes], field: str) -> DataReference:
    """A data-file value: a name, ``LIST [subdim]`` (names on the following lines, read only then) or a ``%``
    pattern."""
    words = value.split()
    if words and words[0].upper() == "LIST":
        names = tuple(n for n in (_text(line) for line in re.split(rb"\r\n|\r|\n", following())) if n)
        return DataReference("list", names, field)
    if "%" in value:
        return DataReference("pattern", (words[0],), field)
    return DataReference("file", (value,), field)


def metaimage_data_reference(path: Path) -> DataReference:
    """The voxel data location of a ``.mha``/``.mhd`` header; ``ScanReadError`` for a header MetaIO would
    read differently from this parser (a line without separator, a NUL byte) or that has no data field."""
    with _mapped(path) as data:
        exact = _METAIO_EXACT.search(data)
        if exact is None:
            raise ScanReadError(f"{path.name}: MetaImage header without an ElementDataFile line")
        line_end = data.find(b"\n", exact.end())
        end = len(data) if line_end < 0 else line_end
        # Searched in place (pos/endpos), never copied: a header may be as long as the file.
        if data.find(b"\x00", 0, end) >= 0:
            raise ScanReadError(f"{path.name}: MetaImage header holds NUL bytes")
        stray = _METAIO_NO_SEPARATOR.search(data, 0, end)
        if stray is not None:
            raise ScanReadError(f"{path.name}: MetaImage header line without '=' or ':' ({_text(stray.group())[:40]!r})")
        references = [_text(m.group(1)) for m in _METAIO_RESEMBLING.finditer(data, 0, end)]
        # Every spelling of the field must agree (the exact one, last in the region, is where MetaIO stops).
        if all(v.upper() == "LOCAL" for v in references):
            return DataReference("inline", field="ElementDataFile")
        if len(set(references)) > 1:
            raise ScanReadError(f"{path.name}: MetaImage header names its voxel data more than once")
        return _parse_value(references[0], lambda: data[end + 1 :], "ElementDataFile")


def nrrd_data_reference(path: Path) -> DataReference:
    """The voxel data location of a ``.nrrd``/``.nhdr`` header (inline when it has no data file field)."""
    with _mapped(path) as data:
        if not data[:4] == b"NRRD":
            raise ScanReadError(f"{path.name}: not a NRRD file (no NRRD magic)")
        blank = _NRRD_HEADER_END.search(data)
        end = len(data) if blank is None else blank.start() + 1
        if data.find(b"\x00", 0, end) >= 0:
            raise ScanReadError(f"{path.name}: NRRD header holds NUL bytes")
        fields = list(_NRRD_DATA_FILE.finditer(data, 0, end))
        if not fields:
            return DataReference("inline", field="data file")
        if len(fields) > 1 or fields[0].group(1):  # twice, or as a "data file:=" key/value pair
            raise ScanReadError(f"{path.name}: NRRD header names its data file more than once or oddly")
        match = fields[0]
        return _parse_value(_text(match.group(2)), lambda: data[match.end() :], "data file")
