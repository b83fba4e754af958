import os as _os

__version__ = '0.1.0'

# ONNX Runtime (the CPU inference backend) records usage telemetry at import: a session-id file under the user's
# cache, or in TMPDIR where that is not writable. Nothing of a hospital's runs should be recorded or left behind,
# so it is off unless the operator sets the variable (tests/reliability/test_privacy.py finds the leftover file).
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
