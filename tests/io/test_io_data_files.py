"""MetaImage/NRRD headers that point their voxel data at other files (issue 15, finding 1).

A file outside the header's folder must never be read, whatever header syntax says so (every separator ITK
accepts, any case NRRD accepts, any header length, CR line ends); uploads (``untrusted=True``) are read only
when the voxels are inside the file. Each case writes a "secret" file outside the folder and checks it is
not what comes back.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import MedsegError, ScanReadError, UnsupportedFormatError
from medseg.io import read_mask, read_scan

SECRET = bytes(range(1, 17))  # a 4 x 4 uint8 image once read


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere" / "secret.bin"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def _mha(folder: Path, data_line: str, *, name: str = "scan.mha", padding: str = "", eol: str = "\n") -> Path:
    lines = ["ObjectType = Image", "NDims = 2", "DimSize = 4 4", "ElementType = MET_UCHAR"]
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes((eol.join(lines) + eol + padding + data_line + eol).encode("latin-1"))
    return path


def _nrrd(folder: Path, data_line: str, *, name: str = "scan.nrrd", padding: str = "", eol: str = "\n") -> Path:
    lines = ["NRRD0004", "type: uint8", "dimension: 2", "sizes: 4 4", "encoding: raw"]
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes((eol.join(lines) + eol + padding + data_line + eol + eol).encode("latin-1"))
    return path


def _secret_not_read(path: Path, **kwargs) -> MedsegError:
    """Reading ``path`` must fail with a medseg error; a scan holding the secret's bytes is the bug."""
    try:
        scan = read_scan(path, **kwargs)
    except MedsegError as e:
        return e
    assert scan.array.tobytes() != SECRET, f"{path.name}: the secret file outside the folder was read"
    raise AssertionError(f"{path.name}: read without an error ({scan.array.shape})")


LONG_PADDING = "".join(f"Comment = line {i}\n" for i in range(6000))  # ~100 KB of ordinary header lines

METAIMAGE_SYNTAXES = {
    "equals": "ElementDataFile = {}",
    "colon": "ElementDataFile: {}",
    "colon no space": "ElementDataFile:{}",
    "tabs": "ElementDataFile\t=\t{}",
    "leading spaces": "   ElementDataFile = {}",
    "colon equals": "ElementDataFile := {}",
    "double equals": "ElementDataFile == {}",
    "trailing blanks": "ElementDataFile \t= {}  \t",
}


@pytest.mark.parametrize("variant", ["long header", "CRLF", "mhd", "LIST", "pattern"])
def test_metaimage_reference_outside_the_folder_is_refused_in_any_header(variant: str, secret: Path,
                                                                        tmp_path: Path) -> None:
    folder = tmp_path / "scan"
    line = f"ElementDataFile = {secret}"
    if variant == "long header":
        path = _mha(folder, line, padding=LONG_PADDING)
    elif variant == "CRLF":
        path = _mha(folder, line, eol="\r\n")
    elif variant == "mhd":
        path = _mha(folder, line, name="scan.mhd")
    elif variant == "LIST":
        path = _mha(folder, f"ElementDataFile = LIST\n{secret}")
    else:
        path = _mha(folder, f"ElementDataFile = {secret.parent}/secret%d.bin 0 0 1")
    assert isinstance(_secret_not_read(path), UnsupportedFormatError)


NRRD_SYNTAXES = {
    "data file": "data file: {}",
    "datafile": "datafile: {}",
    "upper case": "DATA FILE: {}",
    "camel case": "DataFile: {}",
    "two spaces": "data file:  {}",
    "tab after space": "data file: \t{}",
}


@pytest.mark.parametrize(("writer", "line"), [(_mha, line) for line in METAIMAGE_SYNTAXES.values()]
                         + [(_nrrd, line) for line in NRRD_SYNTAXES.values()],
                         ids=[f"mha {k}" for k in METAIMAGE_SYNTAXES] + [f"nrrd {k}" for k in NRRD_SYNTAXES])
def test_reference_outside_the_folder_is_refused_in_every_syntax(writer, line: str, secret: Path,
                                                                 tmp_path: Path) -> None:
    path = writer(tmp_path / "scan", line.format(secret))
    error = _secret_not_read(path)
    assert isinstance(error, UnsupportedFormatError) and "elsewhere" in str(error)


@pytest.mark.parametrize("variant", ["long header", "CR", "CRLF", "nhdr", "LIST"])
def test_nrrd_reference_outside_the_folder_is_refused_in_any_header(variant: str, secret: Path,
                                                                   tmp_path: Path) -> None:
    folder = tmp_path / "scan"
    line = f"data file: {secret}"
    if variant == "long header":
        path = _nrrd(folder, line, padding="".join(f"# comment {i}\n" for i in range(8000)))
    elif variant in ("CR", "CRLF"):
        path = _nrrd(folder, line, eol="\r" if variant == "CR" else "\r\n")
    elif variant == "nhdr":
        path = _nrrd(folder, line, name="scan.nhdr")
    else:
        path = folder / "scan.nhdr"
        folder.mkdir()
        path.write_text(f"NRRD0004\ntype: uint8\ndimension: 2\nsizes: 4 4\nencoding: raw\ndata file: LIST\n{secret}\n")
    assert isinstance(_secret_not_read(path), UnsupportedFormatError)


