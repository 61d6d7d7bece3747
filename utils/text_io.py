"""Reading the text files a user writes (configs, annotation and pseudo-label files, prediction
input lists): UTF-8 only. A file in another encoding (latin-1, cp1252...) is refused with one line
naming the file, the line and what to do, instead of guessing: a wrong guess would turn an
accented word into another token, and the vocabulary of the file into another vocabulary."""
from __future__ import annotations

import os


def read_text(path: str | os.PathLike, what: str, error: type[Exception]) -> str:
    """The text of the UTF-8 file ``path`` (a leading byte-order mark dropped); ``error(message)``
    naming ``what`` and ``path`` where it is not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise error(f"{what} {os.fspath(path)} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}): "
                    f"save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {os.fspath(path)} > new_file") from None
