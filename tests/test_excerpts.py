"""The code the tutorials show is the code that runs: every excerpt in the docs is compared with
its source, so an excerpt cannot drift from the file it quotes.

An excerpt is a marker line (an HTML comment: invisible on GitHub) directly followed by a fenced
```python block. Two forms:

    <!-- excerpt: nanoalign/train_dpo.py::dpo_loss -->
        the whole top-level function (or class) `dpo_loss` of that file, decorators included,
        exactly as in the file (top-level code has no indentation to remove);

    <!-- excerpt: nanoalign/train_ppo.py::train lines "# 1. rollout" .. "# 2. " -->
        a part of the top-level function `train`: from the first of its lines that contains
        `# 1. rollout` up to, not including, the first later line that contains `# 2. `, with the
        common indentation removed (textwrap.dedent) and trailing blank lines dropped. Quote
        strings without a double quote in them; a numbered phase comment makes a good fence.

The path is relative to the repository root. Any line starting with `<!-- excerpt` that is not
one of these forms is an error too, so a typo cannot hide an excerpt from the check. The course kit
reads the same markers to blank the excerpts in a student copy.
"""

import ast
import difflib
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ([ROOT / "README.md", ROOT / "data" / "README.md"]
        + sorted((ROOT / "tutorials").rglob("*.md")) + sorted((ROOT / "docs").rglob("*.md")))
MARKER = re.compile(r'<!-- excerpt: (?P<path>[\w./-]+\.py)::(?P<name>\w+)'
                    r'(?: lines "(?P<start>[^"]+)" \.\. "(?P<end>[^"]+)")? -->')


def source_of(spec: dict) -> str:
    """The text an excerpt marker names, or a ValueError that says why there is none."""
    path = ROOT / spec["path"]
    if not path.is_file():
        raise ValueError(f"{spec['path']} does not exist")
    text = path.read_text()
    nodes = [n for n in ast.parse(text).body if getattr(n, "name", None) == spec["name"]
             and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    if not nodes:
        raise ValueError(f"{spec['path']} has no top-level function or class {spec['name']}")
    node = nodes[-1]  # as Python does: the last definition of a name wins
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    lines = text.splitlines()[first - 1:node.end_lineno]
    if not spec["start"]:
        return "\n".join(lines)
    where = f"{spec['path']}::{spec['name']}"
    i = next((k for k, line in enumerate(lines) if spec["start"] in line), None)
    if i is None:
        raise ValueError(f"no line of {where} contains {spec['start']!r}")
    j = next((k for k in range(i + 1, len(lines)) if spec["end"] in lines[k]), None)
    if j is None:
        raise ValueError(f"no line of {where} after {spec['start']!r} contains {spec['end']!r}")
    return textwrap.dedent("\n".join(lines[i:j])).rstrip()


def excerpts(text: str) -> list[dict]:
    """Each marker of a document: {line, path, name, start, end, block, error}; block is the
    ```python block after the marker (None if there is none), error a malformed marker's."""
    lines, found = text.splitlines(), []
    for k, line in enumerate(lines):
        if not line.startswith("<!-- excerpt"):
            continue
        m = MARKER.fullmatch(line.strip())
        spec = {"line": k + 1, "block": None, "error": None,
                **(m.groupdict() if m else dict.fromkeys(["path", "name", "start", "end"]))}
        if not m:
            spec["error"] = f"a malformed marker: {line.strip()!r}"
        elif k + 1 < len(lines) and lines[k + 1].strip() == "```python":
            end = next((e for e in range(k + 2, len(lines)) if lines[e].startswith("```")), None)
            spec["block"] = None if end is None else "\n".join(lines[k + 2:end])
        found.append(spec)
    return found


def problems(text: str, where: str) -> list[str]:
    """What is wrong with the excerpts of one document, each problem as `where:line: why`."""
    out = []
    for spec in excerpts(text):
        at = f"{where}:{spec['line']}"
        if spec["error"]:
            out.append(f"{at}: {spec['error']}")
            continue
        if spec["block"] is None:
            out.append(f"{at}: the marker is not directly followed by a ```python block")
            continue
        try:
            expected = source_of(spec)
        except ValueError as e:
            out.append(f"{at}: {e}")
            continue
        if spec["block"].rstrip() != expected:
            diff = difflib.unified_diff(expected.splitlines(), spec["block"].rstrip().splitlines(),
                                        f"{spec['path']} (source)", f"{where} (excerpt)",
                                        lineterm="", n=1)
            out.append(f"{at}: the excerpt of {spec['path']}::{spec['name']} differs from the "
                       "source:\n" + "\n".join(diff))
    return out


def test_every_excerpt_is_identical_to_its_source():
    found = [p for doc in DOCS for p in problems(doc.read_text(), str(doc.relative_to(ROOT)))]
    assert not found, "excerpts that drifted from the code:\n\n" + "\n\n".join(found)


def test_every_chapter_shows_the_code_it_explains():
    chapters = sorted((ROOT / "tutorials").glob("0*.md"))
    assert len(chapters) >= 7
    bare = [c.name for c in chapters if not excerpts(c.read_text())]
    assert not bare, f"chapters without a code excerpt: {bare}"


def test_a_drifted_excerpt_is_reported_with_its_chapter_and_line():
    marker = "<!-- excerpt: nanoalign/train_dpo.py::dpo_loss -->"
    code = source_of({"path": "nanoalign/train_dpo.py", "name": "dpo_loss", "start": None})
    text = f"# A chapter\n\nSome prose.\n{marker}\n```python\n{code}\n```\nMore prose.\n"
    assert problems(text, "05-dpo.md") == []
    k = code.index("beta")  # one changed character in the shown code
    found = problems(text.replace(code, code[:k] + "Beta" + code[k + 4:]), "05-dpo.md")
    assert len(found) == 1 and found[0].startswith("05-dpo.md:4: the excerpt of")
    assert "+" in found[0] and "Beta" in found[0]  # the diff shows the changed line


def test_a_missing_function_a_bad_fence_and_a_typo_are_each_reported():
    block = "```python\ndef f():\n    pass\n```"
    cases = {
        "<!-- excerpt: nanoalign/train_dpo.py::no_such_function -->\n" + block:
            "has no top-level function or class no_such_function",
        "<!-- excerpt: nanoalign/no_such_file.py::f -->\n" + block: "does not exist",
        "<!-- excerpt: nanoalign/train_dpo.py::dpo_loss -->\n\nsome prose\n" + block:
            "not directly followed by a ```python block",
        "<!-- excerpt nanoalign/train_dpo.py::dpo_loss -->\n" + block: "a malformed marker",
        '<!-- excerpt: nanoalign/train_ppo.py::train lines "# 9. " .. "# 10. " -->\n' + block:
            "contains '# 9. '",
        '<!-- excerpt: nanoalign/train_ppo.py::train lines "# 1. " .. "# 99. " -->\n' + block:
            "contains '# 99. '",
    }
    for text, why in cases.items():
        found = problems("prose\n" + text, "x.md")
        assert len(found) == 1 and found[0].startswith("x.md:2: ") and why in found[0], \
            (text, found)


def test_a_phase_excerpt_is_the_dedented_lines_between_its_fences():
    spec = {"path": "nanoalign/train_ppo.py", "name": "train", "start": "# 2. rewards",
            "end": "# 3. "}
    lines = source_of(spec).splitlines()
    assert lines[0] == "# 2. rewards and advantages"  # dedented, the start line included
    assert not any("# 3. " in line for line in lines)  # the end line excluded
    assert all(line.strip() in (ROOT / spec["path"]).read_text() for line in lines)
