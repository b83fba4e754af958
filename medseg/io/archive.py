"""Safe extraction of user-supplied zip archives into a temporary folder.

Every member is vetted before anything is written: member count, declared total size, compression ratio (per
member of 1 MiB or more, and of all members together: many small members of zeros are a bomb too), path
escapes (absolute paths, ``..``, drive letters) and symlinks. While extracting, the bytes actually written are
counted again against the total cap and against the zip file's own size times the ratio cap (no header can
make the archive hold more compressed bytes than the file has), so headers that lie get no further.
Nested archives are not opened (that is how zip bombs multiply); they are listed in
``ExtractedArchive.skipped_archives`` so the caller can say why nothing was found.

Caps are the module constants below; pass an ``ArchiveLimits`` to change them for one call.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import ScanReadError, UnsafeArchiveError
from medseg.io.formats import is_archive_member_to_skip

MAX_MEMBERS = 10_000
MAX_TOTAL_BYTES = 2 * 1024**3  # 2 GiB uncompressed
MAX_COMPRESSION_RATIO = 200.0  # uncompressed / compressed, per member and for the whole archive
# Ratios of tiny members are meaningless (1 KiB of zeros compresses 60:1) and harmless; the total cap
# bounds them all together.
RATIO_CHECK_MIN_BYTES = 1024**2

# OS clutter that zip tools add; skipped, never counted as content.
JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
JUNK_FOLDERS = frozenset({"__MACOSX"})

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    """Safety caps for one extraction (defaults: the module constants)."""

    max_members: int = MAX_MEMBERS
    max_total_bytes: int = MAX_TOTAL_BYTES
    max_ratio: float = MAX_COMPRESSION_RATIO
    ratio_check_min_bytes: int = RATIO_CHECK_MIN_BYTES


@dataclass
class ExtractedArchive:
    """Result of ``safe_extract_zip``: the folder, the files written, and nested archives left out."""

    root: Path
    files: list[Path] = field(default_factory=list)
    skipped_archives: list[str] = field(default_factory=list)  # member base names

    def member_name(self, path: Path) -> Path:
        """A file's path inside the archive (what to show or store once the folder is gone)."""
        return Path(path).relative_to(self.root)


def shown_name(name: str) -> str:
    """A member's base name fit for a one-line message: control characters (newlines...) escaped."""
    base = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", base)


