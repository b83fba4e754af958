"""medseg's user-facing errors.

Every problem a user can cause (bad file, bad config, bad dataset) raises a `MedsegError` subclass with a
one-line message that names the file and the problem; the CLI prints it without a traceback unless --debug.
"""

from __future__ import annotations


class MedsegError(Exception):
    """Base class for errors caused by input, not by a bug in medseg."""


class ScanReadError(MedsegError):
    """A file could not be read as a scan (corrupt, unsupported, unsafe)."""


class UnsupportedFormatError(ScanReadError):
    """The file's format or dimensionality is not supported."""


class ScanTooLargeError(ScanReadError):
    """A scan's header announces more samples than the reader's cap allows (refused before decoding)."""


class UnsafeArchiveError(ScanReadError):
    """A zip archive breaks a safety cap (member count, size, ratio, path escape)."""


class DatasetError(MedsegError):
    """A dataset is empty or inconsistent (missing mask, shape mismatch, unknown label values)."""


class ConfigError(MedsegError):
    """A config file is invalid (unknown key, wrong type)."""


class BundleError(MedsegError):
    """A model bundle is missing, incomplete or unsafe."""
