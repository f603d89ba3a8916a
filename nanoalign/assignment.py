"""
The course kit: a student copy of this repository in which the functions a chapter sets keep their
signature and docstring while their bodies raise NotImplementedError("Chapter 5: implement
dpo_loss; see tutorials/05-dpo.md, section 'The math'"), graded by the repository's own invariant
tests: tests/conftest.py marks each grader `chapterN` from the table below, so `python -m pytest
-m chapter5` in the copy runs exactly them. docs/teaching.md is the instructor's page.

    python -m nanoalign.assignment --list
    python -m nanoalign.assignment --chapters 3,4,5 --out ../pset
    python -m nanoalign.assignment --solve ../pset --chapters 3,4,5     (the instructor's key)

No solution text goes into the copy: not the answer key (tutorials/solutions/), not the seeded
bugs (tests/test_mutations.py holds the correct line of many of these functions), and a tutorial
excerpt of a blanked function (`<!-- excerpt: file::name -->`, then a ```python block) shows the
stub instead.
"""

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The one table: chapter -> (its tutorial, the section that derives its functions, the functions
# it sets, the tests under tests/ that grade them). Functions and tests are "file::name" words; a
# bare name belongs to the file named before it. Graders are fast pure-function tests: a student's
# code against its formula and its invariants.
CHAPTERS = {
    1: ("tutorials/01-pretraining.md", "The code, top to bottom",
        "nanoalign/model.py::KVCache.update",
        "test_model.py::test_greedy_generation_with_kv_cache_equals_recomputing_the_prefix "
        "test_cached_decoding_gives_the_full_forward_logits_at_every_step"),
    2: ("tutorials/02-sft.md", "The math", "nanoalign/train_sft.py::sft_loss",
        "test_losses.py::test_sft_loss_is_mean_response_token_nll_and_ignores_prompt_labels "
        "test_sft_global_token_normalisation_makes_accumulation_equal_one_big_batch"),
    3: ("tutorials/03-reward-model.md", "The math",
        "nanoalign/train_rm.py::bt_loss nanoalign/rl.py::pair_rewards score_last_token",
        "test_losses.py::test_bt_loss_is_log2_at_ties_with_gradient_minus_half_and_zero_accuracy "
        "test_bt_loss_is_shift_invariant_and_antisymmetric "
        "test_bt_margin_loss_is_log2_when_difference_equals_margin "
        "test_pair_rewards_read_each_answer_at_its_last_real_token "
        "test_score_last_token_ignores_padding_and_subtracts_the_offset"),
    4: ("tutorials/04-ppo.md", "The math",
        "nanoalign/train_ppo.py::per_token_rewards gae advantages_and_returns ppo_loss "
        "nanoalign/rl.py::masked_whiten clipped_surrogate",
        "test_losses.py::"
        "test_reward_sits_on_the_last_real_token_and_kl_sums_to_the_sequence_log_ratio "
        "test_gae_matches_brute_force_and_reward_to_go_when_gamma_lambda_one "
        "test_masked_whiten_has_mean_zero_std_one_over_the_mask_only "
        "test_ppo_returns_are_raw_reward_to_go_computed_before_advantage_whitening "
        "test_whitened_rewards_are_scaled_but_keep_their_mean "
        "test_first_ppo_step_has_ratio_one_and_no_clipping "
        "test_ppo_loss_divides_by_the_given_token_count_and_weighs_the_value_loss "
        "test_clipped_objective_has_zero_gradient_beyond_the_clip_range "
        "test_value_clipping_is_inactive_inside_the_range "
        "test_value_loss_takes_the_larger_of_the_clipped_and_unclipped_errors "
        "test_clipped_surrogate_is_pessimistic_for_ppo_and_grpo_alike"),
    5: ("tutorials/05-dpo.md", "The math",
        "nanoalign/generate.py::sequence_logps nanoalign/train_dpo.py::dpo_loss",
        "test_losses.py::test_sequence_logps_sum_response_tokens_only "
        "test_dpo_loss_is_log2_and_rewards_zero_when_policy_equals_reference "
        "test_dpo_gradient_is_minus_and_plus_half_beta_at_init "
        "test_dpo_swap_identity_and_beta_scaling_of_rewards "
        "test_ipo_and_conservative_dpo_match_their_formulas_and_optima "
        "test_reference_free_dpo_ignores_reference_logprobs"),
    6: ("tutorials/06-grpo-rloo.md", "The math",
        "nanoalign/rl.py::kl_estimates "
        "nanoalign/train_grpo.py::group_advantages clipped_policy_loss",
        "test_grpo.py::test_group_advantages_sum_to_zero_without_std_and_for_rloo "
        "test_rloo_baseline_excludes_the_sample_itself test_grpo_normalises_by_the_group_std "
        "test_a_group_with_identical_rewards_has_zero_advantage_and_zero_policy_gradient "
        "test_first_update_has_ratio_one_and_token_vs_sequence_normalisation_differ_by_length "
        "test_k3_in_the_loss_has_the_gradient_of_reverse_kl_ref_to_policy "
        "test_losses.py::test_kl_is_zero_when_policy_equals_reference_and_k3_is_nonnegative "
        "test_k1_and_k3_are_unbiased_for_kl_on_an_enumerated_distribution "
        "test_k2_is_half_the_squared_log_ratio "
        "test_clipped_surrogate_is_pessimistic_for_ppo_and_grpo_alike"),
    7: ("tutorials/07-beyond.md", "Knowledge distillation",
        "nanoalign/train_distill.py::distill_loss",
        "test_distill.py::"
        "test_soft_term_is_t_squared_times_forward_kl_and_zero_when_student_equals_teacher "
        "test_hard_term_is_the_cross_entropy_of_the_teachers_tokens "
        "test_the_loss_is_divided_by_the_given_token_count_and_ignores_padding "
        "test_only_the_student_gets_gradients"),
}
# Never in a student copy: the answer key, the seeded bugs (their `old` column is the correct line
# of many blanked functions) and the kit's own test; the instructor's repository keeps the proofs
SOLUTIONS = ("tutorials/solutions/", "tests/test_mutations.py", "tests/test_assignment.py")
SKIP_DIRS = {".git", "out", "__pycache__", ".pytest_cache", ".venv", "node_modules"}
EXCERPT = re.compile(r"<!-- excerpt: (\S+?)::(\S+) -->")


def expand(words: str) -> list[str]:
    """"a.py::f g b.py::h" -> ["a.py::f", "a.py::g", "b.py::h"]"""
    found, file = [], None
    for word in words.split():
        file, name = word.split("::") if "::" in word else (file, word)
        found.append(f"{file}::{name}")
    return found


def graded_chapters() -> dict[str, set[int]]:
    """{"test_file.py::test_name": the chapters it grades} (tests/conftest.py marks them)."""
    found = {}
    for chapter in CHAPTERS:
        for test in expand(CHAPTERS[chapter][3]):
            found.setdefault(test, set()).add(chapter)
    return found


# ----------------------------------------------------------------------------------- source edits

def find_function(tree: ast.Module, name: str):
    """The def of `name` ("fn" or "Class.method") at the top of a module."""
    *owner, leaf = name.split(".")
    body = tree.body
    for cls in owner:
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == cls), [])
    found = next((n for n in body if isinstance(n, ast.FunctionDef) and n.name == leaf), None)
    if found is None:
        raise LookupError(f"no function {name}")
    return found


