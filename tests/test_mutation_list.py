"""`make mutate` keeps up with the code: every listed mutation's snippet occurs exactly once in its file, and every test
it names exists (a refactor that moves a line or renames a test would otherwise only show when someone runs it)."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import mutate  # noqa: E402


def test_every_snippet_matches_once():
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "mutate.py"), "--check"], capture_output=True,
                         text=True, cwd=str(REPO))
    assert run.returncode == 0 and "all match once" in run.stdout, run.stdout + run.stderr


def test_every_named_test_exists():
    missing = []
    for mid, _path, _old, _new, tests in mutate.MUTANTS:
        args = iter(tests)
        for t in args:
            if t.startswith("-"):  # pytest options such as -k EXPR
                if t in ("-k", "-m"):
                    next(args, None)
                continue
            file, _, name = t.partition("::")
            src = REPO / file
            if not src.is_file():
                missing.append((mid, t))
            elif name and not re.search(rf"^def {re.escape(name.split('[')[0])}\(", src.read_text(), re.M):
                missing.append((mid, t))
    assert not missing, missing


def test_every_mutation_changes_something_and_ids_are_unique():
    same = [mid for mid, _path, old, new, _tests in mutate.MUTANTS if old == new]
    assert not same, f"mutations that change nothing: {same}"
    ids = [m[0] for m in mutate.MUTANTS]
    assert len(ids) == len(set(ids)), "mutation ids must be unique (--only selects by id)"
