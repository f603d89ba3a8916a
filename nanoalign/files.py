"""
Reading data files before any schema: from bytes on disk to records that know their FILE:LINE.

    JSONL       one JSON value per line; blank lines are skipped
    JSON array  a file whose first non-blank character is "[" (a released alpaca_data.json, a
                ShareGPT .json): [{...}, {...}, ...], items on any number of lines
    plain text  pretraining documents separated by a blank line

Every problem is a DataError "FILE:LINE: expected ..., found ...". In a JSON array LINE is the
line where the bad item starts, so an error points into the file as it does for JSONL (a one-line
array names line 1 for every item: pretty-print it with `python -m json.tool` to tell them apart).
A UTF-8 byte-order mark at the start of a file is dropped (Windows editors write one), and line
ends are read as open() reads them ("\\r\\n" and "\\r" end a line too). Bytes that are not UTF-8 are
a DataError naming their line, never a bare UnicodeDecodeError at a byte offset.
"""

import json
import re
import warnings

BOM = b"\xef\xbb\xbf"
ITEM_GAP = re.compile(r"[\s,]*")  # what separates two items of an already-checked JSON array


class DataError(ValueError):
    """A bad input record; the message always starts with FILE:LINE."""


def expect(ok, where, expected, found):
    """Every check of a record: unless ok, DataError "FILE:LINE: expected ..., found ..."."""
    if not ok:
        raise DataError(f"{where}: expected {expected}, found {found}")


def read_bytes(path) -> bytes:
    """The file's bytes without a leading byte-order mark, every line end turned into "\\n"."""
    with open(path, "rb") as f:
        raw = f.read().removeprefix(BOM)
    # the universal newlines of open(): Windows "\r\n" and old Mac "\r" both end a line
    return raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def decode(raw: bytes, path, first_line=1) -> str:
    """raw as UTF-8; an invalid byte is a DataError naming its line (first_line is raw's first)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        column = e.start - raw.rfind(b"\n", 0, e.start)  # rfind gives -1 on the first line
        raise DataError(f"{path}:{line}: expected UTF-8 text, found the byte 0x{raw[e.start]:02x} "
                        f"at column {column} (save the file as UTF-8)") from None


def _json_line(raw: bytes, path, line):
    where = f"{path}:{line}"
    try:
        return json.loads(decode(raw, path, line))
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: expected a JSON object, found malformed JSON "
                        f"({e.msg} at column {e.colno})") from None


def _array_items(raw: bytes, path) -> list:
    """[(line where the item starts, item)] of a file holding one JSON array. Any syntax error stops
    the reading, with skip_bad too: after one, where the next item starts is unknown."""
    text = decode(raw, path)
    try:
        json.loads(text)  # checks the whole syntax first, so the walk below can be lenient
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: expected a JSON array of objects, found malformed "
                        f"JSON ({e.msg} at column {e.colno})") from None
    read_one, items = json.JSONDecoder().raw_decode, []
    pos, line, counted = text.index("[") + 1, 1, 0
    while True:
        start = ITEM_GAP.match(text, pos).end()  # the comma and whitespace before the next item
        if text[start] == "]":
            return items
        line += text.count("\n", counted, start)  # counted so far: each newline once
        counted = start
        item, pos = read_one(text, start)
        items.append((line, item))


def read_jsonl(path, parse=None, skip_bad=False) -> list:
    """[(line, record)], or [parse(record, "FILE:LINE")], from a JSONL file or a JSON array (sniffed
    by the first non-blank character). A bad record raises DataError, or with skip_bad is skipped,
    counted and reported in one warning (a JSONL line that is not UTF-8 or not JSON too)."""
    raw = read_bytes(path)
    lines = [(i, b) for i, b in enumerate(raw.split(b"\n"), 1) if b.strip()]
    expect(lines, f"{path}:1", "JSON lines (one object per line) or a JSON array", "an empty file")
    # an array is parsed whole; JSONL line by line, so that a bad line can be skipped
    array = lines[0][1].lstrip().startswith(b"[")
    out, bad = [], []
    for i, row in _array_items(raw, path) if array else lines:
        where = f"{path}:{i}"
        try:
            rec = row if array else _json_line(row, path, i)
            expect(isinstance(rec, dict), where, "a JSON object", type(rec).__name__)
            out.append((i, rec) if parse is None else parse(rec, where))
        except DataError as e:
            if not skip_bad:
                raise
            bad.append(str(e))
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} bad record(s) of {len(out) + len(bad)}; "
                      "first: " + "; ".join(bad[:3]))
    expect(out, f"{path}:1", "at least one valid record", "none")
    return out


def _document(rec, where) -> str:
    expect("text" in rec, where, "a field 'text' (one document per record)",
           f"fields {sorted(rec)}")
    expect(isinstance(rec["text"], str), where, "'text' to be a string", type(rec["text"]).__name__)
    return rec["text"]


def read_documents(path) -> list[str]:
    """Pretraining documents. A .jsonl or .json file holds one {"text": ...} record per document
    (JSONL or an array, as above); any other file is plain text, documents separated by a blank
    line ("\\n\\n"). Whitespace-only documents are dropped. There is no skip_bad: a bad record or
    byte stops the stage with its FILE:LINE (the text around it would be cut mid-document)."""
    if str(path).endswith((".jsonl", ".json")):
        docs = [d for d in read_jsonl(path, _document) if d.strip()]
    else:
        docs = [d for d in decode(read_bytes(path), path).split("\n\n") if d.strip()]
    expect(docs, f"{path}:1", "at least one non-empty document", "none")
    return docs
