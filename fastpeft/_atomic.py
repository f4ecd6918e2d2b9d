"""Writes that a crash, a second writer or a failing disk cannot leave half done.

- :func:`atomic_file`: one file is written under a temporary name in its destination's directory (the same
  filesystem, so the final ``os.replace`` is atomic) and renamed over the destination only once it is complete.
- :func:`replace_directory`: a set of files (an adapter's weights, config and PEFT's sub-folders) is written into a
  sibling temporary directory and swapped with the destination as a whole.
- :func:`locked`: an advisory lock on a sibling ``.lock`` file, for read-modify-write cycles between processes.

Temporary entries are hidden (``.<name>.<pid>-<random>.tmp``) and sit beside the destination. A write that fails
removes its own; a process killed mid-write cannot, and leaves one such entry behind while the destination stays
as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import sys
import uuid
import warnings
from typing import Callable, Iterable, Iterator, Optional

try:
    import fcntl
except ImportError:  # not POSIX: writers go unlocked (see ``locked``)
    fcntl = None  # type: ignore[assignment]

# Errors of a directory swap that an in-place write does not meet: the destination is a mount point (EBUSY), the
# staging area is on another filesystem (EXDEV), or the parent directory may not be changed (EACCES, EPERM, EROFS).
_CANNOT_SWAP = {errno.EBUSY, errno.EXDEV, errno.EACCES, errno.EPERM, errno.EROFS}


def _temp_name(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _sync_directory(path: str) -> None:
    """Make a rename inside ``path`` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", durable: bool = True, **open_kwargs) -> Iterator:
    """Yield a file object (``open(..., mode, **open_kwargs)``, ``mode`` ``"w"`` or ``"wb"``) on a temporary file
    beside ``path``. When the block ends normally the file is flushed (with ``durable``, also synced to disk) and
    renamed over ``path`` in one step; when it raises, the temporary file is removed and ``path`` is untouched. A
    reader of ``path`` sees the old content or the new, never a part. Permissions follow the umask, as with
    ``open``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _sync_directory(os.path.dirname(path) or ".")


@contextlib.contextmanager
def _flocked(open_descriptor: Callable[[], int]) -> Iterator[bool]:
    """Hold an exclusive advisory lock (``flock``) on the descriptor ``open_descriptor()`` gives, for the block;
    yields whether it is held. Where locks do not exist (no ``fcntl``), the descriptor cannot be opened or the
    filesystem refuses locks, the block runs unlocked. The kernel drops the lock when its holder dies."""
    fd = None
    if fcntl is not None:
        try:
            fd = open_descriptor()
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the lock


def locked(path: str) -> contextlib.AbstractContextManager:
    """An exclusive advisory lock on ``path + ".lock"`` for a ``with`` block (yields whether it is held), so
    processes doing a read-modify-write of ``path`` never lose each other's changes. Where no lock can be had (no
    ``fcntl``, a read-only directory) the block runs unlocked. The lock file is left in place: removing it would let
    a third process lock a new file while a second still holds the old one."""
    return _flocked(lambda: os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o666))


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl < 1.2.3)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(a: str, b: str) -> bool:
    """Swap the directory entries ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system or filesystem cannot, so the caller falls back to two renames."""
    function = _renameat2()
    if function is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if function(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), b)


def _swap_into_place(new: str, target: str) -> Optional[str]:
    """Put directory ``new`` at ``target``; returns the path that now holds the replaced directory (to remove), or
    None when ``target`` did not exist. On an error ``target`` is as it was."""
    if not os.path.lexists(target):
        try:
            os.rename(new, target)
            return None
        except OSError:
            if not os.path.isdir(target):
                raise
            # another writer made target meanwhile: replace its result like any existing directory
    if _exchange(new, target):
        return new
    # No atomic exchange here: for the moment between these two renames target is missing (never a mix); a crash
    # in that moment leaves the previous directory whole under the hidden name ``aside``.
    aside = _temp_name(target)
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException as exc:
        try:
            os.rename(aside, target)
        except OSError:
            raise OSError(f"could not put the new directory at {target!r} ({exc}); the previous one is kept whole "
                          f"at {aside!r}") from exc
        raise
    return aside


def _files_under(root: str) -> list[str]:
    """Relative paths of every file (and link) under ``root``, sub-folders before their parent's files."""
    found = []
    for directory, _, files in os.walk(root, topdown=False):
        found += [os.path.relpath(os.path.join(directory, f), root) for f in sorted(files)]
    return found


