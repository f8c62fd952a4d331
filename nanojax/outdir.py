"""Output directories that are never overwritten by accident, and replaced whole when asked.

Exports and conversions (save_hf, hf_to_workdir, data.prepare) write a directory of files. A
target that already holds something is refused unless `overwrite=True`; with it, the new files
are written into a temporary directory beside the target, and only when they are complete is the
old directory moved aside, the new one renamed into place, and the old one removed. So a failed
write changes nothing, and no file of the old contents (a stale generation_config.json next to a
new model) survives the replacement.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path


class OutputExistsError(FileExistsError):
    """The output directory already holds files and overwrite was not asked for."""


def _contents(target: Path, keep: Sequence[str]) -> list[str]:
    return sorted(p.name for p in target.iterdir() if p.name not in keep)


def check_target(target: str | Path, *, overwrite: bool = False, keep: Sequence[str] = (),
                 inputs: Sequence[str | Path] = ()) -> Path:
    """Raises unless `target` may be written: absent or empty (ignoring the names in `keep`), or
    `overwrite`. An input inside the target (other than a kept file) is refused even with
    `overwrite`, since replacing the target would delete it. Returns the target path."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target} exists and is not a directory; choose a directory path.")
    real = target.resolve()
    for src in inputs:
        src_real = Path(src).resolve()
        if src_real == real or real in src_real.parents:
            if src_real.parent == real and src_real.name in keep:
                continue
            raise ValueError(
                f"{target} would replace its own input {src}; write to another directory.")
    if target.is_dir():
        held = _contents(target, keep)
        if held and not overwrite:
            shown = ", ".join(held[:5]) + (f", ... ({len(held) - 5} more)" if len(held) > 5 else "")
            raise OutputExistsError(
                f"{target} is not empty (it holds {shown}); nothing was changed. Choose a new or "
                "empty directory, or pass --overwrite (overwrite=True) to replace it.")
    return target


@contextlib.contextmanager
def replace_dir(target: str | Path, *, overwrite: bool = False, keep: Sequence[str] = (),
                inputs: Sequence[str | Path] = ()) -> Iterator[Path]:
    """Yields a fresh directory to write the outputs into; on success it becomes `target`.

    keep: names of files in `target` that are inputs, not outputs (prepare_data's downloaded
    input.txt): they do not make it non-empty and are carried into the new directory.
    inputs: paths read while writing; the target may not contain them (see check_target).
    On an exception the fresh directory is removed and `target` is left as it was.
    """
    target = check_target(target, overwrite=overwrite, keep=keep, inputs=inputs)
    if target.is_symlink():
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    fresh = target.parent / f".{target.name}.new-{tag}"
    fresh.mkdir()  # mode 0o777 & ~umask, like any directory the user creates
    try:
        yield fresh
        if target.is_dir():
            for name in keep:
                src = target / name
                if src.is_file() and not (fresh / name).exists():
                    shutil.copy2(src, fresh / name)
            shutil.copymode(target, fresh)  # the replacement keeps the directory's permissions
            old = target.parent / f".{target.name}.old-{tag}"
            os.rename(target, old)
            try:
                os.rename(fresh, target)
            except BaseException:
                os.rename(old, target)  # put the old contents back
                raise
            shutil.rmtree(old)
        else:
            os.rename(fresh, target)
    finally:
        if fresh.exists():
            shutil.rmtree(fresh)


def write_atomic(path: str | Path, text: str) -> None:
    """Replaces the file at `path` with `text` all at once, so that a kill or a crash at any
    moment leaves either the old file or the new one, never a truncated mix: the text goes to a
    temporary file beside it, is flushed to disk, and is renamed over it (os.replace is atomic
    on POSIX filesystems); then the directory is synced so that the rename itself survives a
    power cut. A writer killed mid-write leaves a hidden `.NAME.PID.tmp` beside it, never read."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # open(): the usual umask'd mode
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: persist the directory entry too
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
