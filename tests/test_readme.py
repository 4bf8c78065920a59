"""The README and docs/ stay true to the code: its config key table, test counts, links,
table of contents, `launch` commands and the files it names.

Each check is a function from text to a list of problems, tested on the real files and,
to show it can fail, on a small broken text. `python tests/test_readme.py --fix` rewrites
what is generated (the table of contents, the key table and the test counts) in place.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script, too

from launch.cli import cli  # noqa: E402
from trainer.config import describe_keys, key_table  # noqa: E402

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
TOC_START, TOC_END = "<!-- toc:start -->", "<!-- toc:end -->"
COUNTS = re.compile(
    r"<!-- test-counts -->The fast suite\s+has \*\*(\d+) tests\*\* and the slow suite \*\*(\d+) tests\*\*"
)
FIX = "python tests/test_readme.py --fix"
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w./$-])((?:configs|deploy|bench|docs|tests|trainer|launch)/[\w./-]*[\w/])")
LAUNCH = re.compile(r"(?<![\w.-])launch((?:\s+-{1,2}[a-z][\w-]*)*)\s+([a-z][\w-]*)(.*)")
GLOBAL_OPTIONS = {"-v", "--verbose", "--version", "-h", "--help"}


# --- the checks: text in, problems out ---------------------------------------------------


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every heading outside code blocks."""
    found = re.findall(r"^(#{1,6}) (.+?)\s*$", FENCE.sub("", text), re.M)
    return [(len(hashes), title) for hashes, title in found]


def anchors(text: str) -> set[str]:
    """Every heading's anchor, repeated titles numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    result = set()
    for _level, title in headings(text):
        base = slug(title)
        result.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return result


def render_toc(text: str) -> str:
    """The table of contents of `text`: its ## and ### headings, as nested links."""
    lines = [f"{'  ' * (level - 2)}- [{title}](#{slug(title)})" for level, title in headings(text) if level in (2, 3)]
    return "\n".join(lines)


def toc_problems(text: str) -> list[str]:
    start, end = text.find(TOC_START), text.find(TOC_END)
    if start < 0 or end < start:
        return [f"no {TOC_START} ... {TOC_END} around the table of contents"]
    if text[start + len(TOC_START) : end].strip("\n") != render_toc(text):
        return [f"the table of contents does not match the headings; run `{FIX}`"]
    return []


def with_toc(text: str) -> str:
    start, end = text.index(TOC_START) + len(TOC_START), text.index(TOC_END)
    return f"{text[:start]}\n{render_toc(text)}\n{text[end:]}"


def key_table_problems(text: str) -> list[str]:
    try:
        stated = key_table.table_in(text)
    except ValueError as err:
        return [str(err)]
    if stated != key_table.render_table():
        return [f"the config key table differs from trainer/config/schema.py; run `{key_table.REGENERATE}`"]
    return []


