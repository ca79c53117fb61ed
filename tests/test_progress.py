"""The long commands' progress display: rich's live display on a terminal, plain step lines otherwise."""

from __future__ import annotations

import io

from gpt2deploy.cli.progress import CommandProgress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_a_live_display_with_the_messages():
    term = _Terminal()
    with CommandProgress("[check]", stream=term) as p:
        assert p.live
        p.message("checking int8 against fp32")
        for done in range(5):
            p.step(done, 4, f"int8 window {done}")
    out = term.getvalue()
    assert "[check] checking int8 against fp32" in out
    assert "int8 window" in out and "4/4" in out  # the counted bar was drawn


def test_without_a_terminal_only_plain_step_lines(capsys):
    stream = io.StringIO()
    with CommandProgress("[quantize int8]", stream=stream) as p:
        assert not p.live
        p.message("saving onnx/model_int8.onnx")
        p.step(1, 2, "window 1")
    err = capsys.readouterr().err
    assert err == "[quantize int8] saving onnx/model_int8.onnx\n"
    assert stream.getvalue() == ""
