"""The embedded Ray's run directory and its auth token: where they are, who may read them.

Ray's token authentication is on by default (``RAY_AUTH_MODE=token``, set by
:func:`detserve.runtime.offline.environment`); the token lives in the run
directory, owner-only, so the embedded Ray, its workers and any driver that
attaches to it (:func:`detserve.serve.run.attach`) read one token from one place.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def run_dir() -> Path:
    """The embedded Ray's run directory (its ``_temp_dir``): ``DETSERVE_RAY_TMP`` or /tmp/detserve-ray-<uid>."""
    return Path(os.environ.get("DETSERVE_RAY_TMP", f"/tmp/detserve-ray-{os.getuid()}"))


def auth_dir(folder: Path | None = None) -> Path:
    """The owner-only (0700) folder of the run directory that holds the Ray token and the cluster address."""
    return (folder or run_dir()) / "auth"


def enabled() -> bool:
    """Whether Ray token authentication is on (the default; ``RAY_AUTH_MODE=disabled`` turns it off)."""
    return os.environ.get("RAY_AUTH_MODE", "token") != "disabled"


def private_dir(folder: Path) -> Path:
    """``folder``, made owner-only (0700); refuses a link or a folder of another user (someone could read or plant files in it)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
        raise RuntimeError(f"{folder} is a link or belongs to another user; remove it (DETSERVE_RAY_TMP moves the Ray run folder elsewhere)")
    os.chmod(folder, 0o700)
    return folder


def token_file(folder: Path | None = None) -> Path:
    """The Ray auth token of this run directory: made once (64 hex chars), mode 0600 in a 0700 folder.

    Reused on later starts so that a second cluster, or a driver attached to the
    first, sharing the run directory keeps working; delete it to rotate the token.
    """
    path = private_dir(auth_dir(folder)) / "token"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise RuntimeError(f"{path} is not a plain file of yours; remove it and start again") from None
        os.chmod(path, 0o600)
        if path.read_text().strip():
            return path
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")
    return path


def environment(folder: Path | None = None) -> dict[str, str]:
    """The Ray auth variables of the run directory's cluster: mode, and the token file when auth is on.

    Created here (the token file too) so that the embedded Ray, its workers and
    any driver attaching to it read one token from one place.
    """
    if not enabled():
        return {"RAY_AUTH_MODE": "disabled"}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file(folder))}
