"""Download CIFAR-10 (python format) into a cache folder, all or nothing.

The archive is streamed to a temporary file beside the target, its MD5 is checked, it
is unpacked into a temporary folder, the result is validated with load_cifar10, and only
then is the folder renamed into place. Any failure or interruption removes the
temporaries, so the target folder is either absent, the old one, or complete.
"""

import hashlib
import http.client
import os
import pathlib
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib

from .cifar import DataError, load_cifar10

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"


class DownloadError(RuntimeError):
    """The archive could not be fetched, verified or unpacked (one line, for the user)."""


def default_dir():
    """The user cache folder dpnet.train searches: $XDG_CACHE_HOME/dpnet or ~/.cache/dpnet."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "dpnet")


def _as_url(url):
    """A URL, or an existing local file given as a plain path (turned into file://)."""
    if "://" not in url and os.path.isfile(url):
        return pathlib.Path(url).resolve().as_uri()
    return url


def _mib(n):
    return f"{n / 2**20:.1f} MiB"


class _Progress:
    """A single updating line on a terminal; on a log file, one line at the end."""

    def __init__(self, name, total, stream):
        self.name, self.total, self.stream = name, total, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.started = self.shown = time.monotonic()

    def update(self, done, final=False):
        now = time.monotonic()
        if not final and (not self.tty or now - self.shown < 0.2):
            return
        self.shown = now
        of = f" / {_mib(self.total)} ({100 * done / self.total:.0f}%)" if self.total else ""
        rate = done / max(now - self.started, 1e-9)
        line = f"downloading {self.name}: {_mib(done)}{of}, {_mib(rate)}/s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        elif final:
            self.stream.write(line + "\n")
        self.stream.flush()


def _open(url, timeout):
    """The HTTP (or file) response for url, or DownloadError if it cannot be reached."""
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, timeouts, bad URLs
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"cannot reach {url}: {reason}; download {URL.rsplit('/', 1)[-1]} elsewhere "
                            "and pass it as --url FILE, or unpack it and pass --data PATH to "
                            "dpnet.train") from exc


def _fetch(url, response, dest, expected_md5, stream):
    """Stream the response into the open binary file dest and check its MD5."""
    md5 = hashlib.md5()
    done = 0
    total = int(response.headers.get("Content-Length") or 0)
    progress = _Progress(url.rsplit("/", 1)[-1] or url, total, stream)
    while True:
        try:
            block = response.read(1 << 20)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # reset, timeout, ...
            raise DownloadError(f"download of {url} interrupted after {_mib(done)}: "
                                f"{type(exc).__name__}: {exc}") from exc
        if not block:
            break
        dest.write(block)
        md5.update(block)
        done += len(block)
        progress.update(done)
    progress.update(done, final=True)
    if total and done != total:
        raise DownloadError(f"download of {url} interrupted: got {done} of {total} bytes")
    got = md5.hexdigest()
    if expected_md5 and got != expected_md5.lower():
        raise DownloadError(f"{url}: MD5 mismatch, expected {expected_md5.lower()}, got {got} "
                            "(corrupt or incomplete download)")


def _unpack(archive, into):
    """Extract the tar.gz archive into the folder `into`, refusing links and escaping paths."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                parts = pathlib.PurePosixPath(m.name).parts
                if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in parts:
                    raise DownloadError(f"refusing archive member {m.name!r} (a link or a path outside)")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, members=members, filter="data")
            else:  # older Pythons without extraction filters; members were checked above
                tar.extractall(into, members=members)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DownloadError(f"cannot unpack the downloaded archive: {exc}") from exc


def download_cifar10(directory=None, url=URL, md5=MD5, force=False, stream=None, timeout=60):
    """Fetch, verify and unpack CIFAR-10 to directory/cifar-10-batches-py; return that path.

    Raises DownloadError (nothing left behind) on any failure, and when a valid folder is
    already there and force is false.
    """
    directory = os.path.abspath(directory or default_dir())
    stream = sys.stderr if stream is None else stream
    target = os.path.join(directory, FOLDER)
    if os.path.exists(target) and not force:
        try:
            load_cifar10(target)
        except DataError as exc:
            stream.write(f"replacing the unusable {target} ({exc})\n")
        else:
            raise DownloadError(f"{target} already holds a valid CIFAR-10; pass --force to download "
                                "it again")
    url = _as_url(url)
    response = _open(url, timeout)  # before creating anything: offline leaves no trace
    created = _missing_parents(directory)
    archive = staging = None
    done = False
    try:
        os.makedirs(directory, exist_ok=True)
        fd, archive = tempfile.mkstemp(dir=directory, prefix=".cifar-10-download-", suffix=".tar.gz")
        with response, os.fdopen(fd, "wb") as dest:
            _fetch(url, response, dest, md5, stream)
        staging = tempfile.mkdtemp(dir=directory, prefix=".cifar-10-unpack-")
        _unpack(archive, staging)
        _remove(archive)  # the unpacked copy is what matters; free the space now
        unpacked = os.path.join(staging, FOLDER)
        if not os.path.isdir(unpacked):
            raise DownloadError(f"the archive from {url} has no {FOLDER}/ folder")
        try:
            load_cifar10(unpacked)
        except DataError as exc:
            raise DownloadError(f"the archive from {url} is not valid CIFAR-10: {exc}") from exc
        old = None
        if os.path.lexists(target):  # --force or a broken folder: the old copy goes with staging
            old = os.path.join(staging, "old")
            os.rename(target, old)
        try:
            os.rename(unpacked, target)
        except OSError:
            if old:
                os.rename(old, target)
            raise
        done = True
        return target
    finally:
        response.close()
        if archive:
            _remove(archive)
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
        if not done:  # leave no empty folder we made behind either
            for folder in created:
                try:
                    os.rmdir(folder)
                except OSError:
                    break


def _missing_parents(directory):
    """The folders makedirs(directory) would create, deepest first."""
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return missing


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