def test_metaimage_header_that_itk_would_read_differently_is_refused(secret: Path, tmp_path: Path) -> None:
    # A name line without separator makes MetaIO take its value from the next line: the LOCAL line would be
    # swallowed and the reference after it used. A NUL byte ends a name for MetaIO's comparison.
    swallowed = _mha(tmp_path / "a", f"Junk\nElementDataFile = LOCAL\nElementDataFile = {secret}")
    nul = _mha(tmp_path / "b", f"ElementDataFile\x00x = {secret}")
    for path in (swallowed, nul):
        error = _secret_not_read(path)
        assert isinstance(error, ScanReadError) and error.args[0].startswith(path.name)


# ------------------------------------------------------------------------------------ uploads (untrusted)


def _pair(folder: Path, suffix: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"pair{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(24, dtype=np.int16).reshape(2, 3, 4)), str(path))
    return path


@pytest.mark.parametrize("suffix", [".mhd", ".nhdr"])
def test_uploads_refuse_detached_headers_with_a_one_line_reason(suffix: str, tmp_path: Path) -> None:
    header = _pair(tmp_path / "up", suffix)
    assert read_scan(header).array.sum() == sum(range(24))  # locally named, the pair is read
    with pytest.raises(UnsupportedFormatError, match=rf"^pair\{suffix}: a detached header .* not accepted for uploads"):
        read_scan(header, untrusted=True)
    with pytest.raises(UnsupportedFormatError, match=r"uploads must be|upload one self-contained file"):
        read_mask(header, untrusted=True)
    data_file = next(p for p in header.parent.iterdir() if p != header)
    with pytest.raises(UnsupportedFormatError, match=r"holds the voxels of a detached header; upload one"):
        read_scan(data_file, untrusted=True)


def test_uploads_refuse_a_reference_beside_the_header_and_never_probe_for_the_file(secret: Path,
                                                                                 tmp_path: Path) -> None:
    beside = _mha(tmp_path / "up", "ElementDataFile = secret.bin")
    (tmp_path / "up" / "secret.bin").write_bytes(SECRET)
    messages = set()
    for path in (beside, _mha(tmp_path / "a", f"ElementDataFile: {secret}"),
                 _mha(tmp_path / "b", "ElementDataFile: /no/such/file"), _nrrd(tmp_path / "c", f"data file: {secret}"),
                 _nrrd(tmp_path / "d", "data file: /no/such/file")):
        error = _secret_not_read(path, untrusted=True)
        assert isinstance(error, UnsupportedFormatError)
        assert "inside the file" in str(error) and str(secret.parent) not in str(error)
        messages.add(str(error).split(":", 1)[1].replace("ElementDataFile", "data file"))
    assert len(messages) == 1  # a file that exists and one that does not get the same answer


def test_uploads_with_voxels_inside_the_file_are_read(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    for suffix in (".mha", ".nrrd", ".nii.gz"):
        path = tmp_path / f"scan{suffix}"
        sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
        np.testing.assert_array_equal(read_scan(path, untrusted=True).array, array)
    lower_case_local = _mha(tmp_path / "lc", "ElementDataFile = local")
    lower_case_local.write_bytes(lower_case_local.read_bytes() + SECRET)
    assert read_scan(lower_case_local, untrusted=True).array.tobytes() == SECRET


def test_upload_zip_with_a_detached_pair_is_refused(tmp_path: Path) -> None:
    header = _pair(tmp_path / "pair", ".mhd")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in header.parent.iterdir():
            zf.write(f, f"study/{f.name}")
    assert read_scan(archive).array.sum() == sum(range(24))
    with pytest.raises(UnsupportedFormatError, match=r"^pair\.mhd: a detached header"):
        read_scan(archive, untrusted=True)


# ------------------------------------------------------------------------------ local files (trusted)


def test_local_list_and_pattern_references_beside_the_header_are_read(tmp_path: Path) -> None:
    for i in range(2):
        (tmp_path / f"sl{i}.raw").write_bytes(bytes([i + 1]) * 16)
    geometry = "NDims = 3\nDimSize = 4 4 2\nElementType = MET_UCHAR\n"
    cases = {
        "list.mhd": f"ObjectType = Image\n{geometry}ElementDataFile = LIST\nsl0.raw\nsl1.raw\n",
        "pattern.mhd": f"ObjectType = Image\n{geometry}ElementDataFile = sl%d.raw 0 1 1\n",
        "list.nhdr": "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 2\nencoding: raw\ndata file: LIST\nsl0.raw\nsl1.raw\n",
        "pattern.nhdr": "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 2\nencoding: raw\ndata file: sl%d.raw 0 1 1\n\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        assert read_scan(tmp_path / name).array[:, 0, 0].tolist() == [1, 2], name
