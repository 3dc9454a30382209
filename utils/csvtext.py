"""Caption text as people's files hold it: encodings, line ends, and CSV records that may span lines.

A captions file comes from Excel on Windows (cp1252, CRLF), Excel for Mac (bare CR), pandas (an unnamed
index column), or a Kaggle upload (quoted captions with a newline inside). Each is read as it is; what
cannot be read becomes one message naming the file and line, never an exception and never a silent loss.
"""

from __future__ import annotations

import codecs
import csv
import re
from pathlib import Path

from .records import DatasetError, Parsed

# A quoted field may hold newlines (RFC 4180), but a quote opened by mistake and never closed must not
# swallow the rest of the file: one record spans at most this many physical lines.
MAX_RECORD_LINES = 20
NOT_DECODED = re.compile("[\udc80-\udcff]")  # bytes the encoding could not read, kept as surrogates
# Encodings a non-UTF-8 captions file is most often in, tried in this order to say which one reads it.
LIKELY_ENCODINGS = ("cp1252", "latin-1")
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))

Entry = tuple[str, str, str]  # (where, image name as written in the file, caption)


def encoding_name(encoding: str | None) -> str:
    return encoding or "UTF-8"


def read_text(path: Path, encoding: str | None = None) -> str:
    """The file as text in `encoding` (default: UTF-8, or UTF-16/32 when a byte-order mark says so).
    Bytes the encoding cannot read survive as surrogates, so each row can be repaired and named alone."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror}") from None
    return decode_text(data, path, encoding)


def decode_text(data: bytes, path: Path, encoding: str | None = None) -> str:
    if encoding is None:
        encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8-sig")
    try:
        return data.decode(encoding, errors="surrogateescape")
    except LookupError:
        raise DatasetError(f"unknown encoding {encoding!r} for {path} (--encoding): use a Python codec name "
                           "such as utf-8, cp1252, latin-1, cp1251, shift_jis") from None


def replace_bad_bytes(values: list[str]) -> list[str] | None:
    """`values` with bytes the encoding could not read turned into U+FFFD, or None when they were clean."""
    if not any(NOT_DECODED.search(v) for v in values):
        return None
    return [v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for v in values]


def repair_message(where: str, encoding: str | None) -> str:
    return f"{where}: bytes that are not {encoding_name(encoding)} replaced by '\ufffd'"


def encoding_note(path: Path, text: str, encoding: str | None) -> str | None:
    """One line about a file holding bytes its encoding cannot read: how many lines, and which encoding
    would read them (with the first such line as it would then read), so people can pass --encoding."""
    lines = re.split(r"\r\n|\r|\n", text)
    bad = [n for n, line in enumerate(lines, start=1) if NOT_DECODED.search(line)]
    if not bad:
        return None
    raw = text.encode("utf-8", "surrogateescape")
    first = lines[bad[0] - 1].encode("utf-8", "surrogateescape")
    said = (f"{path.name} is not {encoding_name(encoding)}: {len(bad)} line(s) hold bytes it cannot read "
            f"(first on line {bad[0]}), replaced by '\ufffd'")
    if encoding is None and _has_utf8_letters(text):
        return said + "; the rest is UTF-8, so fix those lines in the file"
    for candidate in LIKELY_ENCODINGS:
        try:
            raw.decode(candidate)
        except UnicodeDecodeError:
            continue
        sample = first.decode(candidate).strip()[:80]
        return (said + f". The whole file reads as {candidate} (line {bad[0]} would be {sample!r}): if that is "
                f"right, rerun with --encoding {candidate} (DataConfig(encoding='{candidate}'))")
    return said


def _has_utf8_letters(text: str) -> bool:
    """True when the text holds characters beyond ASCII that UTF-8 did read: the file mixes encodings."""
    return any(ord(c) > 127 and not 0xDC80 <= ord(c) <= 0xDCFF and c != "\ufeff" for c in text)


def separator(path: Path, sep: str) -> str:
    """`--separator '\\t'` arrives as backslash-t from a shell; a .tsv file means tab unless told otherwise."""
    if sep in ("\\t", "tab"):
        return "\t"
    if sep == "," and path.suffix.lower() == ".tsv":
        return "\t"
    return sep


def split_lines(text: str) -> list[str]:
    """Physical lines: Windows, old Mac ("CSV (Macintosh)") and Unix ends."""
    lines = re.split(r"\r\n|\r|\n", text)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _one_record(lines: list[str], start: int, sep: str) -> tuple[list[str] | None, int, str | None]:
    """(fields, physical lines used, error) of the record starting at lines[start], strictly parsed and
    spanning at most MAX_RECORD_LINES lines."""
    reader = csv.reader((line + "\n" for line in lines[start:start + MAX_RECORD_LINES]), delimiter=sep, strict=True)
    try:
        row = next(reader)
    except csv.Error as exc:
        return None, 1, str(exc)
    except StopIteration:
        return [], 1, None
    return row, reader.line_num, None


_IMAGE_NAME = re.compile(r"\d+|.+\.(jpe?g|png|webp|bmp|gif)", re.IGNORECASE)


def _is_row(line: str, sep: str, width: int, i_image: int) -> bool:
    """True when `line` alone is a full row naming an image: a record taking it in is a stray quote."""
    try:
        row = next(csv.reader([line], delimiter=sep, strict=True), [])
    except csv.Error:
        return False
    return len(row) == width and _IMAGE_NAME.fullmatch(row[i_image].strip()) is not None


def csv_entries(path: Path, text: str, sep: str, image_column: str, caption_column: str,
                parsed: Parsed, encoding: str | None = None) -> list[Entry]:
    """The (where, image, caption) of each usable record; bad ones become problem lines, never exceptions.

    A record may span lines inside quotes (RFC 4180); a quote never closed costs its own line only.
    """
    lines = split_lines(text)
    try:
        header = next(csv.reader(lines[:1], delimiter=sep, strict=True), None)
    except csv.Error as exc:
        raise DatasetError(f"{path} line 1, the header: {exc}; it should name the columns, such as "
                           f"image{sep}caption") from None
    if not header:
        raise DatasetError(f"{path} is empty")
    columns = [c.strip() for c in header]
    missing = [c for c in (image_column, caption_column) if c not in columns]
    if missing:
        raise DatasetError(
            f"{path} has no column {', '.join(map(repr, missing))}; its columns (split on {sep!r}) are "
            f"{columns}. Name the right ones with --image-column / --caption-column, or fix --separator.")
    note = encoding_note(path, text, encoding)
    if note:
        parsed.notes.append(note)
    i_image, i_caption = columns.index(image_column), columns.index(caption_column)
    entries: list[Entry] = []
    i = 1
    while i < len(lines):
        where = f"{path.name} line {i + 1}"
        if not lines[i]:
            i += 1  # a blank line is not a row
            continue
        row, span, error = _one_record(lines, i, sep)
        if error:
            parsed.skip(f"{where}: {error} (a quote opened and not closed? a quoted caption may span at most "
                        f"{MAX_RECORD_LINES} lines)")
            i += 1
            continue
        if span > 1 and (len(row) != len(columns) or
                         any(_is_row(line, sep, len(columns), i_image) for line in lines[i + 1:i + span])):
            parsed.skip(f"{where}: a quote opened and not closed on this line (it would take in the "
                        f"{span - 1} line(s) after it as part of one caption)")
            i += 1
            continue
        i += span
        if len(row) != len(columns):
            parsed.skip(f"{where}: {len(row)} fields where the header has {len(columns)} "
                        f"(quote captions that contain {sep!r})")
            continue
        fixed = replace_bad_bytes(row)
        if fixed:
            row = fixed
            parsed.repair(repair_message(where, encoding))
        image = row[i_image].strip()
        if not image:
            parsed.skip(f"{where}: no image name in column {image_column!r}")
            continue
        entries.append((where, image, row[i_caption]))
    return entries


def caption_lines(text: str, where: str, parsed: Parsed, encoding: str | None = None) -> list[tuple[str, str]]:
    """(where, caption) for each non-empty line of a caption file (one caption per line)."""
    out = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): \f or \u2028 end no line
        fixed = replace_bad_bytes([line])
        if fixed:
            line = fixed[0]
            parsed.repair(repair_message(f"{where} line {number}", encoding))
        if line.strip():
            out.append((f"{where} line {number}", line))
    return out
