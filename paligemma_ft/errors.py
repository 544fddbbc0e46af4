"""Errors the user caused and can fix, and the output-folder check that raises one before any work.

Every command reports a `UserError` (and the plain `ValueError` / `FileNotFoundError` that older code raises for
bad flags, configs and files) as one `error: ...` line on stderr with exit code 2, and the app page shows it as a
message; anything else is a bug and keeps its traceback. Subclasses elsewhere: `checkpoints.npz.CheckpointError`,
`checkpoints.kaggle.KaggleError`, `decode.SamplerError`, `training.report.MetricsFileError`.

    from paligemma_ft.errors import UserError, check_output_dir
    check_output_dir("runs/x", "--workdir")   # UserError if it is a file, or cannot be created or written
"""

from __future__ import annotations

import errno
import os
import pathlib
import tempfile

DEBUG_ENV = "PALIGEMMA_FT_DEBUG"  # Set to 1 to see the traceback behind a one-line error (CLI and app page).

# OS errors that come from the user's paths and permissions, not from a bug: reported in one line.
USER_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENOENT,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.ENAMETOOLONG,
        errno.ELOOP,
    }
)


class UserError(Exception):
    """A failure caused by the user's input (a file, flag, config value or environment), with a message that names
    the culprit and what to do. The CLI prints it as one `error: ...` line and exits with code 2."""


class OutputDirError(UserError, ValueError):
    """An output folder (`--workdir`, `--outdir`) that is a file, cannot be created, or cannot be written."""


def is_user_error(error: BaseException) -> bool:
    """True for failures the user can fix: `UserError`, `ValueError`, `FileNotFoundError`, and OS errors about
    the user's paths and permissions (read-only folder, a file where a folder should be, disk full)."""
    if isinstance(error, (UserError, ValueError, FileNotFoundError)):
        return True
    return isinstance(error, OSError) and error.errno in USER_ERRNOS


def describe_os_error(error: OSError) -> str:
    """`path: reason` for an OS error (`/x/y: Read-only file system`), without Python's `[Errno 30]` prefix."""
    reason = error.strerror or str(error)
    names = [str(n) for n in (error.filename, error.filename2) if n is not None]
    return f"{' -> '.join(names)}: {reason}" if names else reason


def check_output_dir(path: str | os.PathLike, flag: str) -> pathlib.Path:
    """Creates the folder `path` if needed and checks that files can be written in it.

    Args:
      path: the folder.
      flag: how the user named it (`--workdir`, `--outdir`), for the message.

    Returns:
      The folder as a `pathlib.Path`.

    Raises:
      OutputDirError: `path` (or a parent) is a file, or the folder cannot be created or written (read-only file
        system, permissions, disk full); the message names the folder and the reason.
    """
    folder = pathlib.Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"{flag} {folder} is a file, not a folder; pass a folder (it is created if needed)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # The message names the parent that failed.
        raise OutputDirError(
            f"{flag} {folder} cannot be written ({describe_os_error(e)}); choose a folder you can write to"
        ) from None
    try:  # A real write: permission bits do not tell about read-only mounts, quotas or root's privileges.
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_check_"):
            pass
    except OSError as e:
        raise OutputDirError(
            f"{flag} {folder} cannot be written ({e.strerror or e}); choose a folder you can write to"
        ) from None
    return folder
