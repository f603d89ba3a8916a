"""Shared fixtures. The micro pipeline runs once per test session and its outputs are reused by the
pipeline, report, resume, evaluation and stage tests (seconds per stage).

The mutation check (test_mutations.py) runs a few tests in a fresh process with one classic bug put
into one module's source as it is imported: NANOALIGN_MUTATION = {"file", "old", "new"}, and
NANOALIGN_MICRO_RUN names a micro run built by the correct code, to reuse."""

import importlib.machinery
import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
ROOT = Path(__file__).resolve().parents[1]


class MutatedLoader(importlib.machinery.SourceFileLoader):
    """Compiles the module from its source with `old` replaced by `new` (never from a cached
    .pyc)."""

    def __init__(self, fullname, path, old, new):
        super().__init__(fullname, path)
        self.old, self.new = old, new

    def get_code(self, fullname):
        source = Path(self.path).read_text()
        assert self.old in source, f"the mutation's original text is not in {self.path}"
        return compile(source.replace(self.old, self.new, 1), self.path, "exec")


class MutationFinder:
    def __init__(self, module, old, new):
        self.module, self.old, self.new = module, old, new

    def find_spec(self, name, path, target=None):
        if name != self.module:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        spec.loader = MutatedLoader(name, spec.origin, self.old, self.new)
        return spec


if os.environ.get("NANOALIGN_MUTATION"):
    mutation = json.loads(os.environ["NANOALIGN_MUTATION"])
    module = mutation["file"].removesuffix(".py").replace("/", ".")
    assert module not in sys.modules, f"{module} was imported before the mutation could apply"
    sys.meta_path.insert(0, MutationFinder(module, mutation["old"], mutation["new"]))


def pytest_collection_modifyitems(config, items):
    """Each chapter's grading tests (the table in nanoalign/assignment.py) carry the marker
    chapterN, so `python -m pytest -m chapter5` in a student copy runs exactly them."""
    from nanoalign.assignment import graded_chapters
    graded = graded_chapters()
    for item in items:
        name = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        for chapter in sorted(graded.get(name, ())):
            item.add_marker(getattr(pytest.mark, f"chapter{chapter}"))


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """out/<run> of `python -m nanoalign.pipeline --preset micro`: world, every stage's checkpoint,
    report."""
    if os.environ.get("NANOALIGN_MICRO_RUN"):
        return Path(os.environ["NANOALIGN_MICRO_RUN"])
    from nanoalign import pipeline
    out = tmp_path_factory.mktemp("micro")
    pipeline.main(["--preset", "micro", "--out", str(out), "--stages",
                   "pretrain,sft,rm,ppo,dpo,grpo,rlvr,pretrain_small,distill"])
    return out