def _sync_tree(root: str) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_directory(directory)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no data copied; nothing ever writes through it (the old directory is deleted, not edited)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: str, new: str) -> None:
    """Give ``new`` every entry of ``old`` that it lacks, merging sub-folders entry by entry: what the writer
    produced wins, everything else the directory held is kept (hard-linked where the filesystem allows, else
    copied; links stay links)."""
    for entry in os.scandir(old):
        dst = os.path.join(new, entry.name)
        if entry.is_symlink():
            if not os.path.lexists(dst):
                os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            if not os.path.lexists(dst):
                os.mkdir(dst)
                shutil.copymode(entry.path, dst)
            if os.path.isdir(dst) and not os.path.islink(dst):
                _carry_over(entry.path, dst)
        elif not os.path.lexists(dst):
            _link_or_copy(entry.path, dst)


def _replace_file_by_file(staging: str, target: str, files: Iterable[str]) -> None:
    """Copy each of ``files`` (relative to ``staging``) over its counterpart in ``target``, each one atomically."""
    for rel in files:
        src, dst = os.path.join(staging, rel), os.path.join(target, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(src, "rb") as source, atomic_file(dst, "wb") as out:
            shutil.copyfileobj(source, out)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def replace_directory(path: str, write: Callable[[str], None], seed: Iterable[str] = ()) -> None:
    """Run ``write(directory)`` on a new, empty directory, then put that directory at ``path`` in one step, so a
    reader (and whatever a crash leaves) sees the previous directory or the new one, never a mix of the two.

    - Entries of the previous directory that ``write`` did not produce (a user's README, tokenizer files, other
      sub-folders) are kept: the result is what writing in place would have left, only atomic.
    - ``seed`` names files copied from the previous directory into the new one before ``write`` runs, for writers
      that update a file rather than replace it.
    - If ``write`` or anything after it fails, ``path`` is left as it was and the temporary directory is removed.
    - Where the directory cannot be swapped as a whole (``path`` is a mount point, its parent is read-only) it is
      updated file by file, each file atomically, with a warning.
    - Writers into one parent directory take turns (an advisory lock on the parent), so two processes saving to
      one path each leave a whole directory and neither loses the user's files.
    - Symbolic links in ``path`` are resolved: the directory they lead to is replaced. A process whose working
      directory is inside ``path`` is moved into the new directory; other processes are not.
    """
    target = os.path.realpath(path)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise NotADirectoryError(errno.ENOTDIR, f"{path!r} is a file, not a directory", path)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    # Saves into one parent take turns: a second writer must carry over the user's files from a directory that is
    # not being swapped out and deleted under it.
    with _flocked(lambda: os.open(parent, os.O_RDONLY)):
        _replace_directory_locked(path, target, write, seed)


def _replace_directory_locked(path: str, target: str, write: Callable[[str], None], seed: Iterable[str]) -> None:
    parent = os.path.dirname(target)
    existed = os.path.isdir(target)
    whole = True
    try:
        staging = _temp_name(target)
        os.mkdir(staging)
    except OSError as exc:
        if not existed or exc.errno not in _CANNOT_SWAP:
            raise
        whole, reason = False, exc
        staging = _temp_name(os.path.join(target, "fastpeft-save"))
        os.mkdir(staging)
    leftover: Optional[str] = staging
    try:
        if existed:
            shutil.copymode(target, staging)
            for name in seed:
                if os.path.isfile(os.path.join(target, name)):
                    shutil.copy2(os.path.join(target, name), os.path.join(staging, name))
        write(staging)
        _sync_tree(staging)
        produced = _files_under(staging)
        if whole:
            try:
                cwd: Optional[str] = os.getcwd()
            except OSError:  # this process's working directory was deleted: nothing to follow
                cwd = None
            try:
                if existed:
                    _carry_over(target, staging)
                leftover = _swap_into_place(staging, target)
            except OSError as exc:
                if not existed or exc.errno not in _CANNOT_SWAP:
                    raise
                whole, reason = False, exc
            else:
                _sync_directory(parent)
                if cwd is not None and _inside(cwd, target):
                    with contextlib.suppress(OSError):
                        os.chdir(cwd)  # follow the new directory: the old one is about to be deleted
        if not whole:
            warnings.warn(f"fastpeft: {path!r} cannot be replaced as a whole ({reason}); its files are replaced one "
                          "by one, each atomically, so a reader may see old and new files together while it runs",
                          stacklevel=4)
            _replace_file_by_file(staging, target, produced)
    finally:
        if leftover is not None:
            shutil.rmtree(leftover, ignore_errors=True)
