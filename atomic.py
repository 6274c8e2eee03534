"""Writing a file so that a kill, a full disk or a read-only folder leaves the old file or the new one,
never half of one: the one writer every script's outputs go through (standard library only, so the data
tools that import no torch use it too).

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))   # any writer of a file name
    atomic_write_text(path, text)

The content goes to `<name>.tmp` beside the target, is flushed to disk (fsync), then renamed over the target.
A failed write removes the temporary file and raises OSError naming the target; an exception from the
writer itself removes it too and propagates.
"""

import os
from pathlib import Path


def atomic_write(path, write, concurrent=False):
    """write(tmp_path) to a temporary name beside `path`, then rename it to `path`. concurrent: other
    processes may write the same file at the same moment (a shared build cache), so each writes a
    temporary file of its own (`<name>.<pid>.tmp`) and the last rename wins with a whole file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp" if concurrent else path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:  # the bytes reach the disk before the rename makes them the file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:  # the writer refused (a ValueError), or an interrupt: no partial file is left
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
