"""The course kit is honest (nanoalign/assignment.py). For every chapter its grading tests pass on
the reference and every one of them fails on a copy with all chapters blanked, on the blank of one
of its own chapter's functions; `-m chapterN` selects exactly the table's tests; no line of a
blanked body is left anywhere in the copy; pasting the reference back restores it byte for byte;
and every seeded bug (tests/test_mutations.py) in a blanked function is caught by that chapter's
graders. The two grading runs are subprocesses, as a student runs them, in parallel."""

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from nanoalign import assignment
from nanoalign.assignment import CHAPTERS, expand

ROOT = Path(__file__).resolve().parents[1]
CHAPTER_IDS = [f"chapter{c}" for c in CHAPTERS]
EVERY_CHAPTER = " or ".join(CHAPTER_IDS)


def functions(chapter):
    return expand(CHAPTERS[chapter][2])


def graded(chapter):
    return expand(CHAPTERS[chapter][3])


def body_lines(text: str, name: str) -> list[str]:
    """The stripped code lines of a function after its docstring: the solution."""
    _, header, last = assignment.span(assignment.find_function(ast.parse(text), name))
    lines = [line.strip() for line in text.splitlines()[header:last]]
    return [line for line in lines if line and not line.startswith("#")]


def outcomes(junit: Path) -> dict[str, list[tuple[str, str]]]:
    """{"test_file.py::test_name": [(passed | failed | error | skipped, message) per test case]}."""
    found = {}
    for case in ET.parse(junit).iter("testcase"):
        key = f"{case.get('classname').split('.')[-1]}.py::{case.get('name').split('[')[0]}"
        kind = next((k for k in ("failure", "error", "skipped") if case.find(k) is not None), None)
        message = "" if kind is None else (case.find(kind).get("message") or "")
        found.setdefault(key, []).append(({"failure": "failed", None: "passed"}.get(kind, kind),
                                          message))
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The graders of every chapter run by `python -m pytest -m "chapter1 or ..."` twice at once:
    in the reference and in a copy with every chapter blanked."""
    base = tmp_path_factory.mktemp("kit")
    copy = base / "pset"
    assignment.make_copy(ROOT, copy, sorted(CHAPTERS))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOALIGN_")}
    env["OMP_NUM_THREADS"] = "1"
    procs = {}
    for name, where in (("reference", ROOT), ("blanks", copy)):
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
               "-m", EVERY_CHAPTER, f"--junitxml={base / name}.xml", "tests"]
        procs[name] = subprocess.Popen(cmd, cwd=where, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    logs = {name: proc.communicate(timeout=600)[0][-3000:] for name, proc in procs.items()}
    return {name: (outcomes(base / f"{name}.xml"), logs[name]) for name in procs}, copy


def test_the_table_names_real_functions_tests_and_tutorial_sections():
    tests = {f"{p.name}::{n.name}" for p in (ROOT / "tests").glob("test_*.py")
             for n in ast.parse(p.read_text()).body if isinstance(n, ast.FunctionDef)}
    for chapter, (tutorial, section, _, _) in CHAPTERS.items():
        headings = [line.lstrip("#").strip() for line in (ROOT / tutorial).read_text().splitlines()
                    if line.startswith("##")]
        assert any(h.startswith(section) for h in headings), f"{tutorial} has no section {section}"
        for key in functions(chapter):
            path, name = key.split("::")
            node = assignment.find_function(ast.parse((ROOT / path).read_text()), name)
            assert ast.get_docstring(node), f"{key} needs a docstring: the student's specification"
        missing = [t for t in graded(chapter) if t not in tests]
        assert not missing, f"chapter {chapter} grades with tests that do not exist: {missing}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=CHAPTER_IDS)
def test_graders_pass_on_the_reference_and_the_marker_selects_exactly_them(chapter, runs):
    reference, log = runs[0]["reference"]
    everything = {t for c in CHAPTERS for t in graded(c)}
    assert set(reference) == everything, f"-m selected {sorted(set(reference) ^ everything)}"
    for test in graded(chapter):
        results = reference[test]
        assert all(kind == "passed" for kind, _ in results), \
            f"{test} on the reference: {results}\n{log}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=CHAPTER_IDS)
def test_every_grader_fails_on_the_blank_of_its_own_chapter(chapter, runs):
    """Failed (not skipped, not an error in a fixture), on a NotImplementedError from a function of
    a chapter the test grades: no grader passes on a blank, and each really calls its function."""
    blanks, log = runs[0]["blanks"]
    chapters = assignment.graded_chapters()
    for test in graded(chapter):
        own = [f"Chapter {c}: implement" for c in chapters[test]]
        for kind, message in blanks[test]:
            assert kind == "failed" and "NotImplementedError" in message, \
                f"{test} on the blanks: {kind}, {message!r}\n{log}"
            assert any(o in message for o in own), f"{test} failed on another chapter: {message}"


def test_the_copy_holds_no_solution_text(runs):
    copy = runs[1]
    texts = {}
    for path in copy.rglob("*"):
        if path.is_file() and path.suffix in (".py", ".md", ".txt", ".toml", ".html", ""):
            texts[path.relative_to(copy)] = path.read_text(errors="replace")
    assert not (copy / "tutorials" / "solutions").exists()
    assert not (copy / "tests" / "test_mutations.py").exists()
    assert not (copy / "tests" / "test_assignment.py").exists()
    # a line the package itself uses elsewhere (e.g. `mask = ro.response_mask`) gives nothing away
    elsewhere = {line.strip() for p, text in texts.items() if p.parts[0] == "nanoalign"
                 for line in text.splitlines()}
    for chapter in CHAPTERS:
        for key in functions(chapter):
            path, name = key.split("::")
            stub = body_lines(texts[Path(path)], name)
            assert stub[0] == "raise NotImplementedError(" and f"Chapter {chapter}" in stub[1]
            for line in body_lines((ROOT / path).read_text(), name):
                leaks = [str(p) for p, text in texts.items() if line in text]
                assert line in elsewhere or not leaks, \
                    f"{key}'s line {line!r} is in the student copy: {leaks}"


def test_pasting_the_reference_back_restores_every_file(tmp_path):
    assignment.make_copy(ROOT, tmp_path / "pset", sorted(CHAPTERS))
    assignment.solve(ROOT, tmp_path / "pset", sorted(CHAPTERS))
    for path in {f.split("::")[0] for c in CHAPTERS for f in functions(c)}:
        assert (tmp_path / "pset" / path).read_text() == (ROOT / path).read_text(), path
    assignment.make_copy(ROOT, tmp_path / "blank", [5])
    with pytest.raises(SystemExit, match="blank"):  # a student copy holds no key to paste
        assignment.solve(tmp_path / "blank", tmp_path / "pset", [5])


def test_an_excerpt_of_a_blanked_function_shows_the_stub_in_the_copy(tmp_path):
    """Through a walk of a checkout without git: a tutorial excerpt in the documented format."""
    source = tmp_path / "course"
    assignment.make_copy(ROOT, source, [])
    reference = (ROOT / "nanoalign" / "train_dpo.py").read_text()
    fence = "```"
    page = (f"# An excerpt\n\n<!-- excerpt: nanoalign/train_dpo.py::dpo_loss -->\n{fence}python\n"
            f"{assignment.function_source(reference, 'dpo_loss')}{fence}\n\n"
            f"<!-- excerpt: nanoalign/train_dpo.py::policy_and_reference_logps -->\n{fence}python\n"
            f"{assignment.function_source(reference, 'policy_and_reference_logps')}{fence}\n")
    (source / "tutorials" / "99-excerpts.md").write_text(page)
    (source / "out").mkdir()
    (source / "out" / "run.log").write_text("never copied")
    assignment.make_copy(source, tmp_path / "pset", [5])
    shown = (tmp_path / "pset" / "tutorials" / "99-excerpts.md").read_text()
    assert "raise NotImplementedError(" in shown and "def dpo_loss(" in shown
    assert not any(line in shown for line in body_lines(reference, "dpo_loss"))
    assert "def policy_and_reference_logps(" in shown and "concatenated_logps(" in shown  # kept
    assert not (tmp_path / "pset" / "out").exists()
    (source / "tutorials" / "99-excerpts.md").write_text(page.replace(f"{fence}python\n", "", 1))
    with pytest.raises(ValueError, match="not followed by a ```python block"):
        assignment.make_copy(source, tmp_path / "pset2", [5])


def test_every_seeded_bug_in_a_blanked_function_is_caught_by_its_chapters_graders():
    """Each BUGS row whose edit lies in a function a chapter sets names only catchers from that
    chapter's grading set (test_mutations.py proves they fail under the edit), and every chapter
    has such rows, among them the mistakes students make most."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_mutations import BUGS
    caught = {c: [] for c in CHAPTERS}
    for name, path, old, _, tests in BUGS:
        text = (ROOT / path).read_text()
        line = text[:text.index(old)].count("\n") + 1
        for chapter in CHAPTERS:
            for key in functions(chapter):
                fn_path, fn = key.split("::")
                first, _, last = assignment.span(assignment.find_function(ast.parse(text), fn)) \
                    if fn_path == path else (0, 0, -1)
                if first <= line <= last:
                    outside = [t for t in tests.split() if t not in graded(chapter)]
                    assert not outside, f"{name!r} edits {key}: caught by non-graders {outside}"
                    caught[chapter].append(name)
    assert all(caught.values()), f"chapters without a seeded bug: {caught}"
    named = ["whitening with the unbiased variance", "RM reads the first pad",
             "returns from whitened advantages", "DPO forgets the reference",
             "SFT loss averaged over its own micro-batch"]
    assert set(named) <= {n for names in caught.values() for n in names}


def test_the_command_line_explains_its_errors(tmp_path, capsys):
    assignment.main(["--list", "--chapters", "5"])
    assert "dpo_loss" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="expected 'all' or a comma-separated list"):
        assignment.main(["--chapters", "3,8", "--out", str(tmp_path / "x")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("")
    with pytest.raises(SystemExit, match="not empty"):
        assignment.main(["--chapters", "3", "--out", str(tmp_path / "full")])
    with pytest.raises(SystemExit) as done:
        assignment.main(["--help"])
    assert done.value.code == 0