def span(node) -> tuple[int, int, int]:
    """(first line: the first decorator or the def, the last header line: the end of the signature
    or of the docstring, the last line), 1-based."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    head = node.body[0]
    docstring = isinstance(head, ast.Expr) and isinstance(getattr(head.value, "value", 0), str)
    return first, head.end_lineno if docstring else head.lineno - 1, node.end_lineno


def blank(text: str, blanks: dict[str, tuple[str, str]]) -> str:
    """The module's source with each named function's body after its docstring replaced by a
    NotImplementedError carrying the message's two halves."""
    lines = text.splitlines(keepends=True)
    tree = ast.parse(text)
    nodes = {name: find_function(tree, name) for name in blanks}
    for name in sorted(blanks, key=lambda n: -nodes[n].lineno):  # from the bottom up
        node, (left, right) = nodes[name], blanks[name]
        _, header, last = span(node)
        pad = " " * (node.col_offset + 4)
        lines[header:last] = [f'{pad}raise NotImplementedError(\n', f'{pad}    "{left}"\n',
                              f'{pad}    "{right}")\n']
    return "".join(lines)


def function_source(text: str, name: str) -> str:
    """The source of a function, decorators included, dedented."""
    first, _, last = span(find_function(ast.parse(text), name))
    return textwrap.dedent("".join(text.splitlines(keepends=True)[first - 1:last]))


def replace_excerpts(markdown: str, stubs: dict[str, str]) -> str:
    """Each ```python block right after `<!-- excerpt: file::name -->` (blank lines between
    allowed) shows stubs["file::name"] instead, where there is one."""
    lines, out, i = markdown.splitlines(keepends=True), [], 0
    while i < len(lines):
        out.append(lines[i])
        marker = EXCERPT.fullmatch(lines[i].strip())  # a line of its own, not prose quoting one
        i += 1
        key = marker and f"{marker.group(1)}::{marker.group(2)}"
        if key not in stubs:
            continue
        while i < len(lines) and not lines[i].strip():
            out.append(lines[i])
            i += 1
        if i == len(lines) or lines[i].strip() != "```python":
            raise ValueError(f"the excerpt of {key} is not followed by a ```python block")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"the ```python block of the excerpt of {key} never closes")
        out += [lines[i], stubs[key], lines[end]]
        i = end + 1
    return "".join(out)


# ----------------------------------------------------------------------------------- the copy

