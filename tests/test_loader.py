"""The on-device loader: every sample once per epoch, augmentation as specified."""
import torch

from bdexp.data.loader import DeviceLoader, random_crop, random_flip, to_uint8


def test_epoch_covers_every_sample_once_and_is_seeded():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous()
    y = torch.arange(10)
    loader = DeviceLoader(x, y, batch_size=3, device=torch.device("cpu"), seed=1)
    seen = torch.cat([b.index for b in loader])
    assert sorted(seen.tolist()) == list(range(10)) and len(loader) == 4
    for b in loader:
        assert torch.equal(b.y, b.index)  # labels travel with their images
        assert torch.allclose(b.x[:, 0, 0, 0] * 255, b.y.float())
    again = DeviceLoader(x, y, batch_size=3, device=torch.device("cpu"), seed=1)
    assert torch.equal(torch.cat([b.index for b in again]), seen)


def test_drop_last():
    x = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
    loader = DeviceLoader(x, torch.zeros(10, dtype=torch.long), batch_size=4, device=torch.device("cpu"),
                          seed=0, drop_last=True)
    assert len(loader) == 2 and all(len(b.y) == 4 for b in loader)


def test_random_crop_is_a_translation_with_zero_fill():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 2, 8, 8) + 0.5  # strictly positive, so zero fill is visible
    out = random_crop(x, 2, g)
    assert out.shape == x.shape
    for i in range(64):
        # find the shift that explains the output
        ok = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = torch.zeros_like(x[i])
                ys, yd = (slice(dy, 8), slice(0, 8 - dy)) if dy >= 0 else (slice(0, 8 + dy), slice(-dy, 8))
                xs, xd = (slice(dx, 8), slice(0, 8 - dx)) if dx >= 0 else (slice(0, 8 + dx), slice(-dx, 8))
                shifted[:, yd, xd] = x[i][:, ys, xs]
                ok |= torch.equal(shifted, out[i])
        assert ok, f"sample {i} is not a padded crop"
    assert random_crop(x, 0, g) is x


def test_random_flip_flips_about_half():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1000, 1, 3, 3)
    out = random_flip(x, g)
    flipped = (out == x.flip(-1)).flatten(1).all(1) & ~(out == x).flatten(1).all(1)
    same = (out == x).flatten(1).all(1)
    assert torch.all(flipped | same) and 400 < int(flipped.sum()) < 600


def test_to_uint8_rounds_and_clips():
    assert to_uint8(torch.tensor([-0.1, 0.0, 0.5, 1.0, 1.2])).tolist() == [0, 0, 128, 255, 255]