def key_detail_problems(text: str) -> list[str]:
    """Every key named in a first column of docs/config-keys.md is a key of the code."""
    known = {info.key for info in describe_keys()}
    named = re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)`", "\n".join(re.findall(r"^\| ([^|]*) \|", text, re.M)))
    return [f"docs/config-keys.md describes `{key}`, which is no config key" for key in named if key not in known]


def count_problems(text: str, fast: int, slow: int) -> list[str]:
    match = COUNTS.search(text)
    if not match:
        return ["no '<!-- test-counts -->The fast suite has **N tests** and the slow suite **M tests**' sentence"]
    stated = (int(match[1]), int(match[2]))
    if stated != (fast, slow):
        return [
            f"the README states {stated[0]} fast and {stated[1]} slow tests, pytest collects {fast} and {slow}: "
            f"run `{FIX}`"
        ]
    return []


def with_counts(text: str, fast: int, slow: int) -> str:
    match = COUNTS.search(text)
    if not match:
        return text
    return f"{text[: match.start(1)]}{fast}{text[match.end(1) : match.start(2)]}{slow}{text[match.end(2) :]}"


def link_problems(text: str, where: Path) -> list[str]:
    """Every relative link of `text` (the file `where`) reaches a file, and a heading of it."""
    problems = []
    prose = re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))
    for label, target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (where.parent / path).resolve() if path else where
        if not file.exists():
            problems.append(f"{where.name}: [{label}]({target}): no file {path}")
        elif anchor and file.suffix == ".md" and anchor not in _anchors_of(file, where, text):
            problems.append(f"{where.name}: [{label}]({target}): no heading #{anchor} in {file.name}")
    return problems


def _anchors_of(file: Path, where: Path, text: str) -> set[str]:
    return anchors(text if file == where else file.read_text(encoding="utf-8"))


def code_lines(text: str) -> list[str]:
    """The lines of code blocks (continuations joined, comments cut) and inline code spans."""
    lines = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n", " ", block)
        lines += [re.sub(r"(^|\s)#.*", "", line) for line in joined.splitlines()[1:-1]]
    lines += re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
    return lines


def command_problems(text: str, group: click.Group = cli) -> list[str]:
    """Every `launch COMMAND [SUBCOMMAND] --option` in code names a command and its options."""
    problems = []
    for line in code_lines(text):
        for part in re.split(r"&&|;|\s\|\s", line):
            for global_options, name, rest in LAUNCH.findall(part):
                problems += _invocation_problems(group, global_options.split(), name, rest)
    return problems


def _invocation_problems(group: click.Group, global_options: list[str], name: str, rest: str) -> list[str]:
    bad = [option for option in global_options if option not in GLOBAL_OPTIONS]
    command = group.commands.get(name)
    if command is None:
        return [f"`launch {name}`: no such command"] + bad
    words = rest.split()
    if isinstance(command, click.Group) and words and re.fullmatch(r"[a-z][\w-]*", words[0]):
        if words[0] not in command.commands:
            return [f"`launch {name} {words[0]}`: no such command"] + bad
        command, name = command.commands[words[0]], f"{name} {words[0]}"
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}
    options = re.findall(r"(?<![\w-])--[a-z][\w-]*", rest)
    return bad + [f"`launch {name} {option}`: no such option" for option in options if option not in known]


def path_problems(text: str) -> list[str]:
    """Every repository path named in code (configs/..., deploy/..., docs/...) exists."""
    named = {path for line in code_lines(text) for path in PATH.findall(line)}
    return [f"`{path}` does not exist" for path in sorted(named) if not (REPO / path).exists()]


def extras_problems(text: str, makefile: str) -> list[str]:
    """The extras the README says `make` installs are the Makefile's EXTRAS."""
    stated = re.search(r"`pip install -e '\.\[([\w,]+)\]'` \(the Makefile's `EXTRAS`\)", text)
    default = re.search(r"^EXTRAS \?= *(\S+)", makefile, re.M)
    if not stated or not default:
        return [
            "no \"`pip install -e '.[...]'` (the Makefile's `EXTRAS`)\" in the README, or no EXTRAS in the Makefile"
        ]
    if stated[1] != default[1]:
        return [f"the README says make installs .[{stated[1]}], the Makefile's EXTRAS is {default[1]}"]
    return []


def example_problems(text: str, example: str) -> list[str]:
    """The README's Python API example is examples/python_api.py's lines between its
    `# readme:start` and `# readme:end` markers, dedented: the code shown is the code run."""
    region = re.search(r"# readme:start[^\n]*\n(.*?)\n[ \t]*# readme:end", example, re.S)
    if not region:
        return ["examples/python_api.py has no # readme:start ... # readme:end region"]
    shown = textwrap.dedent(region[1]).strip()
    python = [block for block in FENCE.findall(text) if block.startswith("```python")]
    blocks = [block[block.index("\n") + 1 : -3].strip() for block in python]
    if shown not in blocks:
        return ["the README's Python API example is not examples/python_api.py's readme region; copy it again"]
    return []


