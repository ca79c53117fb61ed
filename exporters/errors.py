"""Typed errors of the exporters. Each message is one line naming the problem and the fix."""


class ExportError(Exception):
    exit_code = 2

    def __str__(self) -> str:
        return " ".join(str(self.args[0]).split("\n")) if self.args else ""


class CheckpointError(ExportError):
    """The model path/id is not a loadable GPT-2 checkpoint."""


class ParityError(ExportError):
    """The exported graph disagrees with PyTorch beyond tolerance."""

    exit_code = 1

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report
