"""User-facing errors: one clear line, never a traceback, from every CLI."""


class BdmError(ValueError):
    """A user mistake or a refused file; the message says what was wrong and what to do.

    A ``ValueError``, so that library callers who catch bad values catch it too; the CLIs turn only
    this (not every ``ValueError``) into one line, so a bug keeps its traceback.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's ``KeyboardInterrupt`` so that the same clean-up runs on the way out."""


def _raise_terminated(signum, frame):
    raise Terminated()


# Import names whose pip package is named differently.
PIP_NAMES = {"PIL": "Pillow", "sklearn": "scikit-learn", "onnxruntime": "onnxruntime (or onnxruntime-gpu)",
             # an unpinned torch pulls a multi-GB CUDA build: name the CPU build
             "torch": "torch==2.13.0 (the CPU build; any torch >= 2.1 with CUDA on a GPU machine)"}
OWN_PACKAGES = ("bdm_train", "bdm_export", "bdm_runtime")


def describe_import_error(e):
    """One line for an ``ImportError`` of a third-party module: what is missing and how to get it."""
    root = (e.name or "").split(".")[0]
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not root:
        return first
    pip = PIP_NAMES.get(root, root)
    if isinstance(e, ModuleNotFoundError):
        return f"missing dependency {root}: pip install {pip}"
    return f"{first} (an incompatible version of {root}? pip install -U {pip})"


def describe_os_error(e):
    """One line for an ``OSError``: ``filename: reason``."""
    if e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__


def echo_result(line, prog_name):
    """Print a command's closing summary on stdout, after its outputs are published.

    The work is done and on disk, so a stdout that cannot take the line (a pipe whose reader has gone,
    a full device) does not make the command fail: one line on stderr says so and the exit stays 0.
    stdout then points at the null device, so the interpreter's last flush cannot fail either.
    """
    import contextlib
    import os
    import sys

    import click

    try:
        click.echo(line)
    except OSError as e:
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
        with contextlib.suppress(OSError):
            click.echo(f"{prog_name}: done (outputs written), but stdout did not take the summary: "
                       f"{e.strerror or e}", err=True)


def run_cli(command, args=None, prog_name=None):
    """Run a click command: user mistakes become one ``Error: ...`` line and a non-zero exit.

    Exit codes: 1 for a refused input (``BdmError``), a missing third-party module (``ImportError``)
    or an unreadable/unwritable file (``OSError``): the user's environment, not our code; click's own
    (2) for usage errors, 130 when interrupted (Ctrl-C), 143 when terminated (SIGTERM, handled like
    Ctrl-C: temporary files are removed on the way out). Anything else is a bug and keeps its
    traceback: a plain ``ValueError``, ``TypeError``, ..., and an ``ImportError`` of bdm's own packages.
    """
    import signal
    import sys

    import click

    def fail(message, code):
        click.echo("Error: " + " ".join(str(message).split()), err=True)
        sys.exit(code)

    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave SIGTERM alone
        previous = None
    try:
        command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as e:  # click turns KeyboardInterrupt into Abort
        if isinstance(e, Terminated) or isinstance(e.__cause__, Terminated):
            fail("terminated (SIGTERM)", 143)
        fail("interrupted", 130)
    except click.ClickException as e:
        fail(e.format_message(), e.exit_code)
    except BdmError as e:
        fail(e, 1)
    except ImportError as e:
        if (e.name or "").split(".")[0] in OWN_PACKAGES:
            raise
        fail(describe_import_error(e), 1)
    except OSError as e:
        fail(describe_os_error(e), 1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
