"""Shared fixtures. The micro pipeline runs once per test session and its outputs are reused by the pipeline, report,
resume, evaluation and stage tests (seconds per stage)."""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """out/<run> of `python -m nanoalign.pipeline --preset micro`: world, every stage's checkpoint, report."""
    from nanoalign import pipeline
    out = tmp_path_factory.mktemp("micro")
    pipeline.main(["--preset", "micro", "--out", str(out), "--stages",
                   "pretrain,sft,rm,ppo,dpo,grpo,rlvr,pretrain_small,distill"])
    return out
