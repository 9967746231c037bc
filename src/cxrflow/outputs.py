"""Publishing output folders safely: a marker, a lock, a temporary name, then a rename.

Every command that writes a folder (``etl``, ``evaluate``, ``train``, ``report``, ``explore``,
``sweep``, ``synth``, ``demo``, and what comes later) goes through this module, so that cxrflow never deletes
or replaces what it did not write, and two runs never write the same folder at once.

- **Marker.** A folder written by ``cxrflow <command>`` holds ``.cxrflow-<command>.json`` (a JSON
  object naming its ``producer``, version and time). ``--overwrite`` replaces only a folder that
  carries the same command's marker; anything else (a folder of the user's, another command's
  output, a file, the home or root folder, a folder holding the current one, any input of the run
  or a folder holding one) is refused with one line saying it is not a cxrflow output.
- **Lock.** ``.<name>.lock`` beside the target holds the owner's pid, host and command and an
  exclusive ``flock``: a second run on the same output stops at once with one line naming the
  holder. The kernel releases the lock when its process dies, so the lock of a killed run is
  reclaimed by the next one (on file systems without ``flock``, a lock of a dead process on the same
  host is reclaimed from its pid).
- **Temporary name, then rename.** A whole-folder output is written into
  ``.<name>.partial-<hex>/`` beside the target and renamed into place only when complete; the old
  output is moved to ``.<name>.old-<hex>/`` first and deleted after. Folders are created with the
  user's normal permissions (0777 less the umask).
- **Leftovers.** ``.partial-*`` / ``.old-*`` folders of a killed run that carry the command's
  marker are removed by the next run on the same output; :func:`leftovers` lists them (``cxrflow
  store-info`` shows them).

Public API (small on purpose)::

    with publishing(out, "evaluate", overwrite=False, inputs=[run]) as pub:   # whole folder
        write files into pub.tmp ...
        pub.commit(extra="info for the marker")
    with claiming(out, "train", overwrite=False, resume=False):            # folder written in place
        ...
    check_target(out, command, overwrite=..., inputs=...)   # the refusal rules alone, no side effect
    read_marker(folder, command) / write_marker(folder, command, **info) / leftovers(out)

A new command picks a name (its subcommand), calls :func:`check_target` before any long work for a
fast refusal, then writes everything inside ``publishing`` (or ``claiming`` for a resumable folder).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cxrflow import __version__
from cxrflow.errors import CxrflowError
from cxrflow.safeio import CONFIG_BYTES, read_json

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

PathLike = str | os.PathLike


def marker_name(command: str) -> str:
    """The marker file of ``cxrflow <command>``'s outputs: ``.cxrflow-<command>.json``."""
    return f".cxrflow-{command}.json"


def write_marker(folder: PathLike, command: str, **info: Any) -> Path:
    """Mark ``folder`` as written by ``cxrflow <command>`` (``info`` is kept in the marker)."""
    from cxrflow.atomic import write_json_atomic

    path = Path(folder) / marker_name(command)
    write_json_atomic(
        path,
        {
            "producer": f"cxrflow {command}",
            "cxrflow_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **info,
        },
    )
    return path


def read_marker(folder: PathLike, command: str) -> dict | None:
    """The marker of ``folder`` when it is a ``cxrflow <command>`` output, else None.

    A marker counts only when it parses as a JSON object whose ``producer`` (absent in markers of
    early versions) names the command.
    """
    path = Path(folder) / marker_name(command)
    try:
        if not path.is_file():
            return None
        data = read_json(path, "marker", CONFIG_BYTES)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("producer", f"cxrflow {command}") != f"cxrflow {command}":
        return None
    return data


def _marked_by(folder: Path) -> list[str]:
    """Commands whose valid marker ``folder`` carries."""
    try:
        names = [p.name for p in folder.glob(".cxrflow-*.json")]
    except OSError:
        return []
    commands = [n[len(".cxrflow-") : -len(".json")] for n in names]
    return sorted(c for c in commands if read_marker(folder, c) is not None)


