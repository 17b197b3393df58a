"""Running a ``cxrcam`` command in this process, as the console script would.

``cxrcam demo``, the benchmark scripts and the tests run many commands in a row; each fresh
process would spend about 5 s of a 2-core machine importing torch and timm. Here the command
line group is passed in (``cxrcam.cli.main``), so that neither the CLI nor the pipeline that
drives it needs to import the other.
"""
from __future__ import annotations

import sys

import click


def run_in_process(cli: click.Command, args: list[str]) -> int:
    """Run ``cli ARGS`` here and return its exit status: a user error prints its ``Error:`` line;
    anything else raises. torch's global settings (deterministic algorithms, cuDNN benchmark) are
    put back afterwards, so that one command does not leak them into the next."""

    def flags():
        torch = sys.modules.get("torch")
        return ((torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                 torch.backends.cudnn.benchmark) if torch else (False, False, False))

    saved = flags()
    try:
        code = cli.main(list(args), prog_name="cxrcam", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        code = 1
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and flags() != saved:
            torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
            torch.backends.cudnn.benchmark = saved[2]
    return code if isinstance(code, int) else 0


__all__ = ["run_in_process"]
