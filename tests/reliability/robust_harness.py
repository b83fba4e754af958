"""Robustness harness shared by tests/reliability and benchmarks/robustness.py.

* ``ReaderWorker``: runs medseg readers on untrusted files in a separate, memory-capped process
  (``RLIMIT_AS``), one case at a time, with a hang bound. A segfault, an abort, an out-of-memory or a
  hang ends only that case (the worker is restarted) and is reported as such; nothing can take the
  test process down.
* ``Outcome.verdict``: ``ok`` (a valid result), ``error`` (a ``MedsegError`` whose one-line message names
  the file and leaks no directory), or a failure: ``bad_error`` (MedsegError without those properties),
  ``crash`` (any other exception, or the process died), ``oom`` (MemoryError under the cap), ``hang``,
  ``leak`` (the scan returned holds the bytes of a file outside the input: see ``hostile_header_cases``).
* Seed files derived from the real datasets, mutators (truncate, bit flips, chunk-aware PNG edits with
  fixed CRCs, NIfTI header fields), and catalogues of crafted inputs (absurd headers, zip bombs, zip slip,
  thousands of members, nested zips) that tests and the benchmark both run.

Run as ``python robust_harness.py --worker`` it is the worker itself.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# Hang bound per case. Generous on purpose: the CI machine has 2 shared cores; real cases take < 2 s.
CASE_TIMEOUT_S = float(os.environ.get("MEDSEG_FUZZ_CASE_TIMEOUT", 60))
# Address space (RLIMIT_AS) a worker may grow by beyond what its imports take: a hard stop. It is set above
# MEMORY_FLAG_MB so that a reader which really uses too much memory shows up in the peak-RSS check below.
MEMORY_BUDGET_MB = int(os.environ.get("MEDSEG_FUZZ_MEMORY_MB", 4096))

# Examples per hypothesis test. CI keeps it small and derandomized (the same inputs every run, so a failure
# reproduces); a fuzzing session raises it: MEDSEG_FUZZ_EXAMPLES=2000 MEDSEG_FUZZ_RANDOM=1 pytest tests/reliability
FUZZ_EXAMPLES = int(os.environ.get("MEDSEG_FUZZ_EXAMPLES", 25))
FUZZ_RANDOM = bool(os.environ.get("MEDSEG_FUZZ_RANDOM"))

FAILURES = ("bad_error", "crash", "oom", "hang", "leak")
# Resident memory one case may add (peak, measured per case) before it counts as out of memory: RLIMIT_AS makes
# Python raise MemoryError, but C++ readers catch std::bad_alloc and report a plain error, so the peak is
# watched too. The largest legitimate seed case (an 81-Mpx PNG) peaks near 300 MB.
MEMORY_FLAG_MB = int(os.environ.get("MEDSEG_FUZZ_MEMORY_FLAG_MB", 1024))


@dataclass
class Outcome:
    verdict: str  # ok | error | bad_error | crash | oom | hang | leak
    message: str = ""  # the error message (error/bad_error), exception/signal (crash), result summary (ok)
    seconds: float = 0.0
    case: str = ""
    warnings: list[str] = field(default_factory=list)  # ScanReadWarning messages (first few)
    peak_mb: float = 0.0  # resident memory the case added at its peak

    @property
    def failed(self) -> bool:
        return self.verdict in FAILURES

    def __str__(self) -> str:
        return f"{self.case}: {self.verdict} after {self.seconds:.2f}s: {self.message}"


# ============================================================================================ worker side


def _worker_limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    budget = int(os.environ.get("MEDSEG_FUZZ_MEMORY_MB", MEMORY_BUDGET_MB)) * 1024**2
    resource.setrlimit(resource.RLIMIT_AS, (vm + budget, vm + budget))


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _reset_peak_rss() -> float:
    """Reset the peak-RSS mark (Linux clear_refs) and return the current RSS in MB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _check_scan(scan: Any) -> str:
    """Raise AssertionError unless ``scan`` is a valid Scan; return a one-line summary."""
    import numpy as np

    arr, g = scan.array, scan.geometry
    assert isinstance(arr, np.ndarray), type(arr)
    assert arr.ndim in (2, 3, 4), f"array ndim {arr.ndim}"
    assert g.ndim in (2, 3) and tuple(arr.shape[: g.ndim]) == tuple(g.size), (arr.shape, g.size)
    assert arr.ndim - g.ndim in (0, 1), f"array {arr.shape} for a {g.ndim}D geometry"
    assert all(s > 0 and np.isfinite(s) for s in g.spacing), f"spacing {g.spacing}"
    assert np.all(np.isfinite(g.origin)) and np.all(np.isfinite(g.direction)), "non-finite origin/direction"
    if np.issubdtype(arr.dtype, np.floating):
        assert np.isfinite(arr).all(), "non-finite voxels in a returned scan"
    assert "/" not in scan.source, f"scan.source holds a path: {scan.source!r}"
    return f"{arr.shape} {arr.dtype} spacing={tuple(round(s, 4) for s in g.spacing)}"


class LeakError(Exception):
    """A reader returned the bytes of a file outside its input."""


def _run_reader(reader: str, path: str, kwargs: dict[str, Any]) -> str:
    """Run one reader; return a summary of a valid result (raises on errors)."""
    if reader in ("read_scan", "read_mask"):
        import medseg.io as mio

        secret = kwargs.pop("secret", None)  # a file outside the input the reader must never return
        scan = getattr(mio, reader)(path, **kwargs)
        if secret is not None:
            data = scan.array.tobytes()
            if data and data in Path(secret).read_bytes():
                raise LeakError(f"{len(data)} bytes of {Path(secret).name}, outside the input, came back as voxels")
        return _check_scan(scan)
    if reader == "list_dicom_series":
        from medseg.io import list_dicom_series

        return f"{len(list_dicom_series(path, **kwargs))} series"
    if reader == "read_probabilities":
        from medseg.io import read_probabilities

        probs, geometry = read_probabilities(path)
        return f"{probs.shape} {probs.dtype}"
    if reader == "extract_zip":
        from medseg.io import ArchiveLimits, safe_extract_zip

        limits = ArchiveLimits(**kwargs) if kwargs else None
        dest = Path(tempfile.mkdtemp(prefix="medseg-fuzz-x-"))
        try:
            result = safe_extract_zip(path, dest, limits)
            for f in result.files:
                assert dest.resolve() in f.resolve().parents, f"{f} outside {dest}"
            return f"{len(result.files)} files, {len(result.skipped_archives)} nested archives skipped"
        finally:
            shutil.rmtree(dest, ignore_errors=True)
    if reader == "load_bundle":
        from medseg.bundle import load_bundle

        bundle = load_bundle(path)
        members = bundle.load_members()
        return f"bundle {bundle.name!r} with {len(members)} member(s)"
    if reader == "_selftest_segfault":  # proves the harness reports a dying process (tests only)
        import ctypes

        ctypes.string_at(0)
    if reader == "_selftest_sleep":
        time.sleep(float(kwargs.get("seconds", 3600)))
        return "slept"
    if reader == "_selftest_allocate":
        import numpy as np

        return str(np.ones(int(kwargs["mb"]) * 1024**2, np.uint8).sum())
    if reader == "read_weights":
        from medseg.models.pretrained import read_state_file

        return f"{len(read_state_file(Path(path)))} tensors"
    raise ValueError(f"unknown reader {reader!r}")


def worker_main() -> None:
    """Read JSON requests from stdin, answer JSON lines on the original stdout (fd 1 is re-pointed to stderr
    so library chatter cannot corrupt the protocol)."""
    import faulthandler

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    faulthandler.enable()
    sys.path.insert(0, str(REPO))
    import SimpleITK as sitk

    import medseg.io  # noqa: F401 - imports before the memory cap, so the cap bounds the work per case

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    from medseg.errors import MedsegError

    if os.environ.get("MEDSEG_FUZZ_PRELOAD_TORCH"):
        import medseg.bundle  # noqa: F401
        import medseg.models.pretrained  # noqa: F401
    from medseg.io import ScanReadWarning

    _worker_limit_memory()
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        base_mb = _reset_peak_rss()
        start = time.perf_counter()
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                summary = _run_reader(req["reader"], req["path"], req.get("kwargs") or {})
            res = {"verdict": "ok", "message": summary}
        except MedsegError as e:
            res = {"verdict": "error", "message": str(e)}
        except MemoryError as e:
            res = {"verdict": "oom", "message": f"MemoryError: {e}"}
        except LeakError as e:
            res = {"verdict": "leak", "message": str(e)}
        except AssertionError as e:
            res = {"verdict": "crash", "message": f"invalid result: {e}"}
        except Exception as e:  # noqa: BLE001 - anything else escaping a reader is a bug in medseg
            res = {"verdict": "crash", "message": f"{type(e).__name__}: {e}"[:500]}
        res["seconds"] = time.perf_counter() - start
        res["warnings"] = [str(w.message)[:300] for w in caught if issubclass(w.category, ScanReadWarning)][:5]
        res["peak_mb"] = max(0.0, _peak_rss_mb() - base_mb)
        out.write(json.dumps(res) + "\n")


# ============================================================================================ parent side


