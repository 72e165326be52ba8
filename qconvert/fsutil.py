"""Small file-system helpers shared by the writers of OUT and of exports: sizes, checks,
and the atomic swap that makes a finished directory appear (or replace an old one) at once."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from qconvert.errors import QConvertError

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int, allow_zero: bool = False) -> int:
    """Bytes of a size such as 2GB, 500MB or 1GiB (an int passes through); zero only with ``allow_zero``."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.I)
    if not m:
        raise QConvertError(f"cannot read size {text!r}; write it like 2GB, 500MB or 1GiB")
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if size <= 0 and not allow_zero:
        raise QConvertError(f"size {text!r} is zero; give a positive size such as 2GB, 500MB or 1GiB")
    return size


def public_name(path: str | Path) -> str:
    """A directory or file by its name only, for records that go to the Hub (``"."`` too)."""
    return Path(path).name or Path(path).resolve().name


def check_not_mount_point(dest: Path) -> None:
    """``dest`` can be replaced by a rename (``swap_into_place``): it is no mount point (a container's
    volume, a mounted disk), which a rename cannot move."""
    if Path(dest).is_dir() and os.path.ismount(dest):
        raise QConvertError(f"-o {dest} is a mount point, which qconvert cannot replace (it writes beside it and "
                            f"renames the result into place); name a directory inside it, e.g. -o {Path(dest) / 'model'}")


def check_writable_parent(dest: Path) -> None:
    """The directory that will hold ``dest`` exists and can be written."""
    parent = Path(dest).resolve().parent
    if not parent.is_dir():
        raise QConvertError(f"the parent directory {parent} of {dest} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise QConvertError(f"cannot write into {parent}; choose a writable -o")


def swap_into_place(new: Path, dest: Path) -> None:
    """Rename the finished directory ``new`` to ``dest``; an existing ``dest`` (checked by the
    caller to be replaceable) is moved aside first and deleted after, so ``dest`` is always
    either the old or the new directory, never a mixture."""
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.resolve().parent, prefix=f".{dest.name}.old-"))
        try:
            os.replace(dest, old / dest.name)
        except OSError:
            old.rmdir()  # nothing moved: ``dest`` is as it was
            raise
        try:
            os.replace(new, dest)
        except OSError:
            os.replace(old / dest.name, dest)  # the old one back
            old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)


@contextlib.contextmanager
def atomic_directory(dest: Path, replace_marker: str | None = None):
    """Yield a temporary directory beside ``dest``; when the block finishes it becomes ``dest``
    (``swap_into_place``); when it fails nothing is left behind, and an OSError becomes a
    QConvertError that says so."""
    tmp = Path(tempfile.mkdtemp(dir=Path(dest).resolve().parent, prefix=f".{Path(dest).name}.tmp-"))
    try:
        # mkdtemp makes it 0700; the finished folder is read by others (a serving container, a web
        # server) as one `mkdir` would have made it: 0777 less the umask
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        swap_into_place(tmp, Path(dest))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise QConvertError(f"writing {dest} failed ({e.strerror or e}); nothing was left behind: fix the cause "
                                "(disk space, permissions) and repeat the command") from e
        raise
