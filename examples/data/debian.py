"""A Debian package's files without installing it: ``apt-get download`` into a temporary folder, ``dpkg -x``.

Used by the offline data sets (Jane Austen's novels, Fashion-MNIST, MovieLens): no root is needed, nothing is
installed, and only the package itself is fetched (not its dependencies).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


class PackageUnavailable(RuntimeError):
    """``apt-get download`` or ``dpkg -x`` is missing or failed; the message says which and why."""


def unpack_package(package: str, target: str | Path, timeout: float = 600) -> None:
    """Download ``package`` with ``apt-get download`` and unpack its files under ``target`` with ``dpkg -x``.

    On a fresh machine without package lists, as root, ``apt-get update`` runs once and the download is retried.

    Raises:
        PackageUnavailable: with the failing command and the end of its error output.
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise PackageUnavailable("apt-get and dpkg are not available (not Debian/Ubuntu)")
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    download = ["apt-get", "download", package]
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        try:
            run = subprocess.run(download, cwd=tmp, capture_output=True, text=True, timeout=timeout)
            if run.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True, timeout=timeout)
                run = subprocess.run(download, cwd=tmp, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError) as err:
            raise PackageUnavailable(f"`apt-get download {package}` failed: {err}") from err
        debs = sorted(glob.glob(os.path.join(tmp, "*.deb")))
        if run.returncode != 0 or not debs:
            raise PackageUnavailable(
                f"`apt-get download {package}` failed (exit {run.returncode}): {run.stderr.strip()[-400:]}"
            )
        unpack = subprocess.run(["dpkg", "-x", debs[-1], str(target)], capture_output=True, text=True)
        if unpack.returncode != 0:
            raise PackageUnavailable(f"`dpkg -x {debs[-1]}` failed: {unpack.stderr.strip()[-400:]}")
