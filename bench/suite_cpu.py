"""Where the test suites' CPU goes: each test's CPU seconds, its own and its subprocesses'.

The suites are CPU-bound on 2 cores (`make test` keeps ~190% busy), so their wall time
follows the CPU they burn, not the wall each test reports in `--durations`: a test that
waits on a store or a peer is cheap there, one that starts six `launch` processes is not.

As a pytest plugin, it appends one line per test to the file named by $SUITE_CPU:
`self_s <TAB> children_s <TAB> wall_s <TAB> node id` (children: the subprocesses the test
started and reaped; a fixture's work counts in the first test that asked for it):

    SUITE_CPU=/tmp/fast.tsv PYTHONPATH=. .venv/bin/python -m pytest -n 3 -p bench.suite_cpu
    SUITE_CPU=/tmp/slow.tsv PYTHONPATH=. .venv/bin/python -m pytest -n 3 -m slow -p bench.suite_cpu

As a script, it ranks what those runs wrote, tests and files:

    .venv/bin/python bench/suite_cpu.py /tmp/fast.tsv [--top 30]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def _cpu_seconds() -> tuple[float, float]:
    """(this process, its reaped children): user + system seconds."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to run without $SUITE_CPU rather than fail every test at its end."""
    if not os.environ.get("SUITE_CPU"):
        raise pytest.UsageError("-p bench.suite_cpu needs SUITE_CPU=<file to append each test's CPU seconds to>")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Setup, call and teardown of `item`, measured around; one line appended to $SUITE_CPU."""
    own_before, children_before = _cpu_seconds()
    started = time.monotonic()
    yield
    own_after, children_after = _cpu_seconds()
    line = (
        f"{own_after - own_before:.2f}\t{children_after - children_before:.2f}\t"
        f"{time.monotonic() - started:.2f}\t{item.nodeid}\n"
    )
    with open(os.environ["SUITE_CPU"], "a", encoding="utf-8") as out:  # one short append per test
        out.write(line)


@dataclass(frozen=True)
class CpuOfTest:
    own: float
    children: float
    wall: float
    node: str

    @property
    def total(self) -> float:
        return self.own + self.children

    @property
    def file(self) -> str:
        return self.node.split("::", 1)[0]


def read(path: Path) -> list[CpuOfTest]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        own, children, wall, node = line.split("\t", 3)
        rows.append(CpuOfTest(float(own), float(children), float(wall), node))
    return rows


def report(rows: list[CpuOfTest], top: int) -> str:
    """The totals, the `top` tests by CPU and every file by CPU."""
    own, children = sum(r.own for r in rows), sum(r.children for r in rows)
    lines = [f"{len(rows)} tests: {own + children:.0f} CPU-s ({own:.0f} in pytest, {children:.0f} in subprocesses)"]
    lines.append(f"\n{'CPU-s':>7} {'own':>6} {'subpr':>6} {'wall':>6}  test")
    for r in sorted(rows, key=lambda r: r.total, reverse=True)[:top]:
        lines.append(f"{r.total:7.1f} {r.own:6.1f} {r.children:6.1f} {r.wall:6.1f}  {r.node}")
    per_file: dict[str, list[CpuOfTest]] = defaultdict(list)
    for r in rows:
        per_file[r.file].append(r)
    lines.append(f"\n{'CPU-s':>7} {'tests':>5}  file")
    for name, tests in sorted(per_file.items(), key=lambda item: -sum(r.total for r in item[1])):
        lines.append(f"{sum(r.total for r in tests):7.1f} {len(tests):5d}  {name}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tsv", type=Path, help="a file the plugin wrote ($SUITE_CPU)")
    parser.add_argument("--top", type=int, default=30, help="tests to list (default 30)")
    args = parser.parse_args()
    print(report(read(args.tsv), args.top))


if __name__ == "__main__":
    main()
