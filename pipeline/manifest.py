"""Checksum manifests: ``manifest.json`` with the sha256 of every file of a saved artifact.

The ETL writes one into ``workflow/`` and the train stage into the model directory, as the last step
before the output is renamed into place. Loading a workflow runs pickle, so the predictor verifies
both manifests before it loads anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.errors import ArtifactError

MANIFEST_NAME = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def write_manifest(directory: str | Path, **fields) -> Path:
    """Record the sha256 of every file under ``directory`` in ``directory/manifest.json``.

    Called by the ETL stage on its ``workflow/`` folder and by the train stage on the model folder,
    as the last step before the output is renamed into place. ``fields`` (JSON values, e.g. the
    stage that wrote it and the ETL run's identity) are recorded beside the checksums. Returns the
    manifest's path.
    """
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): _sha256(p) for p in _manifest_files(directory)}
    manifest = {**fields, "algorithm": "sha256", "files": files}
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return path


def read_manifest(directory: str | Path) -> dict | None:
    """``directory/manifest.json`` as a dict (not verified), or None when there is none or it is unreadable."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def content_id(directory: str | Path, patterns: tuple[str, ...]) -> str:
    """A sha256 over the contents of the files under ``directory`` that match ``patterns`` (glob, relative).

    Names and bytes only, no paths or times: two runs that wrote the same data get the same id.
    """
    directory = Path(directory)
    digest = hashlib.sha256()
    names = sorted({p for pattern in patterns for p in directory.glob(pattern) if p.is_file()})
    for p in names:
        digest.update(p.relative_to(directory).as_posix().encode() + b"\0" + _sha256(p).encode() + b"\n")
    return digest.hexdigest()


def verify_manifest(directory: str | Path, required: tuple[str, ...] = ()) -> dict[str, str]:
    """Check every file listed in ``directory/manifest.json`` against its recorded sha256.

    ``required`` names files (relative to ``directory``) that must be listed. Raises
    ``ArtifactError`` naming the first missing, unlisted or modified file; returns the manifest's
    ``{file: sha256}``.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{path} is missing: refusing to load unverified artifacts from {directory} (loading runs pickle). "
            "Re-run the stage that wrote it, or record checksums of files you trust with "
            f"`python -c \"from pipeline.manifest import write_manifest; write_manifest('{directory}')\"`"
        )
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{path} is not a valid manifest ({err})") from err
    for name in required:
        if name not in files:
            raise ArtifactError(f"{path} does not list {name}: refusing to load it unverified")
    for name, expected in files.items():
        file = directory / name
        if not file.is_file():
            raise ArtifactError(f"{file} is listed in {path} but missing")
        if _sha256(file) != expected:
            raise ArtifactError(f"{file} does not match its checksum in {path}: it changed after it was written")
    return files
