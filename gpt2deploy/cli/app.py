"""The Typer application and the error boundary shared by every command."""

from __future__ import annotations

import functools
import sys

import typer
from typer.core import TyperGroup

#: Click's exception classes (Typer may vendor its own copy of Click, so they are taken from Typer's).
_clickx = sys.modules[typer.BadParameter.__module__]


class _OneLineErrors(TyperGroup):
    """Click's usage errors (unknown option, bad value) as one ``error:`` line and a hint to --help, exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        global _reported
        _reported = False
        prog_name = prog_name or "gpt2deploy"
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rc = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _clickx.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except _clickx.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "gpt2deploy"
            message = " ".join(e.format_message().split()).rstrip(".")
            typer.echo(_printable(f"error: {message}; see '{where} --help'"), err=True)
            sys.exit(2)
        except _clickx.ClickException as e:
            typer.echo(_printable(f"error: {' '.join(e.format_message().split())}"), err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        if rc == 130 and not _reported:  # Typer turns Ctrl-C outside a command body into a silent exit 130
            typer.echo("error: interrupted; nothing was written", err=True)
        sys.exit(rc if isinstance(rc, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="gpt2deploy",
    help="Export, quantize, check, package and run GPT-2-family models on ONNX Runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _known_errors() -> tuple[type[BaseException], ...]:
    from exporters.errors import ExportError
    from quant.errors import QuantError

    from ..errors import Gpt2DeployError

    return (Gpt2DeployError, ExportError, QuantError)


_reported = False  # an ``error:`` line was printed by ``fail``


def fail(message: str, code: int = 2) -> typer.Exit:
    global _reported
    _reported = True
    typer.echo(f"error: {_printable(message)}", err=True)
    return typer.Exit(code)


def command(fn):
    """Turn library errors into one line on stderr and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except BrokenPipeError:  # the reader of stdout left (e.g. `| head`): stop quietly, as streaming does
            _silence_stdout()
            raise typer.Exit(0) from None
        except _known_errors() as e:
            raise fail(str(e), getattr(e, "exit_code", 2)) from None
        except KeyboardInterrupt:
            raise fail("interrupted; nothing was written", 130) from None
        except MemoryError:
            raise fail("out of memory; use a smaller model, batch or context", 1) from None
        except OSError as e:
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            raise fail(f"{e.strerror or e}{where}; check the path, permissions and free disk space", 1) from None

    return wrapper


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush into a closed pipe does not fail."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def output_file(path, flag: str, suffix: str | None = None, allow_stdout: bool = False):
    """Validate a file path given to an output option before any work is done; '-' is stdout when allowed."""
    import os
    from pathlib import Path

    from ..errors import UsageError

    path = Path(path)
    if allow_stdout and str(path) == "-":
        return path
    path = path.expanduser().absolute()
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; pass a file path")
    if suffix and path.suffix.lower() != suffix:
        raise UsageError(f"{flag} {path} must end with {suffix}")
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {path.parent} does not exist; create it or choose another path")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write to {path.parent}; choose a directory you can write")
    return path


def say(message: str) -> None:
    """Progress and summaries go to stderr so stdout stays for results (text, JSON)."""
    typer.echo(_printable(message), err=True)


def _printable(message: str) -> str:
    """Lone surrogates (from undecodable paths or arguments) as escapes: any stream can write the result."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"gpt2deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Export, quantize, check, package and run GPT-2-family models on ONNX Runtime."""