#: Outputs that later stages read and that never hold another output: stores and collections.
SEALED = ("etl", "synth")


def inside_sealed(out: PathLike, command: str, itself: bool = True) -> str | None:
    """Why ``out`` may not be written by ``cxrflow <command>``: it is (with ``itself``), or is inside, a
    store or a collection (a folder carrying an ``etl`` or ``synth`` marker) not this command's own; else None."""
    real = Path(os.path.realpath(out))
    for folder in (real, *real.parents) if itself else real.parents:
        for sealed in _sealed_by(folder):
            if folder != real or sealed != command:
                where = "a" if folder == real else "inside a"
                return f"is {where} cxrflow {sealed} output ({folder}); outputs never go into a store or a collection"
    return None


def _sealed_by(folder: Path) -> list[str]:
    """The sealed commands whose output ``folder`` is: by marker, or (a store written without one, as
    tests and older versions do) by a store's manifest beside its ``size=`` folders."""
    found = [c for c in SEALED if read_marker(folder, c) is not None]
    with contextlib.suppress(OSError):
        manifest = (folder / "_manifest.json").is_file()
        if not found and manifest and any(p.name.startswith("size=") for p in folder.iterdir()):
            found.append("etl")
    return found


def refuse_inside_sealed(out: PathLike, command: str, itself: bool = True) -> None:
    """CxrflowError when :func:`inside_sealed` says why ``out`` may not be written."""
    why = inside_sealed(out, command, itself)
    if why is not None:
        raise CxrflowError(f"{why}; choose another folder", out)


def file_listing(folder: PathLike) -> list[str]:
    """Every file under ``folder`` (links not followed, listed as files), as relative POSIX paths,
    without the markers at its top: what a marker's ``files`` records, and what an overwrite may delete."""
    folder = Path(folder)
    found = []
    for root, dirs, files in os.walk(folder):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        found += [Path(os.path.relpath(os.path.join(root, n), folder)).as_posix() for n in files + links]
    return sorted(p for p in found if not (p.startswith(".cxrflow-") and p.endswith(".json") and "/" not in p))


def foreign_file(out: PathLike, marker: dict) -> str | None:
    """The first file in ``out`` that its marker's ``files`` does not list (a file cxrflow did not write),
    or None (also for markers of versions that listed no files)."""
    listed = marker.get("files")
    if not isinstance(listed, list):
        return None
    known = set(listed)
    return next((p for p in file_listing(out) if p not in known), None)


def note_written(folder: PathLike, *names: str) -> None:
    """Add ``names`` (files cxrflow writes into a published folder after its commit, such as a tracking
    record) to the file list of each marker the folder carries; call it before writing them."""
    from cxrflow.atomic import write_json_atomic

    folder = Path(folder)
    for command in _marked_by(folder):
        marker = read_marker(folder, command) or {}
        listed = marker.get("files")
        if isinstance(listed, list) and not set(names) <= set(listed):
            write_json_atomic(folder / marker_name(command), {**marker, "files": sorted({*listed, *names})})


def _protected(out: Path, inputs: Iterable[PathLike]) -> str | None:
    """Why ``out`` must never be replaced (an input, a folder holding one, home, root), or None."""
    real = Path(os.path.realpath(out))
    for item in inputs:
        if item is None or str(item) == "":
            continue
        inp = Path(os.path.realpath(item))
        if real == inp:
            return f"is the input {item}"
        if real in inp.parents:
            return f"holds the input {item}"
    for special, what in ((Path.home(), "your home folder"), (Path(real.anchor), "the root folder")):
        if real == Path(os.path.realpath(special)):
            return f"is {what}"
    cwd = Path(os.path.realpath(os.getcwd()))
    if real == cwd:  # even empty: publishing renames over it, and the shell is left in a deleted folder
        return "is the current folder"
    if real in cwd.parents:
        return "holds the current folder"
    return None


