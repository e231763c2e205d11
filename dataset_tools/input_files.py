"""Reading line-based input files (plain or gzip) without tracebacks and without silent repairs.

- gzip is recognised by its magic bytes, not by the name: a ``.gz`` that is not gzip is refused
  with one line saying so; a truncated or corrupt gzip stream stops the run with one line naming
  the file, the last complete line and the compressed byte offset (a truncated dump would
  otherwise lose its tail silently).
- Lines are decoded as UTF-8 one by one. A line with invalid bytes is still yielded (bad bytes
  as U+FFFD) together with a description of the bad bytes, so the caller counts it as a problem
  (and ``--strict`` fails) instead of the replacement passing unnoticed.
"""
import gzip
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

from tqdm.auto import tqdm

from dataset_tools.report import InputFileError

GZIP_MAGIC = b"\x1f\x8b"
BOM = b"\xef\xbb\xbf"


class Line(NamedTuple):
    number: int  # 1-based line number
    text: str  # without the line ending; invalid UTF-8 bytes replaced by U+FFFD
    bad_utf8: Optional[str]  # None, or where the invalid bytes are and what they look like


def is_gzip(path: Path) -> bool:
    """True for gzip content; ``InputFileError`` for a ``.gz`` name whose content is not gzip."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head == GZIP_MAGIC:
        return True
    if Path(path).suffix == ".gz":
        shown = "an empty file" if not head else f"starts with {head!r}"
        raise InputFileError(f"{path}: not a gzip file ({shown}); if it is plain text, "
                             f"rename it without .gz")
    return False


def decode_line(raw: bytes) -> Line:
    """A ``Line`` numbered 0; ``bad_utf8`` says where decoding failed."""
    try:
        return Line(0, raw.decode("utf-8"), None)
    except UnicodeDecodeError as err:
        around = raw[max(0, err.start - 16): err.end + 16]
        return Line(0, raw.decode("utf-8", errors="replace"), f"byte {err.start} of the line: {around!r}")


def iter_lines(path, desc: str, progress: bool = True) -> Iterator[Line]:
    """Every line of a plain or gzip text file; the bar counts bytes of the (compressed) file."""
    path = Path(path)
    size = path.stat().st_size
    gz = is_gzip(path)
    lineno = 0
    with open(path, "rb") as raw_fh:
        fh = gzip.GzipFile(fileobj=raw_fh) if gz else raw_fh
        lines = iter(fh)
        with tqdm(total=size, desc=desc, unit="B", unit_scale=True, disable=not progress) as bar:
            last = 0
            while True:
                try:
                    raw = next(lines)
                except StopIteration:
                    break
                except (OSError, EOFError, zlib.error) as err:
                    raise InputFileError(
                        f"{path}: corrupt or truncated gzip after line {lineno} (compressed byte "
                        f"{raw_fh.tell()} of {size}): {err}") from None
                lineno += 1
                if lineno == 1 and raw.startswith(BOM):
                    raw = raw[len(BOM):]
                if lineno % 2000 == 0:
                    pos = raw_fh.tell()
                    bar.update(pos - last)
                    last = pos
                line = decode_line(raw.rstrip(b"\r\n"))
                yield Line(lineno, line.text, line.bad_utf8)
            bar.update(size - last)
