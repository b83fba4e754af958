"""Coverage-guided fuzzing of ``medseg.io.read_scan`` with atheris (libFuzzer for Python).

    .venv/bin/python tests/reliability/atheris_readers.py CORPUS_DIR [-runs=N] [-max_total_time=S] [libFuzzer flags]

An input's first byte picks the file type (``SUFFIXES``), the rest is the file's content. medseg, Pillow and
pydicom are instrumented, so mutations that reach new Python branches are kept. A ``MedsegError`` whose message
is one line naming the file is the expected answer to bad input; any other exception, a bad message, a hang
(``-timeout``) or too much memory (``-rss_limit_mb``) is a finding: libFuzzer stops and writes the input to
``crash-*``/``timeout-*``/``oom-*``. ``write_corpus`` turns seed files into a starting corpus.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

SUFFIXES = (".png", ".jpg", ".tif", ".nii.gz", ".nii", ".nrrd", ".mha", ".dcm", ".zip")


def write_corpus(files: dict[str, Path], corpus: Path) -> Path:
    """``files``: suffix -> a seed file of that type; writes one corpus entry per seed."""
    corpus.mkdir(parents=True, exist_ok=True)
    for suffix, path in files.items():
        (corpus / f"seed{suffix.replace('.', '_')}").write_bytes(bytes([SUFFIXES.index(suffix)]) + path.read_bytes())
    return corpus


def main() -> None:
    import atheris

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    with atheris.instrument_imports(include=["medseg", "PIL", "pydicom"]):
        import medseg.io
        from medseg.errors import MedsegError
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    warnings.simplefilter("ignore")
    # In the working directory, not /tmp: libFuzzer ends the process with exit(), so no cleanup code runs.
    work = Path(tempfile.mkdtemp(prefix="medseg-atheris-", dir=os.getcwd()))

    def test_one_input(data: bytes) -> None:
        if len(data) < 2:
            return
        path = work / f"input{SUFFIXES[data[0] % len(SUFFIXES)]}"
        path.write_bytes(data[1:])
        try:
            medseg.io.read_scan(path)
        except MedsegError as e:
            message = str(e).strip()
            if path.name not in message or "\n" in message or str(work) in message:
                raise AssertionError(f"bad error message: {message!r}") from None
        finally:
            path.unlink(missing_ok=True)

    atheris.Setup(sys.argv, test_one_input)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    atheris.Fuzz()


if __name__ == "__main__":
    main()
