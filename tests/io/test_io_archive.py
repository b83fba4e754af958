"""Safe zip handling: every cap, path escapes, nested archives, and zips holding one image file."""

from __future__ import annotations

import stat
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import ScanReadError, UnsafeArchiveError
from medseg.io import ArchiveLimits, extract_zip_safely, extracted_zip, read_scan, safe_extract_zip


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_zip_slip_member_is_refused_and_nothing_escapes(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "evil.zip", {"ok.txt": b"fine", "../../escaped.txt": b"gotcha"})
    dest = tmp_path / "a" / "b"
    dest.mkdir(parents=True)
    with pytest.raises(
        UnsafeArchiveError, match=r"evil\.zip: member 'escaped\.txt' has a '\.\.' path .*zip slip"
    ):
        safe_extract_zip(archive, dest)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "a" / "escaped.txt").exists()
    assert list(dest.iterdir()) == []  # vetting happens before any write


@pytest.mark.parametrize("name", ["/etc/cron.d/x", "C:/Windows/x.dll", "..\\..\\x.dcm"])
def test_absolute_and_backslash_escapes_are_refused(name: str, tmp_path: Path) -> None:
    archive = _zip(tmp_path / "bad.zip", {name: b"x"})
    with pytest.raises(UnsafeArchiveError, match=r"bad\.zip: member"):
        read_scan(archive)


def test_symlink_member_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("scan.dcm")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match=r"link\.zip: member 'scan\.dcm' is a symlink"):
        read_scan(archive)


def test_too_many_members(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "many.zip", {f"f{i}.txt": b"x" for i in range(6)})
    with pytest.raises(UnsafeArchiveError, match=r"many\.zip: 6 members exceed the cap of 5 \(max_members\)"):
        read_scan(archive, archive_limits=ArchiveLimits(max_members=5))


def test_high_compression_ratio_is_a_zip_bomb(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "bomb.zip", {"zeros.nii": bytes(8 * 1024**2)})
    with pytest.raises(
        UnsafeArchiveError, match=r"bomb\.zip: member 'zeros\.nii' has compression ratio .*max_ratio"
    ):
        read_scan(archive)


def test_total_uncompressed_size_cap(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "big.zip", {"a.dcm": bytes(600), "b.dcm": bytes(600)}, zipfile.ZIP_STORED)
    with pytest.raises(
        UnsafeArchiveError, match=r"big\.zip: uncompressed size exceeds the cap of 1,000 bytes"
    ):
        read_scan(archive, archive_limits=ArchiveLimits(max_total_bytes=1000))


def test_nested_archive_is_not_followed(hippo_image: Path, tmp_path: Path) -> None:
    inner = _zip(tmp_path / "inner.zip", {"scan.nii.gz": hippo_image.read_bytes()})
    outer = _zip(tmp_path / "outer.zip", {"inner.zip": inner.read_bytes(), "__MACOSX/._inner.zip": b"junk"})
    with pytest.raises(
        ScanReadError,
        match=r"outer\.zip: no DICOM series .*nested archive\(s\) are not opened \(inner\.zip\)",
    ):
        read_scan(outer)


@pytest.mark.parametrize("fixture_name", ["hippo_image", "dsb_rgb"])
def test_zip_holding_one_image_reads_as_that_file(fixture_name: str, request, tmp_path: Path) -> None:
    source: Path = request.getfixturevalue(fixture_name)
    archive = _zip(
        tmp_path / "upload.zip", {f"case/{source.name}": source.read_bytes(), ".DS_Store": b"junk"}
    )
    direct, zipped = read_scan(source), read_scan(archive)
    np.testing.assert_array_equal(zipped.array, direct.array)
    assert zipped.geometry.same_grid(direct.geometry)
    assert zipped.source == "upload.zip" and zipped.meta["archive"] == "upload.zip"


def test_zip_with_several_images_asks_for_one(dsb_gray: Path, dsb_rgb: Path, tmp_path: Path) -> None:
    archive = _zip(tmp_path / "two.zip", {"a.png": dsb_gray.read_bytes(), "b.png": dsb_rgb.read_bytes()})
    with pytest.raises(ScanReadError, match=r"two\.zip: 2 image files and no DICOM series"):
        read_scan(archive)


def test_not_a_zip_and_empty_zip(tmp_path: Path) -> None:
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"PK but not really")
    with pytest.raises(ScanReadError, match=r"fake\.zip: not a valid zip archive"):
        read_scan(fake)
    empty = _zip(tmp_path / "empty.zip", {})
    with pytest.raises(ScanReadError, match=r"empty\.zip: archive is empty"):
        read_scan(empty)


def test_corrupt_member_data(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "crc.zip", {"scan.dcm": b"A" * 5000}, zipfile.ZIP_STORED)
    data = bytearray(archive.read_bytes())
    data[100] ^= 0xFF  # flip a byte inside the stored member: its CRC no longer matches
    archive.write_bytes(bytes(data))
    with pytest.raises(ScanReadError, match=r"crc\.zip: .*corrupt member"):
        read_scan(archive)


def test_extracted_zip_removes_its_folder_even_on_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    archive = _zip(tmp_path / "ok.zip", {"dir/x.txt": b"hello"})
    with extracted_zip(archive) as extracted:
        assert extracted.files == [extracted.root / "dir" / "x.txt"]
        assert extracted.files[0].read_bytes() == b"hello"
        assert extracted.member_name(extracted.files[0]) == Path("dir/x.txt")
    assert list((tmp_path / "tmp").iterdir()) == []
    with pytest.raises(RuntimeError), extracted_zip(archive):
        raise RuntimeError("caller failed")
    assert list((tmp_path / "tmp").iterdir()) == []

    folder = extract_zip_safely(archive, tmp_path / "kept")
    assert (folder / "dir" / "x.txt").read_bytes() == b"hello"


def _dest_bytes(dest: Path) -> int:
    return sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())


def test_many_small_members_are_a_zip_bomb_together(tmp_path: Path) -> None:
    """Issue 15: members under 1 MiB skipped the ratio check; a 340 KB zip wrote 306 MB before being refused."""
    archive = _zip(tmp_path / "small_bombs.zip", {f"m{i:03d}.dcm": bytes(900 * 1024) for i in range(60)})
    assert archive.stat().st_size < 200 * 1024
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match=r"small_bombs\.zip: members unpack at a compression ratio of "
                                                 r"[\d,]+:1 together, above the cap of 200:1"):
        safe_extract_zip(archive, dest)
    assert _dest_bytes(dest) == 0  # refused from the declared sizes, before writing
