"""Progress for long work (export, parity, engine builds, many-image predict), on stderr."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")

console = Console(stderr=True, highlight=False, soft_wrap=True)


@contextmanager
def step(title: str, quiet: bool = False) -> Iterator[None]:
    """A spinner while ``title`` runs, then a tick line with its duration."""
    start = time.perf_counter()
    if quiet:
        yield
        return
    with console.status(f"{title}..."):
        yield
    console.print(f"[green]✓[/] {title} [dim]({time.perf_counter() - start:.1f} s)[/]")


def track(items: Iterable[T], title: str, total: int | None = None, quiet: bool = False) -> Iterator[T]:
    """A progress bar over ``items`` (hidden when quiet or for a single item)."""
    items = list(items) if total is None else items
    total = len(items) if total is None else total  # type: ignore[arg-type]
    if quiet or total <= 1 or not sys.stderr:
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(title, total=total)
        for item in items:
            yield item
            progress.advance(task)