def repo_files(root: Path, exclude: Path | None = None) -> list[str]:
    """The repository's files, relative: git's tracked and untracked-but-not-ignored files in a git
    checkout, else a walk that skips outputs (out/, data/world/), .git and caches."""
    root = root.resolve()
    git = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, text=True)
    if git.returncode == 0 and (root / ".git").exists():
        names = [n for n in git.stdout.split("\0") if n]
    else:
        names = []
        for folder, dirs, files in os.walk(root):
            here = Path(folder)
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")
                       and here / d != root / "data" / "world"]
            names += [str((here / f).relative_to(root)) for f in files if not f.endswith(".pyc")]
    inside = exclude is not None and exclude.resolve().is_relative_to(root)
    ex = str(exclude.resolve().relative_to(root)) + os.sep if inside else None
    return sorted(n for n in names if (root / n).is_file() and not (ex and n.startswith(ex)))


def blanks_by_file(chapters: list[int]) -> dict[str, dict[str, tuple[str, str]]]:
    """{file: {function name: its stub message}} of the chapters."""
    found = {}
    for chapter in chapters:
        tutorial, section, _, _ = CHAPTERS[chapter]
        for key in expand(CHAPTERS[chapter][2]):
            path, name = key.split("::")
            found.setdefault(path, {})[name] = (f"Chapter {chapter}: implement {name}; ",
                                                f"see {tutorial}, section '{section}'")
    return found


def make_copy(root: Path, out: Path, chapters: list[int]) -> list[str]:
    """Write the student copy of `root` into `out`; returns the blanked functions as file::name."""
    blanks = blanks_by_file(chapters)
    stubs = {}
    for path, names in blanks.items():
        source = blank((root / path).read_text(), names)
        stubs.update({f"{path}::{n}": function_source(source, n) for n in names})
    for rel in repo_files(root, exclude=out):
        if rel.startswith(SOLUTIONS):
            continue
        src, dst = root / rel, out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel in blanks:
            dst.write_text(blank(src.read_text(), blanks[rel]))
        elif rel.endswith(".md"):
            text = replace_excerpts(src.read_text(), stubs)
            # the chapters link to their answer key, which stays with the instructor
            dst.write_text(re.sub(r"\[([^\]]*)\]\(solutions/[^)]*\)", r"\1 (from your instructor)",
                                  text))
        else:
            shutil.copyfile(src, dst)
        shutil.copymode(src, dst)
    return list(stubs)


def solve(root: Path, target: Path, chapters: list[int]) -> list[str]:
    """Paste the reference's functions of the chapters back into the student copy `target` (the
    instructor's key, and the kit's own check: the graders pass again)."""
    done = []
    for path, names in blanks_by_file(chapters).items():
        reference, text = (root / path).read_text(), (target / path).read_text()
        ref_tree, tree = ast.parse(reference), ast.parse(text)
        ref_lines, lines = reference.splitlines(keepends=True), text.splitlines(keepends=True)
        for name in sorted(names, key=lambda n: -find_function(tree, n).lineno):
            first, _, last = span(find_function(ref_tree, name))
            if 'NotImplementedError(\n' in "".join(ref_lines[first - 1:last]):
                raise SystemExit(f"{path}: {name} is a blank here: run --solve from the reference")
            t_first, _, t_last = span(find_function(tree, name))
            lines[t_first - 1:t_last] = ref_lines[first - 1:last]
            done.append(f"{path}::{name}")
        (target / path).write_text("".join(lines))
    return done


def parse_chapters(spec: str) -> list[int]:
    words = [str(c) for c in CHAPTERS] if spec == "all" else spec.split(",")
    if not all(w.strip() in [str(c) for c in CHAPTERS] for w in words):
        raise SystemExit(f"--chapters {spec}: expected 'all' or a comma-separated list of "
                         f"{', '.join(map(str, CHAPTERS))}")
    return sorted({int(w) for w in words})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chapters", default="all", help="e.g. 3,4,5 (default: all)")
    parser.add_argument("--out", help="write the student copy here (a new or empty folder)")
    parser.add_argument("--solve", metavar="COPY", help="paste the reference's functions back")
    parser.add_argument("--list", action="store_true", help="print the table (the default)")
    args = parser.parse_args(argv)
    chapters = parse_chapters(args.chapters)
    if args.list or not (args.out or args.solve):
        for c in chapters:
            tutorial, section, names, tests = CHAPTERS[c]
            print(f"chapter {c}: {', '.join(expand(names))}\n  derived in {tutorial}, section "
                  f"'{section}'\n  graded by {len(expand(tests))} tests: pytest -m chapter{c}")
        return
    if args.solve:
        for key in solve(ROOT, Path(args.solve), chapters):
            print(f"solved {key}")
        return
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out}: the folder exists and is not empty; name a new one")
    for key in make_copy(ROOT, out, chapters):
        print(f"blanked {key}")
    print(f"student copy in {out}: grade with `python -m pytest -m chapterN` there")


if __name__ == "__main__":
    sys.exit(main())
