"""python -m src.report DIR [DIR ...] [--out OUT] [--wandb {off,offline,online}]"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .write import write_report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m src.report",
        description="records -> results table, verdicts, figures, report.md",
    )
    ap.add_argument("dirs", nargs="+", help="directories searched for record.json")
    ap.add_argument("--out", default=None, help="output directory (default: the first dir)")
    ap.add_argument("--wandb", choices=("off", "offline", "online"), default="off")
    args = ap.parse_args(argv)
    from rich.console import Console

    console = Console(highlight=False)
    try:
        md = write_report(args.dirs, args.out, wandb=args.wandb, console=console)
    except FileNotFoundError as e:
        console.print(f"[red]{e}[/]")
        return 2
    console.print(f"[bold green]report:[/] {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
