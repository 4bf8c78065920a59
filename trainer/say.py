"""The one type for "where a line for the user goes".

The library never prints on its own: every function that tells the user something takes a
`Say` (click.echo in the CLI, `Console.info` in a run, a list's append in tests), so the
same code speaks on a console, in a log or into a test's assertions.
"""

from __future__ import annotations

from collections.abc import Callable

Say = Callable[[str], None]
