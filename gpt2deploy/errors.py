"""Typed errors. Each carries a one-line message that names the problem and the fix.

The CLI turns them into that line on stderr and an exit code; the library never prints.
"""

from __future__ import annotations


class Gpt2DeployError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # keep it on one line
        return " ".join(self.message.split("\n"))


class UsageError(Gpt2DeployError):
    """A bad argument or option value."""


class PackageError(Gpt2DeployError):
    """The path is not a usable package (missing, malformed, unknown schema)."""


class IntegrityError(PackageError):
    """A package file fails its recorded sha256/size, or files are missing/unlisted."""

    exit_code = 1


class VariantError(PackageError):
    """A requested variant is absent or unusable."""


class DeviceError(Gpt2DeployError):
    """The requested execution device is unavailable."""


class GenerationError(Gpt2DeployError):
    """Generation was asked for something impossible (prompt too long, empty prompt...)."""


class RegressionError(Gpt2DeployError):
    """An accuracy gate failed."""

    exit_code = 1