def collected_counts() -> tuple[int, int]:
    """(fast, slow): the tests pytest collects with and without the `slow` marker."""
    script = (
        "import sys, pytest\n"
        "class Count:\n"
        "    fast = slow = 0\n"
        "    def pytest_collection_finish(self, session):\n"
        "        for item in session.items:\n"
        "            if item.get_closest_marker('slow'): self.slow += 1\n"
        "            else: self.fast += 1\n"
        "count = Count()\n"
        "code = pytest.main(['--collect-only', '-qq', '-m', '', '-p', 'no:randomly', '-p', 'no:cacheprovider',\n"
        "                    '-o', 'addopts=', 'tests'], plugins=[count])\n"
        "print(f'COUNTS {count.fast} {count.slow} {int(code)}')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    found = re.findall(r"^COUNTS (\d+) (\d+) (\d+)$", done.stdout, re.M)
    assert found and found[-1][2] == "0", f"collecting the tests failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return int(found[-1][0]), int(found[-1][1])


# --- on the real files --------------------------------------------------------------------


def _docs() -> list[tuple[Path, str]]:
    return [(path, path.read_text(encoding="utf-8")) for path in [README, *DOCS]]


def test_the_key_table_is_the_codes():
    assert key_table_problems(README.read_text(encoding="utf-8")) == []
    assert key_detail_problems((REPO / "docs" / "config-keys.md").read_text(encoding="utf-8")) == []


def test_the_test_counts_are_pytests():
    assert count_problems(README.read_text(encoding="utf-8"), *collected_counts()) == []


def test_every_relative_link_reaches_a_file_and_heading():
    assert [problem for path, text in _docs() for problem in link_problems(text, path)] == []


def test_the_table_of_contents_matches_the_headings():
    assert toc_problems(README.read_text(encoding="utf-8")) == []


def test_every_launch_command_and_option_named_exists():
    assert [problem for _path, text in _docs() for problem in command_problems(text)] == []


def test_every_file_named_exists():
    assert [problem for _path, text in _docs() for problem in path_problems(text)] == []


def test_the_extras_make_installs_are_the_makefiles():
    assert extras_problems(README.read_text(encoding="utf-8"), (REPO / "Makefile").read_text(encoding="utf-8")) == []


def test_the_python_api_example_shown_is_the_one_run():
    example = (REPO / "examples" / "python_api.py").read_text(encoding="utf-8")
    assert example_problems(README.read_text(encoding="utf-8"), example) == []


# --- each check catches what it is for ----------------------------------------------------


def test_a_stale_or_missing_key_table_is_caught():
    table = key_table.render_table()
    good = f"x\n{key_table.START}\n{table}\n{key_table.END}\n"
    assert key_table_problems(good) == []
    assert key_table_problems(good.replace("| `seed` | int | `0` |", "| `seed` | int | `1` |")) != []
    assert key_table_problems(good.replace(table.splitlines()[-1] + "\n", "")) != []
    assert key_table_problems("no markers") != []
    assert key_detail_problems("| `data.batch_size` | ok |\n| `data.batchsize` | typo |") == [
        "docs/config-keys.md describes `data.batchsize`, which is no config key"
    ]


def test_wrong_or_missing_counts_are_caught():
    text = "<!-- test-counts -->The fast suite\nhas **10 tests** and the slow suite **2 tests**."
    assert count_problems(text, 10, 2) == []
    assert count_problems(text, 11, 2) != [] and count_problems(text, 10, 3) != []
    assert count_problems("The fast suite has 10 tests.", 10, 2) != []
    assert count_problems(with_counts(text, 11, 3), 11, 3) == []


def test_broken_links_and_anchors_are_caught():
    text = "# T\n## A section\n[ok](#a-section) [ok](docs/architecture.md#architecture) `[x](nowhere.md)`\n"
    assert link_problems(text, README) == []
    assert len(link_problems(text + "[bad](#b-section) [bad](docs/none.md) [bad](docs/architecture.md#x)", README)) == 3


def test_a_toc_out_of_step_with_the_headings_is_caught():
    text = f"# T\n{TOC_START}\n- [A](#a)\n  - [B `c`](#b-c)\n{TOC_END}\n## A\n### B `c`\n```\n## not a heading\n```\n"
    assert toc_problems(text) == []
    assert toc_problems(text.replace("### B `c`", "### B")) != []
    assert toc_problems(text + "## D\n") != []
    assert toc_problems(with_toc(text + "## D\n")) == []
    assert toc_problems("## A\n") != []


def test_unknown_commands_and_options_are_caught():
    good = "`launch train --config C --dry-run`, `launch -v data show --set k=v --out x.png`"
    good += "\n```\nlaunch models --classes 5\n```"
    assert command_problems(good) == []
    assert command_problems("`launch trian --config C`") == ["`launch trian`: no such command"]
    assert command_problems("`launch data shw`") == ["`launch data shw`: no such command"]
    assert command_problems("```\nlaunch models \\\n  --clases 5   # a typo\n```") == [
        "`launch models --clases`: no such option"
    ]


def test_missing_files_are_caught():
    assert path_problems("`configs/smoke.yaml`, `docs/architecture.md`") == []
    assert path_problems("`configs/nope.yaml` and\n```\nbash deploy/nope.sh\n```") == [
        "`configs/nope.yaml` does not exist",
        "`deploy/nope.sh` does not exist",
    ]


def test_other_extras_than_the_makefiles_are_caught():
    said = "with `pip install -e '.[cpu,dev]'` (the Makefile's `EXTRAS`) first"
    assert extras_problems(said, "EXTRAS ?= cpu,dev\n") == []
    assert extras_problems(said, "EXTRAS ?= cpu,dev,export\n") != []
    assert extras_problems("`pip install -e '.[cpu]'`", "EXTRAS ?= cpu\n") != []


def test_the_anchor_of_a_heading_is_githubs():
    assert slug("Several workers on one machine: `--workers N`") == "several-workers-on-one-machine---workers-n"
    assert slug("Starting from another run's weights") == "starting-from-another-runs-weights"
    assert anchors("## A\n## A\n") == {"a", "a-1"}


def test_an_example_shown_otherwise_than_run_is_caught():
    example = "def main():\n    # readme:start\n    x = 1\n    print(x)\n    # readme:end\n"
    assert example_problems("```python\nx = 1\nprint(x)\n```\n", example) == []
    assert example_problems("```python\nx = 2\nprint(x)\n```\n", example) != []
    assert example_problems("```python\nx = 1\nprint(x)\n```\n", "x = 1\n") != []


def main(argv: list[str]) -> int:
    if argv != ["--fix"]:
        print(f"usage: {FIX}   (rewrites README.md's table of contents, key table and test counts)")
        return 2
    text = README.read_text(encoding="utf-8")
    fixed = with_counts(with_toc(key_table.with_table(text, key_table.render_table())), *collected_counts())
    README.write_text(fixed, encoding="utf-8")
    print(f"README.md: {'rewritten' if fixed != text else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
