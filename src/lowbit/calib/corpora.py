"""Named public-domain texts from Debian packages, extracted once into $LOWBIT_HOME/texts.

- austen-*: Jane Austen's novels from r-cran-janeaustenr. The package stores them as R objects in an
  .rdb/.rdx pair: the .rdx index (gzip) maps each name to (offset, length) in the .rdb, where each object
  is a 4-byte length followed by a zlib stream; the PyPI package `rdata` parses the R serialization.
  "austen" (calibration) = Emma + Mansfield Park; "austen-eval" = Pride and Prejudice.
- kjv: the King James Bible, printed by the `bible` program of bible-kjv.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

from ..errors import LowbitError
from ..paths import lowbit_home

AUSTEN_BOOKS = {
    "austen": ("emma", "mansfieldpark"),
    "austen-eval": ("prideprejudice",),
}
RDATA_DIR = "usr/lib/R/site-library/janeaustenr/data"


def texts_dir() -> Path:
    d = lowbit_home() / "texts"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _apt_download(package: str, into: Path) -> Path:
    try:
        subprocess.run(["apt-get", "download", package], cwd=into, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise LowbitError(f"cannot download the Debian package {package} ({err})", "run `apt-get update` first, or pass --dataset/--text with a local text file") from None
    return next(into.glob(f"{package}_*.deb"))


def _extract_deb(deb: Path, into: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)


def _read_r_object(rdb: bytes, offset: int, length: int):
    import rdata

    raw = rdb[offset : offset + length]
    data = zlib.decompress(raw[4:])  # 4-byte big-endian uncompressed length, then zlib
    return rdata.conversion.convert(rdata.parser.parse_data(data, expand_altrep=False))


def extract_austen(target: Path) -> None:
    """Write one <book>.txt per novel into `target` (lines joined with newlines)."""
    import warnings

    import rdata

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _extract_deb(_apt_download("r-cran-janeaustenr", tmp), tmp)
        data = tmp / RDATA_DIR
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that the .rdx has no RDS magic; it is plain RDS
            index = rdata.conversion.convert(rdata.parser.parse_data(gzip.open(data / "Rdata.rdx").read(), expand_altrep=False))
            rdb = (data / "Rdata.rdb").read_bytes()
            for name, (offset, length) in index["variables"].items():
                lines = _read_r_object(rdb, int(offset), int(length))
                (target / f"{name}.txt").write_text("\n".join(str(x) for x in lines), encoding="utf-8")


def extract_kjv(target: Path) -> None:
    """Write kjv.txt with the whole Bible, one verse per line, using the packaged `bible` program."""
    bible = shutil.which("bible")
    if bible is None:
        raise LowbitError("the KJV text needs the `bible` program", "apt-get install -y bible-kjv")
    out = subprocess.run([bible, "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    # each line starts with a reference such as "Ge1:1 "; keep only the verse text
    verses = [line.split(" ", 1)[1] if " " in line else line for line in out.splitlines() if line.strip()]
    (target / "kjv.txt").write_text("\n".join(verses), encoding="utf-8")


def load_text(name: str) -> str:
    """The text of a named corpus ("austen", "austen-eval", "kjv") or of a UTF-8 file path."""
    if name in AUSTEN_BOOKS:
        d = texts_dir() / "austen"
        if not (d / "emma.txt").is_file():
            tmp = Path(tempfile.mkdtemp(dir=texts_dir()))
            extract_austen(tmp)
            shutil.rmtree(d, ignore_errors=True)
            os.replace(tmp, d)
        return "\n\n".join((d / f"{book}.txt").read_text(encoding="utf-8") for book in AUSTEN_BOOKS[name])
    if name == "kjv":
        path = texts_dir() / "kjv.txt"
        if not path.is_file():
            tmp = Path(tempfile.mkdtemp(dir=texts_dir()))
            extract_kjv(tmp)
            os.replace(tmp / "kjv.txt", path)
            shutil.rmtree(tmp)
        return path.read_text(encoding="utf-8")
    path = Path(name).expanduser()
    if not path.is_file():
        raise LowbitError(f"text {name!r} is neither a file nor a known corpus", "pass a UTF-8 text file, or one of: austen, austen-eval, kjv")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LowbitError(f"{path} is not UTF-8 text", "convert it to UTF-8") from None
