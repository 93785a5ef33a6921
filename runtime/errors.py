"""User-facing errors: one clear line, never a traceback, from every CLI."""


class BdmError(Exception):
    """A user mistake or a refused file; the message says what was wrong and what to do."""


def run_cli(command, args=None, prog_name=None):
    """Run a click command: user mistakes become one ``Error: ...`` line and a non-zero exit.

    Exit codes: 1 for a refused input (``BdmError``, ``ValueError``), click's own (2) for usage
    errors, 130 when interrupted.
    """
    import sys

    import click

    def fail(message, code):
        click.echo("Error: " + " ".join(str(message).split()), err=True)
        sys.exit(code)

    try:
        command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        fail("interrupted", 130)
    except click.ClickException as e:
        fail(e.format_message(), e.exit_code)
    except (BdmError, ValueError) as e:
        fail(e, 1)
