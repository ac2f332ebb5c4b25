"""Checksums of every checkpoint file, written inside the checkpoint and checked before restoring.

Orbax makes a save atomic (a temporary directory renamed when complete; on gs:// a
`commit_success.txt` written last), so a killed save is never mistaken for a checkpoint. It does
not notice a checkpoint that was complete and was damaged later: a garbled or truncated array
file restores silently as wrong numbers (Adam moments of 1e38), and a missing `_METADATA` reads as
a checkpoint of another model. So every save also writes `checksums.json` into the step directory:
the size and SHA-256 of every file the save wrote. It is written by Orbax's post-finalisation
callback, which runs on the primary process after every process has finished writing and *before*
the commit (rename / commit_success.txt): a checkpoint that counts as complete always has its
checksums, and they describe exactly the files that were committed.

Cost: one read of the checkpoint's files by the primary process per save (in Orbax's background
thread, so training goes on) and one read before a restore. `bench/checkpoint_checksums.py`
measures both for a preset.

Not covered by the checksums: the two files Orbax rewrites while committing (`_CHECKPOINT_METADATA`
and the top-level `commit_success.txt`); the first is checked to be valid JSON instead, the second
only marks the commit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

from etils import epath

from core.errors import DamagedCheckpointError

CHECKSUMS_FILE = "checksums.json"
# Top-level files Orbax writes (again) after the post-finalisation callback: not checksummed.
_COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")
_FORMAT = 1
_CHUNK = 1 << 22  # 4 MiB reads: whole arrays are never held in memory twice


def _files(root: epath.Path, prefix: str = "") -> Iterator[tuple[str, epath.Path]]:
    """('relative/posix/path', path) of every file under `root`, sorted (no recursive glob: gs://
    epath refuses '**')."""
    for child in sorted(root.iterdir(), key=lambda p: p.name):
        if child.is_dir():
            yield from _files(child, f"{prefix}{child.name}/")
        else:
            yield f"{prefix}{child.name}", child


def file_digest(path: epath.Path) -> dict[str, Any]:
    """{'bytes': size, 'sha256': hex digest} of one file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def write_checksums(step_dir: epath.Path) -> dict[str, Any]:
    """Writes `<step_dir>/checksums.json` for every file below it (except Orbax's commit files)."""
    files = {
        rel: file_digest(path)
        for rel, path in _files(step_dir)
        if rel not in _COMMIT_FILES and rel != CHECKSUMS_FILE
    }
    record = {"format": _FORMAT, "algorithm": "sha256", "files": files}
    (step_dir / CHECKSUMS_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def has_checksums(step_dir: epath.Path) -> bool:
    return (step_dir / CHECKSUMS_FILE).exists()


def verify(step_dir: epath.Path, step: int) -> bool:
    """Raises DamagedCheckpointError (naming the step and the first bad file) unless every file
    recorded in `checksums.json` is present with its recorded size and SHA-256 and Orbax's step
    metadata is valid JSON. Returns False, without checking sizes and digests, for a checkpoint
    written before checksums existed (no checksums.json); True when it was verified."""

    def damaged(file: str, why: str) -> DamagedCheckpointError:
        return DamagedCheckpointError(
            f"checkpoint step {step} is damaged: {step_dir / file}: {why}", step=step, file=file
        )

    if not step_dir.is_dir():
        raise damaged("", "the step directory is missing")
    metadata = step_dir / _COMMIT_FILES[0]
    if metadata.exists():
        try:
            json.loads(metadata.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise damaged(_COMMIT_FILES[0], f"not valid JSON ({e})") from None
    record_path = step_dir / CHECKSUMS_FILE
    if not record_path.exists():
        return False
    try:
        record = json.loads(record_path.read_text())
        files = record["files"]
        assert record["format"] == _FORMAT and isinstance(files, dict)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
        raise damaged(CHECKSUMS_FILE, f"not a checksum record of this library ({e!r})") from None
    for rel, want in sorted(files.items()):
        path = step_dir / rel
        if not path.exists():
            raise damaged(rel, "missing (it was written by the save)")
        got = file_digest(path)
        if got["bytes"] != want["bytes"]:
            raise damaged(rel, f"{got['bytes']} bytes, {want['bytes']} when saved (truncated?)")
        if got["sha256"] != want["sha256"]:
            raise damaged(rel, "contents differ from the SHA-256 recorded at save time")
    return True