def check_target(
    out: PathLike,
    command: str,
    *,
    overwrite: bool = False,
    inputs: Iterable[PathLike] = (),
    how: str = "pass --overwrite to replace it",
) -> None:
    """Refuse ``out`` unless it is absent, an empty folder, or (with ``overwrite``) this command's output.

    ``inputs`` are the paths the run reads: ``out`` may be neither one of them nor hold one.
    ``how`` ends the refusal of an existing output without ``overwrite``. While another run holds
    ``out``'s lock, a refusal names that run instead (its output is being written, not finished).
    """
    try:
        _check_target(Path(out), command, overwrite=overwrite, inputs=inputs, how=how)
    except CxrflowError:
        lock = OutputLock(out, command)
        holder = lock.busy()
        if holder is not None:
            raise lock.refusal(holder) from None
        raise


def _check_target(out: Path, command: str, *, overwrite: bool, inputs: Iterable[PathLike], how: str) -> None:
    if out.is_symlink():  # publishing renames over the link itself, never into what it points at
        raise CxrflowError(
            "is a symbolic link (cxrflow writes outputs only to real folders); refusing to replace it, "
            "choose another --out or give the folder it points at",
            out,
        )
    if out.exists() and not out.is_dir():
        raise CxrflowError(
            "exists and is not a folder (not a cxrflow output); refusing to replace it, choose another --out", out
        )
    why = _protected(out, inputs)
    if why is not None:
        raise CxrflowError(f"{why}, not a cxrflow {command} output; refusing to replace it, choose another --out", out)
    refuse_inside_sealed(out, command, itself=False)  # the folder itself: by its marker, below
    try:
        empty = not out.is_dir() or next(os.scandir(out), None) is None
    except OSError as exc:
        raise CxrflowError(f"cannot read the folder: {exc.strerror or exc}", out) from None
    if empty:
        return
    if read_marker(out, command) is None:
        others = _marked_by(out)
        what = (
            f"a cxrflow {others[0]} output, not a cxrflow {command} output"
            if others
            else (f"not a cxrflow {command} output (no {marker_name(command)})")
        )
        raise CxrflowError(f"folder exists and is {what}; refusing to replace it, choose another --out", out)
    if not overwrite:
        raise CxrflowError(f"a cxrflow {command} output already exists here; {how}", out)
    _refuse_foreign(out, command)


def _refuse_foreign(out: Path, command: str) -> None:
    foreign = foreign_file(out, read_marker(out, command) or {})
    if foreign is not None:
        raise CxrflowError(
            f"holds {foreign}, which cxrflow {command} did not write; refusing to replace the folder "
            "(move that file out of it, or choose another --out)",
            out,
        )


def leftovers(out: PathLike) -> list[Path]:
    """``.<name>.partial-<hex>`` / ``.<name>.old-<hex>`` folders beside ``out`` (left by a killed run).

    Names are compared as text, never as a glob pattern: ``st[12]`` is a name, not ``st1`` or ``st2``.
    """
    out = Path(out).absolute()
    pattern = re.compile(re.escape(f".{out.name}.") + r"(partial|old)-[^./]+")
    try:
        names = [entry.name for entry in os.scandir(out.parent)]
    except OSError:
        return []
    found = [out.parent / n for n in names if pattern.fullmatch(n)]
    return sorted(p for p in found if p.is_dir() and not p.is_symlink())


def _remove_leftovers(out: Path, command: str) -> None:
    """Delete the leftovers of ``out`` that carry this command's marker naming ``out`` (call with the lock held)."""
    for folder in leftovers(out):
        marker = read_marker(folder, command)
        if marker is not None and marker.get("target", out.name) == out.name:
            shutil.rmtree(folder, ignore_errors=True)


def _make_folder(path: Path, mode: int | None = None) -> None:
    """mkdir with the user's normal permissions (0777 less the umask), never mkdtemp's 0700; with
    ``mode``, that mode (of the folder it replaces)."""
    os.mkdir(path, 0o777)
    if mode is not None:
        os.chmod(path, mode)


