"""What a grading test says when it fails: the invariant's name, what was expected and what came
back (pytest's report of a bare `assert torch.allclose(...)` shows neither), so a student who runs
`python -m pytest -m chapterN` in a copy made by nanoalign/assignment.py can act on it."""

import torch


def close(got, want, invariant: str, atol: float = 1e-8, rtol: float = 1e-5):
    """assert got == want within torch.allclose's tolerances (the same defaults), and of the same
    shape (allclose would broadcast a scalar against a batch)."""
    got, want = torch.as_tensor(got).detach(), torch.as_tensor(want).detach()
    assert got.shape == want.shape, \
        f"{invariant}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}"
    ok = torch.allclose(got.to(want.dtype), want, atol=atol, rtol=rtol)
    diff = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    assert ok, (f"{invariant}\n  expected {rounded(want)}\n  got      {rounded(got)}\n"
                f"  largest difference {diff:.3g} (tolerance {atol:g} + {rtol:g} x |expected|)")


def rounded(x: torch.Tensor) -> str:
    """Short enough to read: the first 12 values to 5 significant digits, and the shape."""
    values = [float(f"{v:.5g}") for v in x.double().flatten().tolist()]
    if x.dim() == 0:
        return str(values[0])
    more = " ..." if len(values) > 12 else ""
    return f"{values[:12]}{more} of shape {tuple(x.shape)}"
