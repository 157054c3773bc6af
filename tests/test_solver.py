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


def test_the_feature_store_grows_in_chunks_and_reads_back_what_it_was_given(tmp_path, monkeypatch):
    from fruitlens.models.preprocessing import Preprocessing
    from fruitlens.training import store as store_module
    from fruitlens.training.store import FeatureStore

    monkeypatch.setattr(store_module, "CHUNK_BYTES", 2 * 3 * 4)  # two rows of 3 float32 a chunk: several chunks
    files = []
    for i in range(7):
        files.append(tmp_path / f"{i}.jpg")
        files[-1].write_bytes(bytes([i]) * (i + 1))
    pre = Preprocessing(image_size=32)
    x = torch.arange(7 * 3, dtype=torch.float32).view(7, 3) / 7
    s = FeatureStore("mobilenet_v2", "imagenet", pre, cache=tmp_path / "cache")
    s.path.parent.mkdir(parents=True)
    s.path.with_suffix(".pt").write_bytes(b"an earlier fruitlens's store")  # goes with the first add
    # half precision in, float32 kept; a file listed twice is stored once
    s.add([str(f) for f in files[:5]] + [str(files[0])], torch.cat([x[:5], x[:1]]).half())
    s.add([str(f) for f in files[3:]], x[3:])  # two already stored: only the new rows are added
    again = FeatureStore("mobilenet_v2", "imagenet", pre, cache=tmp_path / "cache")
    got, missing = again.lookup([str(f) for f in files])
    assert missing == [] and got.dtype == torch.float32 and len(again.x) == 7
    torch.testing.assert_close(got[:5], x[:5].half().float())
    torch.testing.assert_close(got[5:], x[5:])
    # an add that died after writing rows and before saving their keys: the next add cuts those rows off
    with open(again.path, "ab") as fh:
        fh.write(torch.full((2, 3), -1.0).numpy().tobytes())
    extra = tmp_path / "7.jpg"
    extra.write_bytes(b"new")
    again.add([str(extra)], torch.full((1, 3), 9.0))
    last = FeatureStore("mobilenet_v2", "imagenet", pre, cache=tmp_path / "cache")
    got, missing = last.lookup([str(f) for f in [*files, extra]])
    assert missing == [] and len(last.x) == 8
    torch.testing.assert_close(got[:7], torch.cat([x[:5].half().float(), x[5:]]))
    torch.testing.assert_close(got[7], torch.full((3,), 9.0))
    assert not s.path.with_suffix(".pt").exists()
    # a store whose keys cannot be read is started again, not trusted
    last.keys_path.write_text("{not json")
    broken = FeatureStore("mobilenet_v2", "imagenet", pre, cache=tmp_path / "cache")
    assert broken.lookup([str(files[0])]) == (None, [0])
    broken.add([str(files[0])], x[:1])
    torch.testing.assert_close(FeatureStore("mobilenet_v2", "imagenet", pre, cache=tmp_path / "cache").x, x[:1])
