"""Before any work: the output target is a folder lowbit may create or replace, and this run holds it alone.

Refused with one line (LowbitError), before anything is read or written:
  - an output path with no folder name ("", ".", "..")
  - a symbolic link (even dangling, even with --overwrite: replacing it would drop the link, and following
    it would write where the user did not point), or a path that exists but is not a folder
  - a parent that cannot be written (read-only folder or file system) or that is not a folder
  - an output equal to the model folder, inside it, or containing it (--overwrite would delete the model)
  - a file system that cannot hold the lock (no flock: some NFS mounts)

The lock is a file `<output>.lowbit-lock` beside the output, held with flock(2) for the whole run and
holding the owner's pid. The kernel drops a flock when its process dies, so a lock file left by a killed
run is stale by construction and the next run takes it over; a live holder makes a second run on the same
output refuse at once, naming its pid. `atomic_folder` releases the lock when the run ends.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import LowbitError

_HELD: dict[Path, "OutputLock"] = {}  # absolute output path -> the lock this process holds on it


def lock_path(target: Path) -> Path:
    return target.with_name(target.name + ".lowbit-lock")


def nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (the folder mkdir(parents=True) would start from)."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path):
        path = path.parent
    return path


def refuse_unsafe_target(target: Path) -> None:
    """Refuse output paths that cannot be written safely (see the module docstring)."""
    if Path(target).name in ("", ".."):  # "", ".", "/", "a/..": replacing it would replace a folder the user did not name
        raise LowbitError(f"output path {str(target)!r} names no folder", "pass --output_dir with a new folder name, e.g. --output_dir out")
    if target.is_symlink():
        raise LowbitError(f"output {target} is a symbolic link (to {os.readlink(target)})", "pass --output_dir the real folder path, or another path; lowbit does not replace links")
    if target.exists() and not target.is_dir():
        raise LowbitError(f"output {target} exists and is not a folder", "remove the file or choose another --output_dir")
    parent = nearest_existing(target.parent)
    if not parent.is_dir():
        raise LowbitError(f"output parent {parent} is not a folder", "choose an --output_dir whose parent is a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LowbitError(f"output parent {parent} is not writable", "choose an --output_dir in a folder you can write, or fix its permissions")


def refuse_source_overlap(target: Path, model_folder: Path) -> None:
    """Refuse an output that is the model folder, lies inside it, or contains it (compared resolved)."""
    out, model = Path(os.path.realpath(target)), Path(os.path.realpath(model_folder))
    if out == model:
        raise LowbitError(f"output {target} is the model folder {model_folder}", "choose another --output_dir; lowbit never writes over its input")
    if out.is_relative_to(model):
        raise LowbitError(f"output {target} is inside the model folder {model_folder}", "choose an --output_dir outside the checkpoint folder")
    if model.is_relative_to(out):
        raise LowbitError(f"output {target} contains the model folder {model_folder}", "choose an --output_dir that does not hold the checkpoint")


class OutputLock:
    """An exclusive flock on `<output>.lowbit-lock`, held until `release()`."""

    def __init__(self, target: Path):
        self.target = Path(os.path.abspath(target))
        self.path = lock_path(self.target)
        self.fd: int | None = None

    @classmethod
    def acquire(cls, target: Path) -> "OutputLock":
        """Take the lock or refuse at once, naming the holder's pid. Returns the held lock."""
        lock = cls(target)
        if lock.target in _HELD:
            raise LowbitError(f"output {target} is already being written by this process", "wait for that run to finish or choose another --output_dir")
        while True:
            try:
                lock.path.parent.mkdir(parents=True, exist_ok=True)  # the output's parents, as the run would make them
                fd = os.open(lock.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise LowbitError(f"cannot create the lock file {lock.path}: {err.strerror}", "choose an --output_dir in a folder you can write") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise LowbitError(f"output {target} is being written by another lowbit run (pid {holder})", "wait for it to finish, or choose another --output_dir") from None
            except OSError as err:  # ENOLCK / EOPNOTSUPP: a file system without flock (some NFS mounts)
                os.close(fd)
                os.unlink(lock.path)
                raise LowbitError(f"cannot lock {lock.path}: {err.strerror} (the file system offers no flock)",
                                  "choose an --output_dir on a local file system") from None
            # the holder may have released and unlinked the file between our open and flock: retry on the new one
            try:
                same = os.stat(lock.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # a stale file (dead holder) is simply taken over
        lock.fd = fd
        _HELD[lock.target] = lock
        return lock

    def release(self) -> None:
        if self.fd is None:
            return
        _HELD.pop(self.target, None)
        try:
            os.unlink(self.path)  # unlinked while still locked, so no one can take a file that is going away
        except FileNotFoundError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def release_if_fails(self, check, *args):
        """Run `check(*args)` and return its result; if it raises, release the lock first (the run ends
        before atomic_folder)."""
        try:
            return check(*args)
        except BaseException:
            self.release()
            raise


def release_output_lock(target: Path) -> None:
    """Release this process's lock on `target`, if it holds one (called when atomic_folder ends)."""
    lock = _HELD.get(Path(os.path.abspath(target)))
    if lock is not None:
        lock.release()
