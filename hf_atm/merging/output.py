"""The output folder's lifecycle: check it, lock it, stage the new one beside it, swap it in atomically, clean up.

:func:`staged_output` is what every writer of a merged folder (``hf_atm.merging.engine.run_merge``,
``hf_atm.lora.export.merge_adapters_to_lora``) wraps its writing in:

* :func:`check_output` refuses an existing non-folder, or a non-empty folder without ``overwrite``
  (OutputExistsError); callers also run it before any work, so that a doomed merge fails at once;
* the lock: ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``.<name>.lock`` beside the output, held until the end, so a
  second merge into the same folder fails at once (OutputBusyError). The kernel drops a flock when its process
  dies, so the lock file a killed merge leaves behind blocks nothing; the file is removed at the end;
* the new folder is written into ``.<name>.tmp-<hex>`` beside the output (same filesystem: renames are atomic),
  after leftovers of killed merges into the same output (``.<name>.tmp-*`` / ``.<name>.old-*``, only ever
  written under the lock) are removed;
* on success the temporary folder becomes the output: a plain rename, or, replacing an existing folder, one
  ``renameat2(RENAME_EXCHANGE)`` (Linux), so that at every moment the output path holds the complete old
  folder or the complete new one; the old one, now at the temporary name, is removed after;
* on any error, and on SIGINT / SIGTERM (turned into :class:`Interrupted` while the folder is staged), the
  temporary folder is removed and the old output is untouched; "no space left on device" becomes DiskFullError.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from hf_atm.errors import DiskFullError, OutputBusyError, OutputExistsError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "NO_SPACE_ERRNOS",
    "Interrupted",
    "check_free_space",
    "check_output",
    "format_bytes",
    "free_bytes",
    "lock_path",
    "staged_output",
]

#: errno values meaning "the device (or the user's quota) is full".
NO_SPACE_ERRNOS: frozenset[int] = frozenset({errno.ENOSPC, errno.EDQUOT})


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while an output was staged (``signum`` says which).

    A KeyboardInterrupt, so that code stopping on Ctrl-C stops on SIGTERM too; the CLI exits with 128 + signum.
    """

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def format_bytes(n: int) -> str:
    """``"3.1 MB (3,145,728 bytes)"``: a size for messages (decimal units, exact count)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def free_bytes(path: Path) -> int:
    """Bytes free (to this user) on the filesystem holding `path`."""
    return shutil.disk_usage(path).free


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """DiskFullError when the filesystem of `folder` has fewer than `needed` bytes free for `what`."""
    free = free_bytes(folder)
    if needed > free:
        raise DiskFullError(
            f"not enough free space for {what}: it needs {format_bytes(needed)} but only {format_bytes(free)} "
            f"are free on the filesystem of {folder.parent}; free some space or choose another --output"
        )


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-folder, or a non-empty folder without `overwrite` (OutputExistsError)."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputExistsError(f"output {out} exists and is not a folder")
        if not overwrite and any(out.iterdir()):
            raise OutputExistsError(
                f"output folder {out} exists and is not empty; pass --overwrite to replace it "
                "(the old folder is replaced only once the new merge is complete)"
            )


def lock_path(out: Path) -> Path:
    """The lock file of output folder `out`: ``.<name>.lock`` beside it."""
    return out.parent / f".{out.name}.lock"


# ------------------------------------------------------------------------------------------------ the lock
@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold the output's flock for the block (OutputBusyError at once if another process holds it)."""
    path = lock_path(out)
    if fcntl is None:  # pragma: no cover
        yield
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusyError(
                f"output folder {out} is being written by another merge right now (it holds the lock {path}); "
                "wait for it to finish or choose another --output"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            fd = -1  # pragma: no cover - a filesystem without flock: go on unlocked
            break
        # The holder removes the file before releasing it: a lock won on a file that is no longer the one at
        # `path` guards nothing, so open the current one again.
        try:
            st = os.stat(path)
            current = (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    if fd < 0:  # pragma: no cover
        yield
        return
    try:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding it (see above)
        with contextlib.suppress(OSError):
            os.close(fd)


# --------------------------------------------------------------------------------------------- signals
class _Signals:
    """While entered (main thread only): SIGINT and SIGTERM, where they have Python's default handling, raise
    :class:`Interrupted`; inside :meth:`held` they are only noted, and :meth:`raise_pending` raises them after.

    A handler the program installed, or an ignored signal, is left alone; the previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}
        self.holding = 0
        self.pending: int | None = None

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
                if signal.getsignal(sig) is default:
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self.previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.holding:
            if self.pending is None:
                self.pending = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1

    def raise_pending(self) -> None:
        signum, self.pending = self.pending, None
        if signum is not None:
            raise Interrupted(signum)


# ---------------------------------------------------------------------------------------------- commit
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _load_renameat2() -> object | None:
    """libc's ``renameat2`` (Linux, glibc >= 2.28), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` in one atomic step (True), or False where RENAME_EXCHANGE is unavailable."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:  # type: ignore[operator]
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel / a filesystem without the flag
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _remove(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _commit(tmp: Path, out: Path) -> None:
    """Make the finished `tmp` folder `out`; an existing `out` stays complete until `tmp` takes its place."""
    if not (out.exists() or out.is_symlink()) or (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):
        os.rename(tmp, out)  # onto nothing, or onto an empty folder (which rename replaces in one step)
        return
    if _exchange(tmp, out):
        _remove(tmp)  # the old folder, now at the temporary name
        return
    # Fallback where renameat2 / RENAME_EXCHANGE is unavailable (not Linux, glibc < 2.28, a filesystem without
    # the flag): two renames. A kill between them leaves the old folder at .<name>.old-<hex> and no <name>.
    old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    _remove(old)


def _leftovers(out: Path) -> list[Path]:
    """Temporary / old folders of earlier merges into `out` that were killed before cleaning up."""
    prefixes = (f".{out.name}.tmp-", f".{out.name}.old-")
    return [p for p in out.parent.iterdir() if p.name.startswith(prefixes)]


def _is_no_space(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in NO_SPACE_ERRNOS
    text = str(e)  # safetensors' writer reports the OS error in its message
    return "No space left on device" in text or "(os error 28)" in text


# ---------------------------------------------------------------------------------------------- staging
@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Check and lock output folder `out`, yield a fresh temporary folder beside it, and make that folder `out`
    when the block completes (see the module docstring). On any error or signal the temporary folder is removed
    (and parent folders this call created), `out` is as it was, and the error propagates (no space left on
    device as DiskFullError, SIGINT / SIGTERM as :class:`Interrupted`)."""
    out = Path(out)
    check_output(out, overwrite)
    created = []
    for parent in [out.parent, *out.parent.parents]:
        if parent.exists():
            break
        created.append(parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    signals = _Signals()
    try:
        with signals, _locked(out):
            check_output(out, overwrite)  # again, now that no other merge can change it
            for stale in _leftovers(out):
                _remove(stale)
            tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
            tmp.mkdir()
            try:
                yield tmp
                with signals.held():  # a signal during the commit waits for its end
                    _commit(tmp, out)
                signals.raise_pending()
            except BaseException as e:
                with signals.held():
                    if tmp.exists() or tmp.is_symlink():
                        _remove(tmp)
                if _is_no_space(e) and not isinstance(e, DiskFullError):
                    raise DiskFullError(
                        f"no space left on the device of {out.parent} while writing the output {out} "
                        f"({format_bytes(free_bytes(out.parent))} free now): {e}"
                    ) from e
                raise
    except BaseException:
        for folder in created:  # innermost first; only while empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
