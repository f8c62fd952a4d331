"""Checks the tests themselves: applies each deliberate bug of tests/mutations.toml to a scratch
copy of the repo and runs the tests that should notice it. A mutation the tests pass is MISSED.

    python scripts/mutation_check.py                      # every mutation, its listed tests
    python scripts/mutation_check.py --only=rope-interleaved,wd-everything
    python scripts/mutation_check.py --full               # the whole suite for each (slow)
    python scripts/mutation_check.py --report=docs/mutation_report.md

Each entry names a source file, an exact `find` text (it must occur exactly once) and its
`replace`, and the pytest targets that guard it. First the targets run on the unchanged copy
and must pass, so a failure afterwards is the mutation's doing. Exit status: 0 when every
mutation is caught, 1 when any is missed, 2 when the list or the baseline is broken.
Add an entry for every bug a review or a user finds, with the test that now catches it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIST = REPO / "tests" / "mutations.toml"


@dataclasses.dataclass(frozen=True)
class Mutation:
    id: str
    what: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]


@dataclasses.dataclass
class Outcome:
    mutation: Mutation
    caught: bool
    seconds: float
    detail: str  # the failing test ids, or pytest's last line


def load_mutations(path: Path = LIST) -> list[Mutation]:
    """Reads and checks the list: unique ids, every find text present exactly once."""
    entries = tomllib.loads(path.read_text(encoding="utf-8")).get("mutation", [])
    out, seen = [], set()
    for i, e in enumerate(entries):
        missing = {"id", "what", "file", "find", "replace", "tests"} - set(e)
        if missing:
            raise ValueError(f"{path}: entry {i} lacks {sorted(missing)}")
        if e["id"] in seen:
            raise ValueError(f"{path}: duplicate id {e['id']!r}")
        seen.add(e["id"])
        source = (REPO / e["file"]).read_text(encoding="utf-8")
        count = source.count(e["find"])
        if count != 1:
            raise ValueError(
                f"{path}: mutation {e['id']!r}: its find text occurs {count} times in {e['file']} "
                "(must be exactly once); the code moved on: update the entry"
            )
        if e["find"] == e["replace"]:
            raise ValueError(f"{path}: mutation {e['id']!r} changes nothing")
        out.append(Mutation(e["id"], e["what"].strip(), e["file"], e["find"], e["replace"],
                            tuple(e["tests"])))
    return out


def scratch_copy(dest: Path) -> None:
    """The tracked files and the untracked ones git does not ignore (the working tree's state)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_pytest(copy: Path, targets: list[str], workers: int) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-rf", *targets]
    if workers > 1:
        cmd[cmd.index("-x")] = f"-n{workers}"  # xdist and -x: let every target report instead
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    # "FAILED tests/f.py::name[param] - message"; a param may itself hold spaces
    failed = sorted({ln.split(" ", 1)[1].split(" - ", 1)[0] for ln in lines
                     if ln.startswith(("FAILED ", "ERROR "))})
    if failed:  # the first failing test, named without its folder, and how many more failed
        detail = failed[0].removeprefix("tests/") + (f" (+{len(failed) - 1} more)" if len(failed) > 1 else "")
    else:
        detail = lines[-1] if lines else proc.stderr[-300:]
    return proc.returncode, detail, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated mutation ids (default: all)")
    ap.add_argument("--full", action="store_true", help="run the whole suite for every mutation")
    ap.add_argument("--workers", type=int, default=2, help="pytest-xdist workers per run")
    ap.add_argument("--report", default="", help="also write the markdown table to this file")
    args = ap.parse_args()

    try:
        mutations = load_mutations()
    except (ValueError, OSError, tomllib.TOMLDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {m.id for m in mutations}
        if unknown:
            print(f"error: unknown mutation ids {sorted(unknown)}; see {LIST}", file=sys.stderr)
            return 2
        mutations = [m for m in mutations if m.id in wanted]

    os.environ.setdefault("NANOJAX_TEST_TEXT", str(REPO.parent / "shared/data/tinyshakespeare.txt"))
    with tempfile.TemporaryDirectory(prefix="nanojax-mutants-") as tmp:
        copy = Path(tmp)
        scratch_copy(copy)
        targets_of = lambda m: ["tests"] if args.full else list(m.tests)  # noqa: E731
        baseline = sorted({t for m in mutations for t in targets_of(m)})
        print(f"baseline: {len(baseline)} targets on the unchanged copy ...", flush=True)
        rc, detail, secs = run_pytest(copy, baseline, args.workers)
        if rc != 0:
            print(f"error: the targets fail without any mutation ({detail}); fix the suite first",
                  file=sys.stderr)
            return 2
        print(f"baseline passed in {secs:.0f} s", flush=True)

        outcomes = []
        for m in mutations:
            path = copy / m.file
            original = path.read_text(encoding="utf-8")
            path.write_text(original.replace(m.find, m.replace), encoding="utf-8")
            try:
                rc, detail, secs = run_pytest(copy, targets_of(m), args.workers)
            finally:
                path.write_text(original, encoding="utf-8")
            # pytest: 1 = tests failed, 2/3 = interrupted/internal error (an import broke): caught.
            outcome = Outcome(m, caught=rc != 0, seconds=secs, detail=detail)
            outcomes.append(outcome)
            print(f"{'caught' if outcome.caught else 'MISSED'}  {m.id}  ({secs:.0f} s)  {detail}",
                  flush=True)

    table = report(outcomes, full=args.full)
    print("\n" + table)
    if args.report:
        Path(args.report).write_text(table + "\n", encoding="utf-8")
    return 0 if all(o.caught for o in outcomes) else 1


def report(outcomes: list[Outcome], full: bool) -> str:
    caught = sum(o.caught for o in outcomes)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    head = [
        f"Mutation check, {datetime.date.today()}, {cpu}, {os.cpu_count()} CPUs, "
        f"{'whole suite' if full else 'listed tests'} per mutation: **{caught} of {len(outcomes)} caught**",
        "",
        "| mutation | deliberate bug | result | caught by | s |",
        "|---|---|---|---|---:|",
    ]
    rows = [
        f"| `{o.mutation.id}` | {o.mutation.what} | {'caught' if o.caught else '**MISSED**'} | "
        f"{o.detail.replace('|', '/') if o.caught else ''} | {o.seconds:.0f} |"
        for o in outcomes
    ]
    return "\n".join(head + rows)


if __name__ == "__main__":
    sys.exit(main())