def _keep_mode(out: Path, tmp: Path) -> None:
    """Give ``tmp`` the mode of the real folder ``out`` it is about to replace (a private folder stays private)."""
    with contextlib.suppress(FileNotFoundError):
        info = os.lstat(out)
        if stat.S_ISDIR(info.st_mode):
            os.chmod(tmp, stat.S_IMODE(info.st_mode))


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (killed, not yet reaped) does not: its flock is already released."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True  # no /proc (not Linux): the pid exists


def _lock_file_of_ours(fd: int) -> bool:
    """Whether the open file ``fd`` can be cxrflow's lock file: a regular file with one name, empty
    (just created) or holding a holder record (left by a killed run)."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        return False
    text = os.pread(fd, 4096, 0)
    if not text.strip():
        return True
    try:
        record = json.loads(text)
    except ValueError:
        return False
    return isinstance(record, dict) and "pid" in record


class OutputLock:
    """An exclusive lock on one output path: ``.<name>.lock`` beside it, with the holder's pid and host."""

    def __init__(self, out: PathLike, command: str):
        self.out = Path(out).absolute()
        self.command = command
        self.path = self.out.parent / f".{self.out.name}.lock"
        self.fd: int | None = None

    def _holder(self) -> dict:
        for _ in range(20):  # a holder that has just created the file writes its name right after
            try:
                data = json.loads(self.path.read_text() or "null")
            except FileNotFoundError:
                return {}
            except (OSError, ValueError):
                data = None
            if isinstance(data, dict):
                return data
            time.sleep(0.01)
        return {}

    def refusal(self, holder: dict) -> CxrflowError:
        who = f"cxrflow {holder.get('command', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started', '?')})"
        return CxrflowError(
            f"locked by {who}, which is writing this output now; wait for it to finish or choose another --out",
            self.out,
        )

    def busy(self) -> dict | None:
        """The holder's record while a live process holds this lock, else None; takes nothing.

        Read from the lock file (a live pid on this host, or any record from another host), so a
        probe never takes the lock from under a run that is about to acquire it.
        """
        holder = self._holder() if self.path.exists() else {}
        if not holder:
            return None
        if holder.get("host") != socket.gethostname():
            return holder
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid == os.getpid() or not _pid_alive(pid):
            return None
        return holder

    def acquire(self) -> OutputLock:
        """Take the lock or raise a CxrflowError naming the holder."""
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CxrflowError(f"cannot create the folder: {exc.strerror or exc}", self.out.parent) from None
        while True:
            try:  # never through a link: truncating it would empty the file it points at
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise CxrflowError(
                        "is a symbolic link, not cxrflow's lock file; refusing to write through it "
                        "(remove it, or choose another --out)",
                        self.path,
                    ) from None
                raise CxrflowError(f"cannot create the lock file: {exc.strerror or exc}", self.path) from None
            if not _lock_file_of_ours(fd):
                os.close(fd)
                raise CxrflowError(
                    "exists and is not cxrflow's lock file (another file's content or links); refusing to "
                    "replace it (remove it, or choose another --out)",
                    self.path,
                )
            try:
                locked = self._flock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                os.close(fd)
                raise self.refusal(self._holder())
            try:  # the file we locked must still be the lock file (a releasing holder unlinks it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        self.fd = fd
        return self

    def _flock(self, fd: int) -> bool:
        """True when this process now holds the lock on ``fd``."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        # no flock here: the lock is held when a live process on this host (or any other host) wrote it
        holder = self._holder()
        if not holder:
            return True
        same_host = holder.get("host") == socket.gethostname()
        return same_host and not _pid_alive(int(holder.get("pid", 0) or 0)) or holder.get("pid") == os.getpid()

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --------------------------------------------------------------------------------------- publishing


class Publication:
    """A whole-folder output being written: ``tmp`` to fill, :meth:`commit` to put it in place.

    Use :func:`publishing`. Leaving the ``with`` block without a commit (an error, a kill) deletes
    ``tmp``; the lock is released either way.
    """

    def __init__(self, out: Path, command: str, tmp: Path):
        self.out, self.command, self.tmp = out, command, tmp
        self.committed = False

    def commit(self, **info: Any) -> Path:
        """Mark ``tmp`` (``info`` goes into the marker) and rename it onto ``out``; returns ``out``."""
        write_marker(self.tmp, self.command, **{"files": file_listing(self.tmp), **info})
        old = None
        _keep_mode(self.out, self.tmp)
        if self.out.is_dir() and not self.out.is_symlink():
            if read_marker(self.out, self.command) is not None:
                _refuse_foreign(self.out, self.command)
                old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(self.out, old)
            else:
                try:
                    os.rmdir(self.out)  # an empty folder; fails if someone put files in it since the check
                except OSError:
                    raise CxrflowError(
                        "folder is no longer empty and not a cxrflow output; left as it is", self.out
                    ) from None
        try:
            os.replace(self.tmp, self.out)
        except BaseException:
            if old is not None and not self.out.exists():
                os.replace(old, self.out)
            raise
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


@contextlib.contextmanager
def publishing(
    out: PathLike, command: str, *, overwrite: bool = False, inputs: Iterable[PathLike] = ()
) -> Iterator[Publication]:
    """Lock ``out``, check it may be (re)placed, yield a :class:`Publication` with a fresh ``tmp``.

    The checks of :func:`check_target` run before the lock (fast refusal) and again under it.
    """
    out = Path(out).absolute()
    inputs = list(inputs)
    check_target(out, command, overwrite=overwrite, inputs=inputs)
    with OutputLock(out, command):
        check_target(out, command, overwrite=overwrite, inputs=inputs)
        _remove_leftovers(out, command)
        tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        _make_folder(tmp)
        _keep_mode(out, tmp)  # private from the start, not only once in place
        pub = Publication(out, command, tmp)
        try:
            write_marker(tmp, command, partial=True, target=out.name)
            yield pub
        finally:
            if not pub.committed:
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def claiming(
    out: PathLike,
    command: str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    fresh: bool = False,
    create: bool = True,
    inputs: Iterable[PathLike] = (),
    legacy: Iterable[str] = (),
    lock: bool = True,
    how: str = "pass --overwrite to replace it",
) -> Iterator[Path]:
    """Lock a folder written in place (a run, a sweep, the demo) and make sure it is this command's.

    An existing non-empty folder needs ``overwrite`` or ``resume`` and this command's marker (or,
    with ``resume`` only, every file named in ``legacy``: outputs of versions before markers).
    ``fresh`` (with ``overwrite``) removes the old folder first. With ``create`` the folder exists
    and carries the marker inside the block; without, the caller creates it (``write_marker``) when
    it first writes, so a run that fails early leaves nothing. ``lock=False`` (another process of
    the same run holds the lock) only checks.
    """
    out = Path(out).absolute()
    inputs = list(inputs)
    legacy = list(legacy)

    def check() -> None:
        is_legacy = (
            legacy
            and out.is_dir()
            and read_marker(out, command) is None
            and all((out / name).is_file() for name in legacy)
        )
        if resume and is_legacy and _protected(out, inputs) is None:
            return
        check_target(out, command, overwrite=overwrite or resume, inputs=inputs, how=how)

    check()
    if not lock:
        yield out
        return
    with OutputLock(out, command):
        check()
        _remove_leftovers(out, command)
        mode = None
        if fresh and overwrite and out.is_dir() and read_marker(out, command) is not None:
            mode = stat.S_IMODE(os.stat(out).st_mode)
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        if create:
            if not out.is_dir():
                _make_folder(out, mode)
            if read_marker(out, command) is None:
                write_marker(out, command)
        yield out