class ReaderWorker:
    """A memory-capped reader process; ``run`` never raises for anything the reader does."""

    def __init__(self, timeout_s: float = CASE_TIMEOUT_S, memory_mb: int = MEMORY_BUDGET_MB,
                 preload_torch: bool = False):
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.preload_torch = preload_torch
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stderr = tempfile.TemporaryFile()

    def __enter__(self) -> ReaderWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        env = dict(os.environ)
        env.update(MEDSEG_FUZZ_MEMORY_MB=str(self.memory_mb), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   MKL_NUM_THREADS="1", ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1", PYTHONFAULTHANDLER="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        if self.preload_torch:
            env["MEDSEG_FUZZ_PRELOAD_TORCH"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(Path(__file__).resolve()), "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env, start_new_session=True,
        )
        ready = self._read_line(max(self.timeout_s, 180))  # imports take a while on a busy machine
        if not ready or not json.loads(ready).get("ready"):
            raise RuntimeError(f"fuzz worker did not start: {self._stderr_tail()}")

    def _read_line(self, timeout: float) -> str | None:
        assert self.proc is not None and self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                return None
            line = self.proc.stdout.readline()
            return line.decode() if line else ""
        finally:
            sel.close()

    def _stderr_tail(self, n: int = 1500) -> str:
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - n))
        return self._stderr.read().decode(errors="replace")

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._kill()

    def run(self, reader: str, path: str | Path, case: str = "", **kwargs: Any) -> Outcome:
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self.restarts += 1
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        case = case or Path(path).name
        start = time.perf_counter()
        self.proc.stdin.write((json.dumps({"reader": reader, "path": str(path), "kwargs": kwargs}) + "\n").encode())
        self.proc.stdin.flush()
        line = self._read_line(self.timeout_s)
        seconds = time.perf_counter() - start
        if line is None:
            self._kill()
            self.restarts += 1
            return Outcome("hang", f"no answer within {self.timeout_s:.0f} s", seconds, case)
        if line == "":
            code = self.proc.wait()
            tail = self._stderr_tail()
            self.proc = None
            self.restarts += 1
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
            # std::bad_alloc under the address-space cap aborts the C++ library: that is memory, not a crash.
            verdict = "oom" if "bad_alloc" in tail or "MemoryError" in tail else "crash"
            return Outcome(verdict, f"worker died ({how}): {tail[-600:]}", seconds, case)
        res = json.loads(line)
        outcome = Outcome(res["verdict"], res["message"], res["seconds"], case, res.get("warnings", []),
                          res.get("peak_mb", 0.0))
        if outcome.peak_mb > MEMORY_FLAG_MB and not outcome.failed:
            outcome = Outcome("oom", f"peak resident memory +{outcome.peak_mb:,.0f} MB (answer: {outcome.message})",
                              outcome.seconds, case, outcome.warnings, outcome.peak_mb)
        if outcome.verdict == "error":
            problem = error_message_problem(outcome.message, Path(path))
            if problem:
                outcome = Outcome("bad_error", f"{problem}: {outcome.message!r}", outcome.seconds, case)
        return outcome


def error_message_problem(message: str, path: Path) -> str | None:
    """Why an error message is not acceptable for ``path``, or None: one line, names the file, no directories."""
    if not message.strip():
        return "empty message"
    if "\n" in message.strip():
        return "message spans several lines"
    if path.name not in message:
        return f"message does not name {path.name!r}"
    parent = str(path.resolve().parent)
    if parent != "/" and parent in message:
        return "message shows the file's directory"
    return None


# ============================================================================================ mutators


