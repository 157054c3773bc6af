import torch

from fruitlens.training.solver import Rows, fit_linear


def _blobs(n: int = 120, d: int = 6, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    centres = 4 * torch.randn(classes, d, generator=g) + 10  # far from zero: the standardisation matters
    return centres[y] + torch.randn(n, d, generator=g), y


def test_rows_read_in_chunks_fit_the_same_head_as_one_tensor():
    x, y = _blobs()
    whole = fit_linear(x, y, 3, max_iter=50)
    parts = fit_linear(Rows(x[:50], x[50:90], (x, torch.arange(90, 120))), y, 3, max_iter=50)  # three chunks
    # the same optimum; the sums in another order leave float32 noise along the way
    assert torch.allclose(whole.weight, parts.weight, atol=5e-3) and torch.allclose(whole.bias, parts.bias, atol=5e-3)
    assert (whole(x).argmax(1) == y).float().mean() > 0.95


def test_the_head_reads_standardised_features():
    x, y = _blobs()
    fit = fit_linear(x, y, 3, max_iter=50)
    assert torch.allclose(fit.mean, x.mean(0), atol=1e-5)
    logits = ((x - fit.mean) / fit.std) @ fit.weight.T + fit.bias
    assert torch.allclose(fit(x), logits)
