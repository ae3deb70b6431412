"""The `adl` command line: thin typer commands mapping flags onto a frozen config, then run_*(cfg).

Defaults live in the config dataclasses, not here. Every user mistake is an AdlError, printed
as one line on stderr with exit code 2.
"""

from __future__ import annotations

import functools

import typer
from rich.console import Console

from adl.errors import AdlError

app = typer.Typer(
    help="Side tasks on a frozen transformer: cache hidden states once, train layer-mixing heads from the cache.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
err = Console(stderr=True)


def user_errors(fn):
    """Turn AdlError into one red line + exit 2, and Ctrl-C into a resume hint + exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AdlError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: finished work is saved; rerun the same command to resume")
            raise typer.Exit(130) from None

    return wrapper


def split_list(value: str | None) -> list[str] | None:
    """'a,b, c' -> ['a', 'b', 'c']; None stays None."""
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


# ---- stage one: extract, info ------------------------------------------------------
# (commands added below)


# ---- stage two: train, baselines ---------------------------------------------------
# (commands added below)


# ---- sweeps ---------------------------------------------------------------------------
# (commands added below)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
