"""Files every stage writes or reads: atomic output, figures, checkpoints.

Output goes to a temporary file in the same folder, then is renamed: a run killed mid-write
leaves either the old file or the new one, never half of one. Checkpoints say what they are
(``kind``: classifier or detector) and load with ``weights_only=True``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` sets it, and
    the picture-writing thread could create a file in between)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write through a temporary file + rename, with the mode a plain ``open`` would give
    (0644 under the usual umask; ``mkstemp`` alone makes it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(*folders: str | Path) -> int:
    """Delete the temporary files (``.<name>.<random>.tmp``) that writes cut short by a kill left
    in ``folders``, with one warning; returns how many. Call it before resuming work there, never
    while another process writes to the same folder."""
    import warnings

    stale = [p for folder in folders for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    if stale:
        warnings.warn(f"{Path(folders[0])}: removed {len(stale)} partly written file(s) an interrupted run left",
                      stacklevel=2)
    return len(stale)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_csv(path: str | Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def save_checkpoint(path: str | Path, obj: dict[str, Any]) -> None:
    """``torch.save`` through an atomic write: a kill never leaves half a checkpoint."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def figure_png(fig: Any, dpi: int = 100, **savefig_kwargs: Any) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, **savefig_kwargs)
    plt.close(fig)
    return buffer.getvalue()


def save_figure(fig: Any, path: str | Path, **savefig_kwargs: Any) -> None:
    """A matplotlib figure as PNG (written atomically), then closed."""
    atomic_write_bytes(path, figure_png(fig, **savefig_kwargs))


def checkpoint_kind(ckpt: dict[str, Any]) -> str | None:
    """``kind`` of a checkpoint; classifiers written before it existed are known by ``model_name``."""
    return ckpt.get("kind") or ("classifier" if "model_name" in ckpt else None)


def _load_error(exc: Exception) -> str:
    """torch's reason for refusing a file, without its advice to retry with ``weights_only=False``
    (which would run the code a refused pickle carries)."""
    text = str(exc)
    if "weights_only" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        return f"it calls {found.group(1) if found else 'code'} when loaded; refused"
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def checkpoint_contents(path: str | Path) -> Iterator[None]:
    """Around rebuilding a model from a loaded checkpoint: a missing entry, or weights that do not
    fit the model it describes (a hand-made or foreign file), is one line naming the file."""
    from cxrcam.errors import CxrcamError

    try:
        yield
    except CxrcamError:
        raise
    except KeyError as exc:
        raise CxrcamError(f"{path}: the checkpoint has no {exc.args[0]!r} entry; was it written by cxrcam?") from None
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CxrcamError(f"{path}: its weights do not fit the model it describes "
                          f"({str(exc).strip().splitlines()[0][:300]})") from None


def _check_checkpoint_file(path: Path) -> None:
    """A file torch.save never writes (a CSV, a config, an image) is named as what it looks like, not
    as a refused pickle: torch.save writes a zip archive (a bare pickle in torch before 1.6)."""
    import zipfile

    from cxrcam.errors import CxrcamError

    if zipfile.is_zipfile(path):
        return
    head = path.open("rb").read(64)
    if head[:1] == b"\x80":  # a pickle protocol marker: an old-format checkpoint
        return
    looks = "text (a CSV, YAML or JSON file?)" if head and all(32 <= b < 127 or b in b"\r\n\t" for b in head) \
        else "an image" if head.startswith((b"\x89PNG", b"\xff\xd8")) else "another kind of file"
    raise CxrcamError(f"{path}: not a checkpoint (torch.save's zip archive); it reads as {looks}")


def load_checkpoint(path: str | Path, device: Any = "cpu", kind: str | None = None) -> dict[str, Any]:
    """A cxrcam checkpoint as a dict, loaded with ``weights_only=True`` (no code runs).

    ``kind`` (classifier, detector): anything else is refused with a line naming the file.
    A run folder stands for its ``best.pt``."""
    import torch

    from cxrcam.errors import CxrcamError

    path = Path(path)
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise CxrcamError(f"{path} is a folder without best.pt: name the checkpoint file (e.g. {path}/last.pt)")
        path = path / "best.pt"
    if not path.is_file():
        raise CxrcamError(f"checkpoint not found: {path}")
    _check_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise CxrcamError(f"{path}: not a readable cxrcam checkpoint ({_load_error(exc)})") from None
    if not isinstance(ckpt, dict):
        raise CxrcamError(f"{path}: not a cxrcam checkpoint")
    found = checkpoint_kind(ckpt)
    if kind is not None and found != kind:
        raise CxrcamError(f"{path}: not a cxrcam {kind} checkpoint" + (f" (it is a {found})" if found else ""))
    return {**ckpt, "kind": found}