def truncate(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


def flip_bits(data: bytes, positions: Iterable[int]) -> bytes:
    buf = bytearray(data)
    for p in positions:
        if buf:
            byte, bit = divmod(p % (len(buf) * 8), 8)
            buf[byte] ^= 1 << bit
    return bytes(buf)


def overwrite(data: bytes, offset: int, value: bytes) -> bytes:
    buf = bytearray(data)
    offset %= max(1, len(buf))
    buf[offset: offset + len(value)] = value
    return bytes(buf[: max(len(data), offset + len(value))])


INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff",
               b"\x00\x00\x80\x7f", b"\x00\x00\xc0\x7f", b"\xff\xff"]  # + inf and NaN as float32


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of each chunk; raises ValueError on a malformed stream."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos: pos + 4])
        ctype = data[pos + 4: pos + 8]
        chunks.append((ctype, data[pos + 8: pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_build(chunks: list[tuple[bytes, bytes]]) -> bytes:
    out = [b"\x89PNG\r\n\x1a\n"]
    for ctype, body in chunks:
        out.append(struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body)))
    return b"".join(out)


def png_with_ihdr(data: bytes, **fields: int) -> bytes:
    """Rewrite IHDR fields (width, height, bit_depth, color_type, interlace), CRC fixed."""
    chunks = png_chunks(data)
    w, h, depth, ctype, comp, filt, inter = struct.unpack(">IIBBBBB", chunks[0][1])
    vals = {"width": w, "height": h, "bit_depth": depth, "color_type": ctype, "compression": comp,
            "filter": filt, "interlace": inter, **fields}
    ihdr = struct.pack(">IIBBBBB", *(vals[k] for k in ("width", "height", "bit_depth", "color_type",
                                                       "compression", "filter", "interlace")))
    return png_build([(b"IHDR", ihdr), *chunks[1:]])


def png_mutate_chunk(data: bytes, index: int, flips: Iterable[int]) -> bytes:
    """Flip bits inside one chunk's data and fix its CRC, so the damage reaches the decoder."""
    chunks = png_chunks(data)
    i = index % len(chunks)
    chunks[i] = (chunks[i][0], flip_bits(chunks[i][1], flips))
    return png_build(chunks)


# NIfTI-1 header offsets (nifti1.h).
NIFTI_FIELDS = {
    "dim": (40, "8h"), "datatype": (70, "h"), "bitpix": (72, "h"), "pixdim": (76, "8f"),
    "vox_offset": (108, "f"), "scl_slope": (112, "f"), "scl_inter": (116, "f"), "qform_code": (252, "h"),
    "sform_code": (254, "h"), "quatern": (256, "3f"), "qoffset": (268, "3f"), "srow_x": (280, "4f"),
    "srow_y": (296, "4f"), "srow_z": (312, "4f"), "magic": (344, "4s"), "sizeof_hdr": (0, "i"),
}


def nifti_get(raw: bytes, name: str) -> tuple:
    off, fmt = NIFTI_FIELDS[name]
    return struct.unpack_from("<" + fmt, raw, off)


def nifti_set(raw: bytes, **fields: Any) -> bytes:
    buf = bytearray(raw)
    for name, value in fields.items():
        off, fmt = NIFTI_FIELDS[name]
        values = value if isinstance(value, (tuple, list)) else (value,)
        struct.pack_into("<" + fmt, buf, off, *values)
    return bytes(buf)


# ============================================================================================ seeds


@dataclass
class Seeds:
    """Real files (copies or lossless conversions of dataset files) to mutate, by format."""

    folder: Path
    files: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Path:
        return self.files[key]

    def data(self, key: str) -> bytes:
        return self.files[key].read_bytes()


def make_seeds(datasets_dir: Path, folder: Path) -> Seeds:
    """png/png_rgb (DSB2018), jpg/tiff/tiff_lzw/tiff_float (converted from DSB2018 and ISBI), nifti/nii
    (MSD hippocampus), nrrd/mha (the same volume), dicom (CT slice, JPEG 2000) and dicom_raw (that slice
    decoded and cropped to 96x96, explicit VR little endian), dicom_series (6 cropped slices)."""
    import numpy as np
    import pydicom
    import SimpleITK as sitk
    from PIL import Image
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    s = Seeds(folder)
    dsb = datasets_dir / "dsb2018_nuclei" / "images"
    s.files["png"] = Path(shutil.copy(dsb / "000_00071198d059.png", folder / "gray.png"))
    s.files["png_rgb"] = Path(shutil.copy(dsb / "002_00ae65c1c663.png", folder / "rgb.png"))
    with Image.open(s.files["png_rgb"]) as im:
        rgb = im.convert("RGB")
    rgb.save(folder / "rgb.jpg", quality=90)
    s.files["jpg"] = folder / "rgb.jpg"
    em = Image.open(datasets_dir / "isbi2012_em" / "images" / "00.png").convert("L").crop((0, 0, 128, 128))
    em.save(folder / "em.tif", dpi=(300, 300))
    s.files["tiff"] = folder / "em.tif"
    rgb.save(folder / "rgb_lzw.tif", compression="tiff_lzw")
    s.files["tiff_lzw"] = folder / "rgb_lzw.tif"
    Image.fromarray(np.asarray(em, dtype=np.float32) / 255.0, mode="F").save(folder / "em_float.tif")
    s.files["tiff_float"] = folder / "em_float.tif"

    hippo = datasets_dir / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz"
    s.files["nifti"] = Path(shutil.copy(hippo, folder / "hippo.nii.gz"))
    (folder / "hippo.nii").write_bytes(gzip.decompress(hippo.read_bytes()))
    s.files["nii"] = folder / "hippo.nii"
    image = sitk.ReadImage(str(hippo))
    sitk.WriteImage(image, str(folder / "hippo.nrrd"))
    sitk.WriteImage(image, str(folder / "hippo.mha"))
    s.files["nrrd"] = folder / "hippo.nrrd"
    s.files["mha"] = folder / "hippo.mha"

    ct = sorted((datasets_dir / "dicom_ct_series" / "dicom").glob("*.dcm"))
    s.files["dicom"] = Path(shutil.copy(ct[0], folder / "ct_slice.dcm"))
    series = folder / "ct_series"
    series.mkdir(exist_ok=True)
    uid = generate_uid()
    for i, src in enumerate(ct[:6]):
        ds = pydicom.dcmread(src)
        arr = ds.pixel_array[200:296, 200:296].copy()  # 96x96 around the middle: small and still anatomy
        ds.PixelData = arr.tobytes()
        ds.Rows, ds.Columns = arr.shape
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(series / f"IM{i + 1:04d}.dcm", enforce_file_format=True)
    s.files["dicom_series"] = series
    s.files["dicom_raw"] = Path(shutil.copy(series / "IM0001.dcm", folder / "ct_raw.dcm"))
    return s


# ============================================================================================ crafted cases


@dataclass
class Case:
    """One crafted input: ``fmt`` is the table row it counts for; ``expect`` documents the intended answer
    (``error`` or ``ok``; ``any`` where either is acceptable) and is checked by the tests."""

    fmt: str
    name: str
    path: Path
    reader: str = "read_scan"
    expect: str = "error"
    kwargs: dict[str, Any] = field(default_factory=dict)
    message: str = ""  # a fragment the error message must hold (the reason), when set


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def absurd_header_cases(seeds: Seeds, folder: Path) -> list[Case]:
    """Valid-looking files whose headers claim nonsense: huge/zero/negative sizes and spacing, NaN/Inf,
    unsupported dtypes, 4D/5D, data offsets past the end."""
    import numpy as np
    import pydicom
    import SimpleITK as sitk
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")  # pydicom and ITK complain about the very values written on purpose
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    cases: list[Case] = []

    def add(fmt: str, name: str, data: bytes | Path, expect: str = "error", reader: str = "read_scan") -> None:
        path = data if isinstance(data, Path) else _write(folder, name, data)
        cases.append(Case(fmt, name, path, reader, expect))

    # ---- PNG (IHDR edited, CRC fixed)
    png = seeds.data("png")
    add("png", "png_huge_dims.png", png_with_ihdr(png, width=2**31 - 1, height=2**31 - 1))
    add("png", "png_huge_width.png", png_with_ihdr(png, width=200_000, height=1000))
    add("png", "png_zero_width.png", png_with_ihdr(png, width=0))
    add("png", "png_zero_height.png", png_with_ihdr(png, height=0))
    add("png", "png_bad_bit_depth.png", png_with_ihdr(png, bit_depth=3))
    add("png", "png_bad_color_type.png", png_with_ihdr(png, color_type=5))
    add("png", "png_16bit_claim.png", png_with_ihdr(png, bit_depth=16))
    add("png", "png_palette_without_plte.png", png_with_ihdr(png, color_type=3, bit_depth=8), expect="any")
    add("png", "png_interlace_claim.png", png_with_ihdr(png, interlace=1))
    add("png", "png_bad_compression.png", png_with_ihdr(png, compression=1), expect="any")
    chunks = png_chunks(png)
    add("png", "png_no_idat.png", png_build([c for c in chunks if c[0] != b"IDAT"]))
    add("png", "png_no_iend.png", png_build([c for c in chunks if c[0] != b"IEND"]), expect="any")
    phys_zero = [chunks[0], (b"pHYs", struct.pack(">IIB", 0, 0, 1)), *chunks[1:]]
    add("png", "png_zero_resolution.png", png_build(phys_zero), expect="ok")
    phys_huge = [chunks[0], (b"pHYs", struct.pack(">IIB", 2**32 - 1, 1, 1)), *chunks[1:]]
    add("png", "png_absurd_resolution.png", png_build(phys_huge), expect="ok")
    ztxt_bomb = [chunks[0], (b"zTXt", b"k\x00\x00" + zlib.compress(b"A" * 50_000_000, 9)), *chunks[1:]]
    add("png", "png_ztxt_bomb.png", png_build(ztxt_bomb), expect="any")
    bomb_ihdr = struct.pack(">IIBBBBB", 9000, 9000, 8, 0, 0, 0, 0)  # 81 Mpx, under the cap: decodes, bounded
    rows = zlib.compress(b"\x00" * (9001 * 9000), 9)
    add("png", "png_idat_bomb_81mpx.png", png_build([(b"IHDR", bomb_ihdr), (b"IDAT", rows), (b"IEND", b"")]),
        expect="ok")
    big_ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 400 Mpx: above the cap
    add("png", "png_idat_bomb_400mpx.png",
        png_build([(b"IHDR", big_ihdr), (b"IDAT", zlib.compress(b"\x00" * 20001 * 64)), (b"IEND", b"")]))

    # ---- TIFF
    with Image.open(seeds["tiff"]) as im:
        em = np.asarray(im)
    buf = io.BytesIO()
    Image.fromarray(em).save(buf, format="TIFF")
    tif = buf.getvalue()
    add("tiff", "tiff_huge_dims.tif", _tiff_set_tag(tif, 256, 2**31 - 1, 257, 2**31 - 1))
    add("tiff", "tiff_zero_width.tif", _tiff_set_tag(tif, 256, 0))
    add("tiff", "tiff_strip_offset_past_end.tif", _tiff_set_tag(tif, 273, 10**8))
    add("tiff", "tiff_bits_64.tif", _tiff_set_tag(tif, 258, 64))
    add("tiff", "tiff_samples_5.tif", _tiff_set_tag(tif, 277, 5), expect="any")
    add("tiff", "tiff_unknown_compression.tif", _tiff_set_tag(tif, 259, 60000))
    frames = [Image.fromarray(em), Image.fromarray(255 - em)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    add("tiff", "tiff_multipage.tif", buf.getvalue())
    for dtype, mode in ((np.float64, None), (np.int32, "I"), (np.complex64, None), (np.bool_, None)):
        try:
            img = Image.fromarray(em.astype(dtype), mode=mode) if mode else Image.fromarray(em.astype(dtype))
            buf = io.BytesIO()
            img.save(buf, format="TIFF")
            add("tiff", f"tiff_{np.dtype(dtype).name}.tif", buf.getvalue(), expect="any")
        except (TypeError, ValueError, KeyError, OSError):
            pass
    nan_img = em.astype(np.float32)
    nan_img[:10] = np.nan
    nan_img[10:20] = np.inf
    Image.fromarray(nan_img, mode="F").save(folder / "tiff_nan_inf.tif")
    add("tiff", "tiff_nan_inf.tif", folder / "tiff_nan_inf.tif", expect="ok")
    Image.fromarray(np.full_like(nan_img, np.nan), mode="F").save(folder / "tiff_all_nan.tif")
    add("tiff", "tiff_all_nan.tif", folder / "tiff_all_nan.tif")

    # ---- JPEG: SOF0 dimensions edited
    jpg = seeds.data("jpg")
    sof = jpg.find(b"\xff\xc0")
    if sof > 0:
        add("jpg", "jpg_huge_dims.jpg", overwrite(jpg, sof + 5, struct.pack(">HH", 65500, 65500)))
        add("jpg", "jpg_zero_dims.jpg", overwrite(jpg, sof + 5, struct.pack(">HH", 0, 0)))
        # libjpeg pads missing scan data with grey and Pillow reports no error: a known limitation.
        add("jpg", "jpg_wrong_dims.jpg", overwrite(jpg, sof + 5, struct.pack(">HH", 3000, 3000)), expect="any")
        add("jpg", "jpg_bad_components.jpg", overwrite(jpg, sof + 9, b"\x07"))
    add("jpg", "jpg_only_soi.jpg", b"\xff\xd8\xff")
    add("jpg", "jpg_empty.jpg", b"")

    # ---- NIfTI (header fields of the real hippocampus volume)
    raw = seeds.data("nii")
    data_start = int(nifti_get(raw, "vox_offset")[0])
    dims = nifti_get(raw, "dim")
    voxels = raw[data_start:]

    def nii(name: str, expect: str = "error", body: bytes | None = None, gz: bool = True, **fields: Any) -> None:
        data = nifti_set(raw[:data_start], **fields) + (voxels if body is None else body)
        add("nifti", name + (".nii.gz" if gz else ".nii"), gzip.compress(data, 1) if gz else data, expect)

    nii("nii_huge_dims", dim=(3, 30000, 30000, 30000, 1, 1, 1, 1))
    nii("nii_big_dims_no_data", dim=(3, 2000, 2000, 200, 1, 1, 1, 1))
    nii("nii_big_dims_no_data_raw", gz=False, dim=(3, 2000, 2000, 200, 1, 1, 1, 1))
    nii("nii_zero_dim", dim=(3, dims[1], 0, dims[3], 1, 1, 1, 1), expect="any")
    nii("nii_negative_dim", dim=(3, -dims[1], dims[2], dims[3], 1, 1, 1, 1))
    nii("nii_ndim_0", dim=(0, *dims[1:]), expect="any")
    nii("nii_ndim_9", dim=(9, *dims[1:]), expect="any")
    nii("nii_ndim_negative", dim=(-3, *dims[1:]), expect="any")
    nii("nii_4d", dim=(4, dims[1], dims[2], dims[3], 2, 1, 1, 1), body=voxels * 2)
    nii("nii_4d_t1", dim=(4, dims[1], dims[2], dims[3], 1, 1, 1, 1), expect="ok")
    nii("nii_5d", dim=(5, dims[1], dims[2], dims[3], 1, 2, 1, 1), body=voxels * 2)
    nii("nii_5d_all_ones", dim=(5, dims[1], dims[2], dims[3], 1, 1, 1, 1), expect="any")
    pix = nifti_get(raw, "pixdim")
    nii("nii_zero_spacing", pixdim=(pix[0], 0.0, 0.0, 0.0, *pix[4:]), expect="any")
    nii("nii_negative_spacing", pixdim=(pix[0], -1.0, -2.0, -3.0, *pix[4:]), expect="any")
    nii("nii_nan_spacing", pixdim=(pix[0], float("nan"), 1.0, 1.0, *pix[4:]), expect="any")
    nii("nii_inf_spacing", pixdim=(pix[0], float("inf"), 1.0, 1.0, *pix[4:]), expect="any")
    nii("nii_tiny_spacing", pixdim=(pix[0], 1e-38, 1e-38, 1e-38, *pix[4:]), expect="any")
    nii("nii_nan_vox_offset", vox_offset=float("nan"), expect="any")
    nii("nii_inf_vox_offset", vox_offset=float("inf"), expect="any")
    nii("nii_negative_vox_offset", vox_offset=-4096.0, expect="any")
    nii("nii_huge_vox_offset", vox_offset=1e9)
    nii("nii_nan_slope", scl_slope=float("nan"), expect="any")
    nii("nii_inf_slope", scl_slope=float("inf"), expect="any")
    nii("nii_huge_slope", scl_slope=3e38, expect="any")
    nii("nii_nan_qform", qform_code=1, sform_code=0, quatern=(float("nan"),) * 3, expect="any")
    nii("nii_bad_quaternion", qform_code=1, sform_code=0, quatern=(2.0, 2.0, 2.0), expect="any")
    nii("nii_zero_sform", qform_code=0, sform_code=1, srow_x=(0.0,) * 4, srow_y=(0.0,) * 4,
        srow_z=(0.0,) * 4, expect="any")
    nii("nii_nan_sform", qform_code=0, sform_code=1, srow_x=(float("nan"),) * 4, expect="any")
    nii("nii_bad_sizeof_hdr", sizeof_hdr=1234, expect="any")
    # ITK's NIfTI reader never returned on this one (non-orthogonal sform + infinite offset); found by fuzzing.
    nii("nii_sform_inf_offset_hang", qform_code=1, sform_code=1, srow_y=(1e-3, 1.0, 0.0, float("inf")))
    nii("nii_bad_magic", magic=b"xyz\x00", expect="any")
    nii("nii_analyze_pair_magic", magic=b"ni1\x00", expect="any")
    itemsize = {2: 1, 4: 2, 8: 4, 16: 4, 64: 8, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8}
    n_vox = int(np.prod(dims[1:4]))
    for code, bitpix, label in ((32, 64, "complex64"), (1792, 128, "complex128"), (1536, 128, "float128"),
                                (128, 24, "rgb24"), (2304, 32, "rgba32"), (1, 1, "binary"), (9999, 8, "unknown"),
                                (1024, 64, "int64"), (1280, 64, "uint64"), (64, 64, "float64")):
        nbytes = n_vox * bitpix // 8
        body = (voxels * (nbytes // len(voxels) + 1))[:nbytes]
        nii(f"nii_dtype_{label}", datatype=code, bitpix=bitpix, body=body, expect="any")
    nii("nii_bitpix_mismatch", datatype=2, bitpix=64, expect="any")
    del itemsize
    # float data with NaN/Inf voxels (written by SimpleITK: NaN survive in NRRD/MHA, NIfTI keeps them too)
    vol = sitk.GetArrayFromImage(sitk.ReadImage(str(seeds["nifti"]))).astype(np.float32)
    vol[0] = np.nan
    vol[1] = np.inf
    vol[2] = -np.inf
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        img = sitk.GetImageFromArray(vol)
        sitk.WriteImage(img, str(folder / f"vol_nan_inf{suffix}"))
        add("nifti" if suffix == ".nii.gz" else suffix[1:], f"vol_nan_inf{suffix}", folder / f"vol_nan_inf{suffix}",
            expect="ok")
    img = sitk.GetImageFromArray(np.full((4, 8, 8), np.nan, np.float32))
    sitk.WriteImage(img, str(folder / "vol_all_nan.mha"))
    add("mha", "vol_all_nan.mha", folder / "vol_all_nan.mha")
    img = sitk.GetImageFromArray(np.zeros((2, 3, 4, 5, 6), np.uint8))  # 5D: SimpleITK writes it as NIfTI/NRRD
    for suffix in (".nii.gz", ".nrrd"):
        try:
            sitk.WriteImage(img, str(folder / f"vol_5d{suffix}"))
            add("nifti" if suffix == ".nii.gz" else "nrrd", f"vol_5d{suffix}", folder / f"vol_5d{suffix}")
        except RuntimeError:
            pass
    vec = sitk.GetImageFromArray(np.zeros((4, 8, 8, 3), np.float32), isVector=True)
    sitk.WriteImage(vec, str(folder / "vol_vector.nrrd"))
    add("nrrd", "vol_vector.nrrd", folder / "vol_vector.nrrd")

    # ---- NRRD / MetaImage headers
    nrrd_header = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: {sizes}\nspacings: {sp}\nencoding: raw\n\n"
    add("nrrd", "nrrd_huge_sizes.nrrd",
        nrrd_header.format(sizes="100000 100000 100000", sp="1 1 1").encode() + b"\x00" * 64)
    add("nrrd", "nrrd_short_data.nrrd", nrrd_header.format(sizes="64 64 64", sp="1 1 1").encode() + b"\x00" * 64)
    add("nrrd", "nrrd_zero_spacing.nrrd",
        nrrd_header.format(sizes="4 4 4", sp="0 0 0").encode() + b"\x00" * 64, expect="any")
    add("nrrd", "nrrd_negative_spacing.nrrd",
        nrrd_header.format(sizes="4 4 4", sp="-1 -1 -1").encode() + b"\x00" * 64, expect="any")
    add("nrrd", "nrrd_nan_spacing.nrrd",
        nrrd_header.format(sizes="4 4 4", sp="nan nan nan").encode() + b"\x00" * 64, expect="any")
    add("nrrd", "nrrd_datafile_escape.nrrd",
        b"NRRD0004\ntype: uint8\ndimension: 1\nsizes: 8\ndata file: /etc/passwd\nencoding: raw\n\n")
    add("nrrd", "nrrd_gzip_bomb.nrrd",
        nrrd_header.format(sizes="1000 1000 1000", sp="1 1 1").replace("raw", "gzip").encode()
        + gzip.compress(b"\x00" * 10_000_000, 9), expect="any")
    mha = "ObjectType = Image\nNDims = 3\nDimSize = {size}\nElementSpacing = {sp}\nElementType = MET_UCHAR\n" \
          "ElementDataFile = {file}\n"
    add("mha", "mha_huge_dims.mha", mha.format(size="100000 100000 100000", sp="1 1 1", file="LOCAL").encode())
    add("mha", "mha_zero_spacing.mha",
        mha.format(size="4 4 4", sp="0 0 0", file="LOCAL").encode() + b"\x00" * 64, expect="any")
    add("mha", "mha_negative_dims.mha", mha.format(size="-4 4 4", sp="1 1 1", file="LOCAL").encode() + b"\x00" * 64,
        expect="any")
    add("mha", "mha_datafile_escape.mha", mha.format(size="4 4 4", sp="1 1 1", file="../../../etc/passwd").encode())
    add("mha", "mha_datafile_list.mha", mha.format(size="4 4 4", sp="1 1 1", file="LIST 2D").encode())
    add("mha", "mha_ndims_9.mha", mha.format(size="1 1 1", sp="1 1 1", file="LOCAL").replace("NDims = 3", "NDims = 9")
        .encode() + b"\x00" * 8, expect="any")

    # ---- DICOM (the decoded, cropped CT slice; header fields edited with pydicom)
    def dcm(name: str, expect: str = "error", edit: Callable[[pydicom.Dataset], None] | None = None,
            src: str = "dicom_raw", patch: tuple[bytes, bytes] | None = None) -> None:
        ds = pydicom.dcmread(seeds[src])
        if edit is not None:
            edit(ds)
        path = folder / name
        ds.save_as(path, enforce_file_format=False)
        if patch is not None:  # values pydicom refuses to write are patched into the bytes
            data = path.read_bytes()
            assert patch[0] in data and len(patch[0]) == len(patch[1])
            path.write_bytes(data.replace(patch[0], patch[1], 1))
        add("dicom", name, path, expect)

    def setter(**values: Any) -> Callable[[pydicom.Dataset], None]:
        def edit(ds: pydicom.Dataset) -> None:
            for k, v in values.items():
                if v is None:
                    if k in ds:
                        delattr(ds, k)
                else:
                    setattr(ds, k, v)
        return edit

    dcm("dcm_rows_0.dcm", edit=setter(Rows=0))
    dcm("dcm_cols_0.dcm", edit=setter(Columns=0))
    dcm("dcm_huge_rows_cols.dcm", edit=setter(Rows=65535, Columns=65535))
    dcm("dcm_big_rows_cols_no_data.dcm", edit=setter(Rows=30000, Columns=30000))
    dcm("dcm_bits_allocated_64.dcm", edit=setter(BitsAllocated=64, BitsStored=64, HighBit=63), expect="any")
    dcm("dcm_bits_allocated_1.dcm", edit=setter(BitsAllocated=1, BitsStored=1, HighBit=0), expect="any")
    dcm("dcm_bits_allocated_0.dcm", edit=setter(BitsAllocated=0), expect="any")
    dcm("dcm_bits_allocated_12.dcm", edit=setter(BitsAllocated=12), expect="any")
    dcm("dcm_bits_stored_gt_allocated.dcm", edit=setter(BitsStored=32, HighBit=31), expect="any")
    dcm("dcm_pixel_representation_7.dcm", edit=setter(PixelRepresentation=7), expect="any")
    dcm("dcm_samples_3_mono.dcm", edit=setter(SamplesPerPixel=3), expect="any")
    dcm("dcm_samples_0.dcm", edit=setter(SamplesPerPixel=0), expect="any")
    dcm("dcm_photometric_bogus.dcm", edit=setter(PhotometricInterpretation="BOGUS"), expect="any")
    dcm("dcm_spacing_zero.dcm", edit=setter(PixelSpacing=[0, 0]), expect="any")
    dcm("dcm_spacing_negative.dcm", edit=setter(PixelSpacing=[-1, -1]), expect="any")
    dcm("dcm_spacing_nan.dcm", edit=setter(PixelSpacing=["nan", "nan"]), expect="any")
    dcm("dcm_spacing_inf.dcm", edit=setter(PixelSpacing=["inf", "1"]), expect="any")
    dcm("dcm_spacing_garbage.dcm", edit=setter(PixelSpacing=[1.25, 1.25]), expect="any",
        patch=(b"1.25\\1.25", b"abc\\1.2.3"))
    dcm("dcm_slope_nan.dcm", edit=setter(RescaleSlope="nan"), expect="any")
    dcm("dcm_slope_zero.dcm", edit=setter(RescaleSlope=0), expect="any")
    dcm("dcm_slope_huge.dcm", edit=setter(RescaleSlope="1e308"), expect="any")
    dcm("dcm_intercept_inf.dcm", edit=setter(RescaleIntercept="inf"), expect="any")
    dcm("dcm_iop_zero.dcm", edit=setter(ImageOrientationPatient=[0, 0, 0, 0, 0, 0]), expect="any")
    dcm("dcm_iop_nan.dcm", edit=setter(ImageOrientationPatient=["nan"] * 6), expect="any")
    dcm("dcm_ipp_nan.dcm", edit=setter(ImagePositionPatient=["nan"] * 3), expect="any")
    dcm("dcm_frames_huge.dcm", edit=setter(NumberOfFrames=10**9), expect="any")
    dcm("dcm_frames_zero.dcm", edit=setter(NumberOfFrames=0), expect="any")
    dcm("dcm_frames_negative.dcm", edit=setter(NumberOfFrames=-5), expect="any")
    dcm("dcm_no_pixel_data.dcm", edit=setter(PixelData=None))
    dcm("dcm_short_pixel_data.dcm", edit=lambda ds: setattr(ds, "PixelData", ds.PixelData[:100]))
    dcm("dcm_odd_pixel_data.dcm", edit=lambda ds: setattr(ds, "PixelData", ds.PixelData + b"\x00"), expect="any")
    dcm("dcm_window_garbage.dcm", edit=setter(WindowCenter="12345", WindowWidth="nan"), expect="any",
        patch=(b"12345", b"abcde"))
    dcm("dcm_charset_bogus.dcm", edit=setter(SpecificCharacterSet="ISO_IR 9999", PatientName="Zz^Yy"),
        expect="any")
    dcm("dcm_modality_seg.dcm", edit=setter(Modality="SEG"))
    # A trailing element whose garbled VR makes its length 0xBF03A803: GDCM allocated 3.2 GB for this 24 KB
    # file before failing (found by atheris).
    add("dicom", "dcm_trailing_element_claims_3gb.dcm",
        seeds.data("dicom_raw") + b"\x03\x9f\x03\xa3" + b"\x03\xa8\x03\xbf" + b"\x00" * 5000)
    # One flipped bit in a file-meta VR (AE -> AG): GDCM read the value as a 4-byte length and took 1.3 GB.
    raw_dcm = seeds.data("dicom_raw")
    assert b"\x02\x00\x16\x00AE" in raw_dcm
    add("dicom", "dcm_meta_vr_garbled.dcm", raw_dcm.replace(b"\x02\x00\x16\x00AE", b"\x02\x00\x16\x00AG", 1))

    def claim_transfer_syntax(uid: str) -> Callable[[pydicom.Dataset], None]:
        def edit(ds: pydicom.Dataset) -> None:
            from pydicom.encaps import encapsulate

            ds.file_meta.TransferSyntaxUID = uid
            if pydicom.uid.UID(uid).is_transfer_syntax and pydicom.uid.UID(uid).is_compressed:
                ds.PixelData = encapsulate([ds.PixelData])
        return edit

    # Raw pixels labelled as compressed: the decoders get garbage codestreams.
    dcm("dcm_raw_claims_jpeg2000.dcm", edit=claim_transfer_syntax("1.2.840.10008.1.2.4.90"), expect="any")
    dcm("dcm_raw_claims_jpeg_baseline.dcm", edit=claim_transfer_syntax("1.2.840.10008.1.2.4.50"), expect="any")
    dcm("dcm_raw_claims_jpegls.dcm", edit=claim_transfer_syntax("1.2.840.10008.1.2.4.80"), expect="any")
    dcm("dcm_raw_claims_rle.dcm", edit=claim_transfer_syntax("1.2.840.10008.1.2.5"), expect="any")
    dcm("dcm_raw_claims_deflate.dcm", edit=claim_transfer_syntax("1.2.840.10008.1.2.1.99"), expect="any")
    dcm("dcm_unknown_transfer_syntax.dcm", edit=claim_transfer_syntax("1.2.3.4.5.6.7"), expect="any")
    dcm("dcm_j2k_claims_huge.dcm", src="dicom", edit=setter(Rows=20000, Columns=20000), expect="any")
    dcm("dcm_j2k_claims_small.dcm", src="dicom", edit=setter(Rows=16, Columns=16), expect="any")
    dcm("dcm_j2k_bits_8.dcm", src="dicom", edit=setter(BitsAllocated=8, BitsStored=8, HighBit=7), expect="any")
    return cases


# Bytes a hostile header points at: a scan holding any run of them was read from outside the input.
SECRET = bytes(range(1, 256)) * 64
METAIMAGE_DATA_LINES = {
    "equals": "ElementDataFile = {}", "colon": "ElementDataFile: {}", "colon_tight": "ElementDataFile:{}",
    "tabs": "ElementDataFile\t=\t{}", "indented": "   ElementDataFile = {}", "colon_equals": "ElementDataFile := {}",
    "double_equals": "ElementDataFile == {}", "trailing_blanks": "ElementDataFile \t= {}  \t",
    "list": "ElementDataFile = LIST\n{}", "pattern": "ElementDataFile = {}%d 0 0 1",
}
NRRD_DATA_LINES = {
    "data_file": "data file: {}", "datafile": "datafile: {}", "upper": "DATA FILE: {}", "camel": "DataFile: {}",
    "two_spaces": "data file:  {}", "tab": "data file: \t{}", "list": "data file: LIST\n{}",
    "pattern": "data file: {}%d 0 0 1",
}
HEADER_PADDINGS = {"short": 0, "70kB": 70_000, "1MB": 1_000_000}  # the old guard searched the first 64 KiB


def hostile_header_cases(seeds: Seeds, folder: Path) -> list[Case]:
    """Headers that attack the reader rather than confuse it (issue 15).

    * Data-file references: MetaImage and NRRD headers (.mha/.mhd, .nrrd/.nhdr) pointing their voxels at a
      secret file outside the input folder, in every separator and spelling ITK accepts, behind headers of
      every length, with LF/CRLF/CR line ends, as LIST and %d patterns, by absolute and by ``../`` path; each
      read as an upload (``untrusted``) and as a local file. Expected: a one-line error every time; a scan
      holding the secret's bytes is a ``leak``.
    * Header tricks that make a text search and ITK disagree: a name line without separator (MetaIO takes its
      value from the next line), a NUL inside the field name.
    * Voxel-count bombs in every format: files of a few hundred bytes whose headers announce 10^10 and more
      samples (PNG, JPEG, TIFF, NIfTI, NRRD, MetaImage, a DICOM file and a zipped DICOM series), read with the
      service's kind of cap: refused from the header (``above the cap``), never decoded.
    """
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    secret = _write(folder / "outside", "secret.bin", SECRET)
    _write(folder / "outside", "secret0", SECRET)  # what the %d patterns below expand to
    cases: list[Case] = []

    def add(fmt: str, name: str, data: bytes, *, upload: bool, message: str = "") -> None:
        path = _write(folder / ("upload" if upload else "local") / name.rsplit(".", 1)[0], name, data)
        cases.append(Case(fmt, f"{'upload' if upload else 'local'}/{name}", path, kwargs={
            "untrusted": upload, "secret": str(secret)}, message=message))

    def padding(kind: str, size: int, eol: str, metaimage: bool) -> str:
        if not size:
            return ""
        line = ("Comment = padding line" if metaimage else "# padding line") + eol
        return line * (size // len(line) + 1)

    mha_head = ["ObjectType = Image", "NDims = 2", "DimSize = 16 16", "ElementType = MET_UCHAR"]
    nrrd_head = ["NRRD0004", "type: uint8", "dimension: 2", "sizes: 16 16", "encoding: raw"]
    targets = {"abs": str(secret), "rel": f"../../outside/{secret.name}"}
    for upload in (True, False):
        expected = "inside the file" if upload else ""
        for syntax, line in METAIMAGE_DATA_LINES.items():
            for pad, size in HEADER_PADDINGS.items():
                for eol_name, eol in (("lf", "\n"), ("crlf", "\r\n")):
                    for target_name, target in targets.items():
                        if pad != "short" and (target_name == "rel" or eol_name == "crlf"):
                            continue  # long headers: one spelling of the rest is enough
                        ref = target[: -len(secret.name)] + "secret" if syntax == "pattern" else target
                        body = eol.join(mha_head) + eol + padding(pad, size, eol, True) + line.format(ref) + eol
                        for suffix in (".mha", ".mhd"):
                            reason = "detached header" if upload and suffix == ".mhd" else expected
                            add("mha", f"ref_{syntax}_{pad}_{eol_name}_{target_name}{suffix}", body.encode(),
                                upload=upload, message=reason)
        for syntax, line in NRRD_DATA_LINES.items():
            for pad, size in HEADER_PADDINGS.items():
                for eol_name, eol in (("lf", "\n"), ("crlf", "\r\n"), ("cr", "\r")):
                    for target_name, target in targets.items():
                        if pad != "short" and (target_name == "rel" or eol_name != "lf"):
                            continue
                        ref = target[: -len(secret.name)] + "secret" if syntax == "pattern" else target
                        tail = eol if syntax == "list" else eol + eol
                        body = eol.join(nrrd_head) + eol + padding(pad, size, eol, False) + line.format(ref) + tail
                        for suffix in (".nrrd", ".nhdr"):
                            reason = "detached header" if upload and suffix == ".nhdr" else expected
                            add("nrrd", f"ref_{syntax}_{pad}_{eol_name}_{target_name}{suffix}", body.encode(),
                                upload=upload, message=reason)
        head = "\n".join(mha_head) + "\n"
        add("mha", "trick_no_separator.mha",
            f"{head}Junk\nElementDataFile = LOCAL\nElementDataFile = {secret}\n".encode(), upload=upload,
            message="without '=' or ':'")
        # MetaIO compares names up to a NUL: it stops at the first line; a search for the exact name, at the second.
        add("mha", "trick_nul_in_name.mha",
            f"{head}ElementDataFile\x00x = {secret}\nElementDataFile = LOCAL\n".encode() + SECRET[:256],
            upload=upload, message="NUL")

    # ---- voxel-count bombs: tiny files, enormous headers, a 10-megavoxel cap as a service would set it
    cap = {"max_voxels": 10_000_000, "max_pixels": 10_000_000, "untrusted": True}

    def bomb(fmt: str, name: str, data: bytes) -> None:
        path = _write(folder / "bombs", name, data)
        cases.append(Case(fmt, f"bomb/{name}", path, kwargs=dict(cap), message="above the cap"))

    png = seeds.data("png")
    bomb("png", "bomb_60000x60000.png", png_with_ihdr(png, width=60000, height=60000)[:400])
    with open(seeds["jpg"], "rb") as f:
        jpg = bytearray(f.read())
    sof = next(i for i in range(len(jpg) - 1) if jpg[i] == 0xFF and jpg[i + 1] in (0xC0, 0xC2))
    struct.pack_into(">HH", jpg, sof + 5, 65000, 65000)
    bomb("jpg", "bomb_65000x65000.jpg", bytes(jpg))
    with open(seeds["tiff"], "rb") as f:
        tif = f.read()
    bomb("tiff", "bomb_100000x100000.tif", _tiff_set_tag(tif, 256, 100_000, 257, 100_000))
    raw_nii = gzip.decompress(seeds.data("nifti"))
    header = nifti_set(raw_nii[:352], dim=(3, 3000, 3000, 3000, 1, 1, 1, 1))
    bomb("nifti", "bomb_3000cubed.nii.gz", gzip.compress(header + b"\x00" * 64))
    bomb("nifti", "bomb_3000cubed.nii", header + b"\x00" * 64)
    bomb("nrrd", "bomb_5000cubed.nrrd", b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 5000 5000 5000\n"
                                          b"encoding: gzip\n\n" + gzip.compress(b"\x00" * 1000))
    bomb("mha", "bomb_5000cubed.mha", b"ObjectType = Image\nNDims = 3\nDimSize = 5000 5000 5000\n"
                                        b"ElementType = MET_UCHAR\nCompressedData = True\nElementDataFile = LOCAL\n"
                                        + zlib.compress(b"\x00" * 1000))
    ds = pydicom.dcmread(seeds["dicom_raw"])
    ds.Rows = ds.Columns = 65535
    out = io.BytesIO()
    ds.save_as(out)
    bomb("dicom", "bomb_65535x65535.dcm", out.getvalue())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, src in enumerate(sorted(Path(seeds["dicom_series"]).glob("*.dcm"))):
            slice_ds = pydicom.dcmread(src)
            slice_ds.Rows = slice_ds.Columns = 40000
            out = io.BytesIO()
            slice_ds.save_as(out)
            zf.writestr(f"series/IM{i:04d}.dcm", out.getvalue())
    bomb("zip", "bomb_series_6x40000x40000.zip", buf.getvalue())
    return cases


def _tiff_set_tag(data: bytes, *tag_values: int) -> bytes:
    """Rewrite SHORT/LONG values of tags in the first IFD of a little-endian TIFF (pairs tag, value)."""
    assert data[:2] == b"II"
    buf = bytearray(data)
    (ifd,) = struct.unpack_from("<I", buf, 4)
    (n,) = struct.unpack_from("<H", buf, ifd)
    wanted = dict(zip(tag_values[::2], tag_values[1::2], strict=True))
    for i in range(n):
        entry = ifd + 2 + 12 * i
        tag, typ, count = struct.unpack_from("<HHI", buf, entry)
        if tag in wanted:
            value = wanted[tag]
            if typ == 3 and value <= 0xFFFF:
                struct.pack_into("<HHIH", buf, entry, tag, 3, 1, value)
            else:
                struct.pack_into("<HHII", buf, entry, tag, 4, 1, value)
    return bytes(buf)


def raw_zip(entries: list[dict[str, Any]]) -> bytes:
    """A zip built by hand, so headers can lie. Each entry: ``name``, ``data`` (stored bytes as they go in the
    file), optional ``method`` (0 stored, 8 deflate), ``crc``, ``size`` (declared uncompressed), ``flags``,
    ``external_attr``."""
    out = io.BytesIO()
    central = []
    for e in entries:
        name = e["name"].encode("utf-8")
        data = e["data"]
        method = e.get("method", 0)
        crc = e.get("crc", zlib.crc32(data) if method == 0 else 0)
        size = e.get("size", len(data))
        flags = e.get("flags", 0x800)
        offset = out.tell()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, method, 0, 0x21, crc, len(data), size,
                              len(name), 0) + name + data)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0x031E, 20, flags, method, 0, 0x21, crc,
                                   len(data), size, len(name), 0, 0, 0, 0, e.get("external_attr", 0o644 << 16),
                                   offset) + name)
    cd_start = out.tell()
    for c in central:
        out.write(c)
    cd_size = out.tell() - cd_start
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), cd_size, cd_start, 0))
    return out.getvalue()