def _member_parts(name: str, zip_name: str) -> list[str]:
    """Path components of a member name, or ``UnsafeArchiveError`` when it would land outside the folder."""
    normalised = name.replace("\\", "/")  # zips made on Windows may use backslashes
    shown = shown_name(normalised)
    if normalised.startswith("/") or re.match(r"^[A-Za-z]:", normalised):
        raise UnsafeArchiveError(f"{zip_name}: member {shown!r} has an absolute path; refusing to extract")
    parts = [p for p in normalised.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(
            f"{zip_name}: member {shown!r} has a '..' path that escapes the archive (zip slip); refusing to extract"
        )
    return parts


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16  # Unix mode bits, as written by Unix zip tools
    return stat.S_ISLNK(mode)


def _vet_members(
    zf: zipfile.ZipFile, zip_name: str, limits: ArchiveLimits
) -> list[tuple[zipfile.ZipInfo, list[str]]]:
    """Check every member against the caps; return the regular-file members with their path parts."""
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise UnsafeArchiveError(
            f"{zip_name}: {len(infos):,} members exceed the cap of {limits.max_members:,} (max_members)"
        )
    vetted = []
    declared_total = declared_compressed = 0
    for info in infos:
        parts = _member_parts(info.filename, zip_name)
        if _is_symlink(info):
            raise UnsafeArchiveError(
                f"{zip_name}: member {shown_name(info.filename)!r} is a symlink; refusing to extract"
            )
        if info.is_dir() or not parts:
            continue
        if info.flag_bits & 0x1:
            raise ScanReadError(f"{zip_name}: encrypted members are not supported")
        declared_total += info.file_size
        declared_compressed += info.compress_size
        if declared_total > limits.max_total_bytes:
            raise UnsafeArchiveError(
                f"{zip_name}: uncompressed size exceeds the cap of {limits.max_total_bytes:,} bytes (max_total_bytes)"
            )
        if info.file_size >= limits.ratio_check_min_bytes:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_ratio:
                raise UnsafeArchiveError(
                    f"{zip_name}: member {shown_name(info.filename)!r} has compression ratio {ratio:,.0f}:1, above the cap of "
                    f"{limits.max_ratio:,.0f}:1 (max_ratio; a zip bomb?)"
                )
        vetted.append((info, parts))
    _check_total_ratio(zip_name, declared_total, declared_compressed, limits)
    return vetted


def _check_total_ratio(zip_name: str, uncompressed: int, compressed: int, limits: ArchiveLimits) -> None:
    """All members together: a thousand 900 KB members of zeros are each below the per-member threshold."""
    if uncompressed < limits.ratio_check_min_bytes:
        return
    ratio = uncompressed / max(compressed, 1)
    if ratio > limits.max_ratio:
        raise UnsafeArchiveError(
            f"{zip_name}: members unpack at a compression ratio of {ratio:,.0f}:1 together, above the cap of "
            f"{limits.max_ratio:,.0f}:1 (max_ratio; a zip bomb?)"
        )


def safe_extract_zip(
    zip_path: str | Path, dest: str | Path, limits: ArchiveLimits | None = None
) -> ExtractedArchive:
    """Extract ``zip_path`` into the existing folder ``dest`` after vetting every member.

    Raises ``UnsafeArchiveError`` (names the zip and the cap broken) or ``ScanReadError`` (not a zip,
    corrupt member, encrypted). Junk (``__MACOSX/``, ``.DS_Store``) and nested archives are not extracted.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    limits = limits or ArchiveLimits()
    name = zip_path.name
    result = ExtractedArchive(root=dest)
    try:
        archive_bytes = zip_path.stat().st_size  # the compressed bytes there can be, whatever headers say
        with zipfile.ZipFile(zip_path) as zf:
            written = 0
            for info, parts in _vet_members(zf, name, limits):
                if parts[-1] in JUNK_NAMES or parts[0] in JUNK_FOLDERS or parts[-1].startswith("._"):
                    continue
                if is_archive_member_to_skip(parts[-1]):
                    result.skipped_archives.append(shown_name(parts[-1]))
                    continue
                target = dest.joinpath(*parts)
                # Belt and braces: the checks above already exclude every way out of dest.
                if os.path.commonpath([dest.resolve(), target.resolve()]) != str(dest.resolve()):
                    raise UnsafeArchiveError(
                        f"{name}: member {shown_name(parts[-1])!r} escapes the archive; refusing to extract"
                    )
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    out = open(target, "xb")  # closed by the with below; "x": a duplicate must not overwrite
                except FileExistsError as e:
                    if target.exists() and not target.is_dir():
                        raise UnsafeArchiveError(
                            f"{name}: duplicate member {shown_name(parts[-1])!r}; refusing to extract"
                        ) from None
                    raise ScanReadError(  # a file where a folder must go, or the reverse
                        f"{name}: cannot extract member {shown_name(parts[-1])!r} ({e.strerror})"
                    ) from None
                except OSError as e:  # a name the file system refuses: too long, too deep
                    raise ScanReadError(
                        f"{name}: cannot extract member {shown_name(parts[-1])!r} ({e.strerror or type(e).__name__})"
                    ) from None
                with out, zf.open(info) as src:
                    while chunk := src.read(_CHUNK):
                        written += len(chunk)
                        if written > limits.max_total_bytes:
                            raise UnsafeArchiveError(
                                f"{name}: uncompressed size exceeds the cap of {limits.max_total_bytes:,} bytes "
                                "(max_total_bytes)"
                            )
                        _check_total_ratio(name, written, archive_bytes, limits)
                        out.write(chunk)
                result.files.append(target)
    except zipfile.BadZipFile as e:
        raise ScanReadError(f"{name}: not a valid zip archive or a corrupt member ({_one_line(e)})") from None
    except (zlib.error, EOFError, NotImplementedError, ValueError, OverflowError) as e:
        raise ScanReadError(f"{name}: cannot extract ({type(e).__name__}: {_one_line(e)})") from None
    except OSError as e:  # corrupt offsets make zipfile seek before the start; a full disk; unreadable file
        raise ScanReadError(f"{name}: cannot extract ({e.strerror or type(e).__name__})") from None
    return result


def _one_line(err: BaseException) -> str:
    """A zipfile message fit for users: it quotes member paths verbatim, and folder names inside an archive
    may name patients, so quoted paths keep their base name; control characters become ``?``."""
    text = re.sub(r"'(?:[^']*/)?([^'/]*)'", r"'\1'", str(err))
    return re.sub(r"[\x00-\x1f\x7f]", "?", text)


@contextmanager
def extracted_zip(zip_path: str | Path, limits: ArchiveLimits | None = None) -> Iterator[ExtractedArchive]:
    """Extract safely into a fresh temporary folder, removed when the block ends (also on errors).

    Use this when you need the extracted files on disk, e.g.::

        with extracted_zip("series.zip") as archive:
            scan = read_scan(archive.root)   # meta["dicom_files"] are valid inside the block
    """
    tmp = Path(tempfile.mkdtemp(prefix="medseg-zip-"))
    try:
        yield safe_extract_zip(zip_path, tmp, limits)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract_zip_safely(
    zip_path: str | Path, dest: str | Path | None = None, limits: ArchiveLimits | None = None
) -> Path:
    """Extract with the same checks into ``dest`` (created if needed) or, when None, a new temporary folder
    that the caller owns and must delete. Returns the folder. Prefer ``extracted_zip`` when a ``with`` block fits.
    """
    if dest is None:
        folder = Path(tempfile.mkdtemp(prefix="medseg-zip-"))
    else:
        folder = Path(dest)
        folder.mkdir(parents=True, exist_ok=True)
    try:
        safe_extract_zip(zip_path, folder, limits)
    except BaseException:
        if dest is None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder
