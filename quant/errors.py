"""Typed errors of the ONNX -> ONNX passes. Each message is one line naming the problem and the fix."""


class QuantError(Exception):
    exit_code = 2

    def __str__(self) -> str:
        return " ".join(str(self.args[0]).split("\n")) if self.args else ""