def deflate(data: bytes, level: int = 9) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def zip_cases(seeds: Seeds, folder: Path) -> list[Case]:
    """Zip bombs (ratio, total size, lying headers), zip slip, symlinks, thousands of members, nested zips,
    names the file system refuses, and the DICOM series zipped with damaged members."""
    folder.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(name: str, data: bytes, expect: str = "error", reader: str = "read_scan", **kwargs: Any) -> None:
        cases.append(Case("zip", name, _write(folder, name, data), reader, expect, kwargs))

    def zf(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", method) as z:
            for n, d in members.items():
                z.writestr(n, d)
        return buf.getvalue()

    series = sorted(seeds["dicom_series"].glob("*.dcm"))
    series_members = {f"series/{p.name}": p.read_bytes() for p in series}
    add("series.zip", zf(series_members), expect="ok")

    # Bombs. One deflated MiB of zeros is reused, so building these costs nothing.
    mib = 1024**2
    zeros_1m = deflate(b"\x00" * mib)
    crc_1m = zlib.crc32(b"\x00" * mib)
    add("bomb_ratio.zip", zf({"scan.nii": b"\x00" * (64 * mib)}))
    add("bomb_total_declared.zip",
        raw_zip([{"name": f"part{i:05d}.dcm", "data": zeros_1m, "method": 8, "crc": crc_1m, "size": 700 * mib}
                 for i in range(4)]))
    # Each member just below the per-member ratio threshold, together far above the total cap.
    below = zlib.crc32(b"\x00" * (mib - 1))
    small_zeros = deflate(b"\x00" * (mib - 1))
    add("bomb_many_small.zip",
        raw_zip([{"name": f"m{i:05d}.dcm", "data": small_zeros, "method": 8, "crc": below, "size": mib - 1}
                 for i in range(2100)]))
    # Headers that lie: declared size 10 bytes, stream inflates to a MiB; a wrong CRC.
    add("lying_size.zip", raw_zip([{"name": "a.dcm", "data": zeros_1m, "method": 8, "crc": crc_1m, "size": 10}]))
    add("lying_crc.zip", raw_zip([{"name": "a.dcm", "data": zeros_1m, "method": 8, "crc": 1234, "size": mib}]))
    add("deflate_garbage.zip", raw_zip([{"name": "a.dcm", "data": os.urandom(4096), "method": 8, "crc": 0,
                                          "size": 100_000}]))
    add("unsupported_method.zip", raw_zip([{"name": "a.dcm", "data": b"xx", "method": 99, "size": 2}]))
    add("deflate64_method.zip", raw_zip([{"name": "a.dcm", "data": b"xx", "method": 9, "size": 2}]))
    add("encrypted.zip", raw_zip([{"name": "a.dcm", "data": b"xx", "flags": 0x801}]))

    # Escapes and links.
    for i, evil in enumerate(["../evil.dcm", "../../../../tmp/evil.dcm", "/tmp/evil.dcm", "C:/evil.dcm",
                              "..\\..\\evil.dcm", "series/../../evil.dcm", "a/./../../evil.dcm"]):
        add(f"slip_{i}.zip", zf({**series_members, evil: b"x"}))
    add("symlink.zip", raw_zip([{"name": "IM0001.dcm", "data": b"/etc/passwd",
                                 "external_attr": (0o120777 << 16)}]))

    # Names the file system cannot take, and conflicts.
    add("name_too_long.zip", zf({"x" * 300 + ".dcm": b"x"}), expect="any")
    add("path_too_deep.zip", zf({"d/" * 2100 + "x.dcm": b"x"}), expect="any")
    add("file_dir_conflict.zip", zf({"a": b"x", "a/b.dcm": b"y"}), expect="any")
    add("dir_file_conflict.zip", zf({"a/b.dcm": b"y", "a": b"x"}), expect="any")
    add("duplicate_names.zip", raw_zip([{"name": "a.dcm", "data": b"1"}, {"name": "a.dcm", "data": b"2"}]))
    add("newline_name.zip", zf({"evil\nname.zip": zf({"x": b"y"})}), expect="any")
    add("nul_name.zip", raw_zip([{"name": "a\x00b.dcm", "data": b"x"}]), expect="any")

    # Thousands of members.
    add("thousands_tiny.zip", zf({f"t/{i:05d}.txt": b"x" for i in range(3000)}, zipfile.ZIP_STORED))
    add("thousands_tiny_dcm.zip", zf({f"t/{i:05d}.dcm": b"DICM" for i in range(3000)}, zipfile.ZIP_STORED))
    add("over_member_cap.zip", zf({f"t/{i:05d}": b"" for i in range(10_001)}, zipfile.ZIP_STORED))

    # Nesting.
    inner = zf(series_members)
    add("nested.zip", zf({"inner.zip": inner}))
    add("nested_3.zip", zf({"a.zip": zf({"b.zip": zf({"c.zip": inner})})}))
    add("nested_beside_series.zip", zf({**series_members, "more.zip": inner}), expect="ok")
    add("tar_gz_inside.zip", zf({"scan.tar.gz": gzip.compress(b"x" * 1000)}))
    add("nii_gz_inside.zip", zf({"vol.nii.gz": seeds.data("nifti")}), expect="ok")

    # Damaged content inside a valid zip.
    damaged = dict(series_members)
    damaged["series/IM0003.dcm"] = damaged["series/IM0003.dcm"][:2000]
    add("series_truncated_slice.zip", zf(damaged))  # a slice that cannot be parsed: refused (see tests)
    flipped = dict(series_members)
    flipped["series/IM0002.dcm"] = flip_bits(flipped["series/IM0002.dcm"], range(5000, 5400, 7))
    add("series_flipped_slice.zip", zf(flipped), expect="any")
    add("empty.zip", zf({}))
    add("only_junk.zip", zf({"__MACOSX/._x": b"x", ".DS_Store": b"x", "Thumbs.db": b"x"}))
    add("not_a_zip.zip", b"PK\x03\x04 definitely not a zip")
    whole = zf(series_members)
    add("truncated_central_dir.zip", whole[:-30])
    add("truncated_half.zip", whole[: len(whole) // 2])
    return cases


# ============================================================================================ mutations
# A mutation is a tuple, so hypothesis can shrink it and the benchmark can draw it from a seeded RNG:
#   ("truncate", fraction) | ("flip", positions) | ("flip_head", positions) | ("overwrite", offset, value)
#   | ("png_chunk", chunk_index, positions) | ("nifti_header", positions)   (bit positions, modulo the size)

HEAD_BYTES = 1024  # headers live here: bit flips concentrated on them reach the parsers, not just pixel data

MUTATION_KINDS = {
    "png": ("truncate", "flip", "flip_head", "overwrite", "png_chunk"),
    "png_rgb": ("truncate", "flip", "flip_head", "overwrite", "png_chunk"),
    "nifti": ("truncate", "flip", "overwrite", "nifti_header"),
    "nii": ("truncate", "flip", "flip_head", "overwrite", "nifti_header"),
}
DEFAULT_KINDS = ("truncate", "flip", "flip_head", "overwrite")


def apply_mutation(data: bytes, mutation: tuple) -> bytes:
    kind = mutation[0]
    if kind == "truncate":
        return truncate(data, mutation[1])
    if kind == "flip":
        return flip_bits(data, mutation[1])
    if kind == "flip_head":
        head = min(len(data), HEAD_BYTES) * 8
        return flip_bits(data, [p % max(head, 1) for p in mutation[1]])
    if kind == "overwrite":
        return overwrite(data, mutation[1], mutation[2])
    if kind == "png_chunk":
        return png_mutate_chunk(data, mutation[1], mutation[2])
    if kind == "nifti_header":  # the header of the decompressed volume, recompressed: reaches ITK's parser
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        mutated = flip_bits(raw[:348], mutation[1]) + raw[348:]
        return gzip.compress(mutated, 1) if data[:2] == b"\x1f\x8b" else mutated
    raise ValueError(kind)


def random_mutation(rng: Any, fmt: str) -> tuple:
    """One mutation drawn from ``rng`` (a ``random.Random``), with the same shapes hypothesis draws."""
    kind = rng.choice(MUTATION_KINDS.get(fmt, DEFAULT_KINDS))
    flips = [rng.randrange(2**24) for _ in range(rng.randint(1, 8))]
    if kind == "truncate":
        return (kind, rng.random())
    if kind == "overwrite":
        return (kind, rng.randrange(2**24), rng.choice(INTERESTING))
    if kind == "png_chunk":
        return (kind, rng.randrange(8), flips)
    if kind == "nifti_header":
        return (kind, [f % (348 * 8) for f in flips])
    return (kind, flips)


def mutation_strategy(fmt: str) -> Any:
    """A hypothesis strategy of mutations for seed format ``fmt``."""
    from hypothesis import strategies as st

    positions = st.lists(st.integers(0, 2**24), min_size=1, max_size=8)
    options = {
        "truncate": st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
        "flip": st.tuples(st.just("flip"), positions),
        "flip_head": st.tuples(st.just("flip_head"), positions),
        "overwrite": st.tuples(st.just("overwrite"), st.integers(0, 2**24), st.sampled_from(INTERESTING)),
        "png_chunk": st.tuples(st.just("png_chunk"), st.integers(0, 7), positions),
        "nifti_header": st.tuples(st.just("nifti_header"), st.lists(st.integers(0, 348 * 8 - 1), min_size=1,
                                                                    max_size=6)),
    }
    return st.one_of(*(options[k] for k in MUTATION_KINDS.get(fmt, DEFAULT_KINDS)))


# Seed key -> (file suffix of the mutated copy, readers to try).
FUZZ_TARGETS = {
    "png": (".png", ("read_scan", "read_mask")),
    "png_rgb": (".png", ("read_scan",)),
    "jpg": (".jpg", ("read_scan",)),
    "tiff": (".tif", ("read_scan", "read_mask")),
    "tiff_lzw": (".tif", ("read_scan",)),
    "tiff_float": (".tif", ("read_scan",)),
    "nifti": (".nii.gz", ("read_scan", "read_mask")),
    "nii": (".nii", ("read_scan",)),
    "nrrd": (".nrrd", ("read_scan",)),
    "mha": (".mha", ("read_scan",)),
    "dicom": (".dcm", ("read_scan", "list_dicom_series")),
    "dicom_raw": (".dcm", ("read_scan",)),
}
# Table rows: which format a seed counts for.
FORMAT_OF = {"png": "png", "png_rgb": "png", "jpg": "jpg", "tiff": "tiff", "tiff_lzw": "tiff", "tiff_float": "tiff",
             "nifti": "nifti", "nii": "nifti", "nrrd": "nrrd", "mha": "mha", "dicom": "dicom",
             "dicom_raw": "dicom", "dicom_series": "dicom", "zip": "zip"}


def write_mutant(seeds: Seeds, key: str, mutation: tuple, folder: Path, tag: str) -> Path:
    suffix = FUZZ_TARGETS[key][0]
    return _write(folder, f"{key}_{tag}{suffix}", apply_mutation(seeds.data(key), mutation))


def write_series_mutant(seeds: Seeds, mutation: tuple, slice_index: int, folder: Path, tag: str,
                        as_zip: bool) -> Path:
    """The 6-slice series with one slice mutated, as a folder or a zip."""
    files = sorted(seeds["dicom_series"].glob("*.dcm"))
    members = {f.name: f.read_bytes() for f in files}
    victim = files[slice_index % len(files)].name
    members[victim] = apply_mutation(members[victim], mutation)
    if as_zip:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for n, d in members.items():
                z.writestr(f"series/{n}", d)
        return _write(folder, f"series_{tag}.zip", buf.getvalue())
    dest = folder / f"series_{tag}"
    for n, d in members.items():
        _write(dest, n, d)
    return dest


def write_zip_mutant(seeds: Seeds, mutation: tuple, folder: Path, tag: str) -> Path:
    """The zipped series with its bytes (headers, central directory, deflate streams) mutated."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(seeds["dicom_series"].glob("*.dcm"))[:3]:
            z.writestr(f"series/{f.name}", f.read_bytes())
    data = buf.getvalue()
    if mutation[0] == "flip_head":  # aim at the central directory at the end instead
        tail = min(len(data), HEAD_BYTES)
        buf2 = bytearray(data)
        for p in mutation[1]:
            byte, bit = divmod(p % (tail * 8), 8)
            buf2[len(data) - tail + byte] ^= 1 << bit
        mutated = bytes(buf2)
    else:
        mutated = apply_mutation(data, mutation)
    return _write(folder, f"zip_{tag}.zip", mutated)


def write_identified_series(seeds: Seeds, dest: Path, identifiers: dict[str, str]) -> Path:
    """The 6-slice CT series (real data, cropped) with patient attributes set to ``identifiers``
    (keyword -> value), as a folder ``dest`` of ``IM000n.dcm`` files."""
    import pydicom

    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted(seeds["dicom_series"].glob("*.dcm")):
        ds = pydicom.dcmread(src)
        for keyword, value in identifiers.items():
            setattr(ds, keyword, value)
        ds.save_as(dest / src.name, enforce_file_format=True)
    return dest


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f"{prefix}{f.relative_to(folder)}")
    return archive


def run_cases(worker: ReaderWorker, cases: Iterable[Case]) -> list[tuple[Case, Outcome]]:
    return [(c, worker.run(c.reader, c.path, c.name, **c.kwargs)) for c in cases]


def expectation_problem(case: Case, outcome: Outcome) -> str | None:
    """Why ``outcome`` is not acceptable for ``case`` (failures always; a wrong kind of answer where the
    case states one)."""
    if outcome.failed:
        return str(outcome)
    if case.expect != "any" and outcome.verdict != case.expect:
        return f"{outcome} (expected {case.expect})"
    if case.message and outcome.verdict == "error" and case.message not in outcome.message:
        return f"{outcome} (expected the reason {case.message!r})"
    return None


if __name__ == "__main__" and "--worker" in sys.argv:
    worker_main()


# ============================================================================================ privacy

IDENTIFIERS = {
    "PatientName": "Zqxwv^Privacyname",
    "PatientID": "PID7Q93817",
    "PatientBirthDate": "19330517",
    "OtherPatientIDs": "OPID55X1QZ",
    "PatientAddress": "17 Qwertzgasse Zzyzxville",
    "AccessionNumber": "ACC8812ZQW",
    "ReferringPhysicianName": "Drqqk^Refphysician",
    "InstitutionName": "Sanatorium Xyzzyplugh",
}
# What must never appear: every value, the parts of person names, and the birth date as people write it.
NEEDLES = sorted({
    *IDENTIFIERS.values(), "Zqxwv", "Privacyname", "Drqqk", "Refphysician", "Qwertzgasse", "Xyzzyplugh",
    "1933-05-17", "17.05.1933", "05/17/1933", "PID7Q93817".lower(),
})  # fmt: skip


def _blobs(path: Path) -> list[bytes]:
    """The bytes of a file as stored and as decoded (gzip members, zip/npz members, PNG text chunks)."""
    data = path.read_bytes()
    blobs = [data]
    if data[:2] == b"\x1f\x8b":
        blobs.append(gzip.decompress(data))
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            blobs += [zf.read(n) for n in zf.namelist()] + [n.encode() for n in zf.namelist()]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        from PIL import Image

        with Image.open(path) as im:
            blobs.append(repr(im.info).encode())
    return blobs


def find_identifiers(text_or_bytes: str | bytes) -> list[str]:
    hay = text_or_bytes if isinstance(text_or_bytes, bytes) else text_or_bytes.encode("utf-8", "replace")
    hay = hay.lower()
    return [n for n in NEEDLES if n.lower().encode() in hay]


def scan_tree(root: Path, skip_dicom: bool = False) -> list[str]:
    """Identifier hits in the names and contents of every file under ``root``."""
    hits = []
    for p in sorted(root.rglob("*")):
        for found in find_identifiers(str(p.relative_to(root))):
            hits.append(f"file name {p.relative_to(root)}: {found}")
        if p.is_file() and not (skip_dicom and p.read_bytes()[128:132] == b"DICM"):
            for blob in _blobs(p):
                for found in find_identifiers(blob):
                    hits.append(f"{p.relative_to(root)}: {found}")
    return hits


# ============================================================================================ killed writers


class WriterChild:
    """crash_child.py KIND OUT [HOOK], with its stdout lines readable as they come."""

    def __init__(self, kind: str, out: Path, hook: str = "none", env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(HERE / "crash_child.py"), kind, str(out), hook],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.done = -1

    def wait_for(self, prefix: str, timeout: float = 240) -> str:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    break
                line = self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"child exited: {self.proc.wait()} {self.proc.stderr.read()[-2000:]}")
                if line.startswith("DONE"):
                    self.done = int(line.split()[1])
                if line.startswith(prefix):
                    return line
        finally:
            sel.close()
        raise AssertionError(f"child printed no {prefix!r} within {timeout} s")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for line in self.proc.stdout.read().splitlines():  # what it printed before it died
            if line.startswith("DONE"):
                self.done = int(line.split()[1])
        self.proc.stdout.close()
        self.proc.stderr.close()


# ============================================================================================ crash-resume training

TRAIN_ARGS = ["--epochs", "4", "--limit-cases", "8", "--set", "data.patch_size=[64, 64]", "--set",
              "train.batch_size=4", "--set", "model.pretrained=none", "--set", "data.folds=4", "--set",
              "train.deterministic=true", "--set", "train.samples_per_epoch=16", "--set", "data.num_workers=0"]
KILL_POINTS = ("mid_epoch", "checkpoint_write", "after_checkpoint", "bundle_write")


@dataclass
class TrainCampaign:
    """``medseg train`` runs SIGKILLed at chosen moments and resumed with ``--resume`` until one finishes."""

    out: Path
    kills: list[str] = field(default_factory=list)  # what was happening when each kill landed
    resumes: int = 0
    data_lost: list[str] = field(default_factory=list)  # a checkpoint or bundle on disk that did not load
    log: list[str] = field(default_factory=list)


def _train_cmd(out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "medseg.cli", "train", str(REPO / "configs/experiments/demo_nuclei.yaml"),
            "--out", str(out), *TRAIN_ARGS, *(["--resume"] if resume else [])]


def _train_env(tmpdir: Path) -> dict[str, str]:
    tmpdir.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}


def run_train(out: Path, tmpdir: Path, resume: bool = False, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(_train_cmd(out, resume), capture_output=True, text=True, env=_train_env(tmpdir),
                          timeout=timeout, cwd=REPO)


def check_saved_state(out: Path) -> list[str]:
    """Problems with what a killed run left: every checkpoint must load, a bundle present must load."""
    import torch

    from medseg.bundle import load_bundle
    from medseg.errors import MedsegError

    problems = []
    for ckpt in sorted((out / "checkpoints").glob("*.ckpt")) if (out / "checkpoints").is_dir() else []:
        try:
            torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a half-written checkpoint is data loss
            problems.append(f"{ckpt.name}: {type(e).__name__}: {str(e)[:200]}")
    if (out / "bundle").exists() or (out / ".bundle.old").exists():
        try:
            load_bundle(out / "bundle").load_members()
        except MedsegError as e:
            problems.append(f"bundle: {e}")
    return problems


def _wait_for_kill_point(proc: subprocess.Popen, point: str, out: Path, tmpdir: Path, rng: Any,
                         timeout: float) -> str:
    """Block until ``point`` is reached (or the run ends); return what was happening."""
    ckpt = out / "checkpoints" / "last.ckpt"
    start = time.monotonic()
    mtime0 = ckpt.stat().st_mtime_ns if ckpt.exists() else None
    staged0 = set(tmpdir.iterdir())
    fit_started = ckpt_seen = kill_at = None
    while proc.poll() is None and time.monotonic() - start < timeout:
        now = time.monotonic()
        if point == "mid_epoch":
            # The first checkpoint ends an epoch; the time since fit started (CSVLogger makes logs/ then) is
            # one epoch. Kill 20-60% into the next epoch's training.
            if fit_started is None and (out / "logs").exists():
                fit_started = now
            if ckpt_seen is None and ckpt.exists() and ckpt.stat().st_mtime_ns != mtime0:
                ckpt_seen = now
                kill_at = now + rng.uniform(0.2, 0.6) * (now - (fit_started or start))
            if kill_at is not None and now >= kill_at:
                return f"mid-epoch ({now - ckpt_seen:.1f} s after a checkpoint)"
        if point == "checkpoint_write" and (set(tmpdir.iterdir()) - staged0 or _checkpoint_temp_files(out)):
            return "while a checkpoint was being written (its temporary file had just appeared)"
        if point == "after_checkpoint" and ckpt.exists() and ckpt.stat().st_mtime_ns != mtime0:
            return "right after last.ckpt was replaced"
        if point == "bundle_write" and any(p.name.startswith(".bundle.") for p in out.iterdir()):
            return "while the bundle was being written"
        time.sleep(0.002)
    return "the run ended before the kill point" if proc.poll() is not None else "timeout"


def _checkpoint_temp_files(out: Path) -> list[Path]:
    """A checkpoint being written: the engine's CheckpointIO writes ``.<name>.tmp-<pid>`` beside it."""
    folder = out / "checkpoints"
    return list(folder.glob(".*.tmp-*")) if folder.is_dir() else []


def _checkpoint_position(out: Path) -> str:
    """Where a resume would start: the epoch/step held by last.ckpt (what the next --resume continues from)."""
    import torch

    last = out / "checkpoints" / "last.ckpt"
    if not last.exists():
        return "no last.ckpt yet (the next run starts afresh)"
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - reported as data loss by check_saved_state
        return f"last.ckpt unreadable ({type(e).__name__})"
    return f"last.ckpt held epoch {state.get('epoch')} (global step {state.get('global_step')})"


def crash_resume_campaign(out: Path, tmpdir: Path, points: Iterable[str] = KILL_POINTS, seed: int = 0,
                          timeout: float = 1800) -> TrainCampaign:
    """Kill ``medseg train`` once at each of ``points``, resuming after every kill, then let it finish."""
    import random

    rng = random.Random(seed)
    campaign = TrainCampaign(out)
    resume = False
    for point in points:
        proc = subprocess.Popen(_train_cmd(out, resume), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=_train_env(tmpdir), cwd=REPO, start_new_session=True)
        what = _wait_for_kill_point(proc, point, out, tmpdir, rng, timeout)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            campaign.kills.append(f"{what}; {_checkpoint_position(out)}")
        else:
            err = proc.stderr.read() if proc.stderr else ""
            campaign.log.append(f"{point}: {what} (exit {proc.returncode}) {err[-500:]}")
        if proc.stderr:
            proc.stderr.close()
        campaign.data_lost += [f"after kill at {what}: {p}" for p in check_saved_state(out)]
        campaign.resumes += int(resume)
        resume = True
    final = run_train(out, tmpdir, resume=True, timeout=timeout)
    campaign.resumes += 1
    campaign.log.append(f"final run: exit {final.returncode}: {(final.stdout + final.stderr)[-1500:]}")
    campaign.data_lost += [f"final: {p}" for p in check_saved_state(out)]
    if (out / "metrics.csv").exists():
        campaign.data_lost += [f"metrics.csv: the numbers of epoch {e} were lost (NaN row)"
                               for e, d in val_dice_by_epoch(out).items() if d != d]
    return campaign


def val_dice_by_epoch(out: Path) -> dict[int, float]:
    import csv

    with open(out / "metrics.csv") as f:
        return {int(float(r["epoch"])): float(r["val_dice"]) for r in csv.DictReader(f)}
