"""The VQ-VAE mask codec: vae-oid.npz's layout, the JAX port against an independent PyTorch build of the same
network (the weights' native framework), mask -> <seg> tokens -> mask, and clear errors for wrong files.

No real vae-oid.npz is available offline, so every test writes a randomly initialised codec with the file's
names, shapes and dtypes (`vqvae.random_codec_arrays`) and reads it back through the loader users call.
"""

from __future__ import annotations

import numpy as np
import pytest

from paligemma_ft.data import localization, masks
from paligemma_ft.evaluate import detection, segmentation
from paligemma_ft.model import vqvae


@pytest.fixture(scope="module")
def codec_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("codec") / "vae-oid.npz"
    np.savez(path, **vqvae.random_codec_arrays(0))
    return path


@pytest.fixture(scope="module")
def codec(codec_file):
    return vqvae.load_codec(str(codec_file))


def test_layout_is_big_visions_file():
    # The names big_vision reads (reference 9), with the shapes of the All-in-Tokens instance-mask VQ-VAE.
    names = set(vqvae.LAYOUT)
    assert {f"encoder.{i}.weight" for i in (0, 2, 4, 6, 10)} <= names
    assert {f"encoder.{b}.net.{k}.bias" for b in (8, 9) for k in (0, 2, 4)} <= names
    assert {f"decoder.{i}.weight" for i in (0, 4, 6, 8, 10, 12)} <= names
    assert {f"decoder.{b}.net.{k}.weight" for b in (2, 3) for k in (0, 2, 4)} <= names
    assert vqvae.LAYOUT["_vq_vae._embedding"] == (128, 512)
    assert vqvae.LAYOUT["encoder.0.weight"] == (16, 1, 4, 4)  # OIHW.
    assert vqvae.LAYOUT["decoder.10.weight"] == (32, 16, 4, 4)  # ConvTranspose2d: (in, out, kH, kW).
    assert vqvae.LAYOUT["decoder.12.weight"] == (1, 16, 1, 1)
    assert len(names) == 2 * (11 + 12) + 1  # Encoder 11 and decoder 12 convolutions (weight, bias), the codebook.
    arrays = vqvae.random_codec_arrays(3)
    assert {k: v.shape for k, v in arrays.items()} == vqvae.LAYOUT
    assert {v.dtype for v in arrays.values()} == {np.dtype(np.float32)}


def _torch_codec(arrays):
    """The same network built from torch.nn layers with the PyTorch-named weights loaded as they are."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(128, 128, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(128, 128, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(128, 128, 1),
            )

        def forward(self, x):
            return x + self.net(x)

    class Vae(nn.Module):
        def __init__(self):
            super().__init__()
            enc = []
            for c_in, c_out in ((1, 16), (16, 32), (32, 64), (64, 128)):
                enc += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
            self.encoder = nn.Sequential(*enc, Res(), Res(), nn.Conv2d(128, 512, 1))
            dec = [nn.Conv2d(512, 128, 1), nn.ReLU(), Res(), Res()]
            for c_in, c_out in ((128, 128), (128, 64), (64, 32), (32, 16)):
                dec += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
            self.decoder = nn.Sequential(*dec, nn.Conv2d(16, 1, 1))

    model = Vae()
    state = {k: torch.from_numpy(v) for k, v in arrays.items() if k != "_vq_vae._embedding"}
    model.load_state_dict(state)
    return torch, model, torch.from_numpy(arrays["_vq_vae._embedding"])


def test_jax_port_matches_pytorch(codec):
    arrays = vqvae.random_codec_arrays(0)
    torch, model, codebook = _torch_codec(arrays)
    rng = np.random.default_rng(1)
    m = np.zeros((4, 64, 64), np.float32)
    m[0, 10:40, 5:60] = 1
    m[1] = rng.random((64, 64)) > 0.5
    m[2] = rng.random((64, 64))  # Soft values, as the antialiased resize gives at the edges.
    with torch.no_grad():
        z = model.encoder(torch.from_numpy(2 * (m[:, None] - 0.5))).permute(0, 2, 3, 1).reshape(-1, 512)
        want = torch.cdist(z, codebook).argmin(1).reshape(4, 16).numpy()
        codes = rng.integers(0, 128, (3, 16))
        q = codebook[torch.from_numpy(codes).reshape(-1)].reshape(3, 4, 4, 512).permute(0, 3, 1, 2)
        want_masks = model.decoder(q)[:, 0].numpy()
    got = codec.encode(m)
    assert got.dtype == np.int32 and got.shape == (4, 16)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(codec.decode(codes), want_masks, rtol=1e-4, atol=1e-5)


def test_mask_to_tokens_to_mask_through_the_codec(codec):
    """A mask -> crop to its box -> 16 codes -> `<seg>` text -> parsed back -> decoded and pasted at full size."""
    h, w = 48, 80
    mask = np.zeros((h, w), bool)
    mask[12:30, 20:60] = True
    box = localization.normalise_box([20, 12, 60, 30], "xyxy", "pixel", w, h)
    codes = codec.encode(masks.codec_input(mask, box)[None])[0]
    text = localization.object_text(localization.loc_tokens(box) + localization.seg_tokens(codes), "box")
    (parsed,), ok = detection.parse_detections(text)
    assert ok and parsed.seg == tuple(int(c) for c in codes) and parsed.label == "box"
    assert [abs(a - b) for a, b in zip((parsed.y0, parsed.x0, parsed.y1, parsed.x1), box)] < [0.5 / 1023] * 4
    pasted = segmentation.predicted_masks([parsed], h, w, codec)[0]
    decoded = codec.decode(np.array([parsed.seg]))[0]
    assert pasted.shape == (h, w)
    # The decoded 64 x 64 mask, resized (bilinear) into the box at image resolution and thresholded; nothing outside.
    y0, x0, y1, x1 = int(parsed.y0 * h), int(parsed.x0 * w), int(parsed.y1 * h), int(parsed.x1 * w)
    want = masks.paste_mask(decoded, (parsed.y0, parsed.x0, parsed.y1, parsed.x1), h, w)
    np.testing.assert_array_equal(pasted, want)
    assert not pasted[:y0].any() and not pasted[y1:].any() and not pasted[:, :x0].any() and not pasted[:, x1:].any()


def test_codec_input_crops_and_resizes_like_big_vision():
    mask = np.zeros((100, 200), bool)
    mask[20:60, 50:150] = True  # Exactly the box: the crop is all ones.
    crop = masks.codec_input(mask, (0.2, 0.25, 0.6, 0.75))
    assert crop.shape == (64, 64) and crop.dtype == np.float32 and crop.min() == 1.0
    wider = masks.codec_input(mask, (0.2, 0.0, 0.6, 1.0))  # The object is the middle half of the crop.
    assert wider[:, :10].max() == 0.0 and wider[:, 22:42].min() == 1.0 and 0 < wider[:, 16].max() < 1  # Antialias.


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("decoder.12.bias"), r"missing arrays \['decoder.12.bias'\]"),
        (lambda a: a.update({"encoder.0.weight": np.zeros((16, 3, 4, 4), np.float32)}), r"encoder.0.weight has shape"),
        (lambda a: a.update({"decoder.4.weight": a["decoder.4.weight"].astype(np.float16)}), "dtype float16"),
        (lambda a: a.update({"params/img/x": np.zeros(3, np.float32)}), r"unexpected arrays \['params/img/x'\]"),
        (lambda a: a.update({"encoder.0.w": a.pop("encoder.0.weight")}), r"missing arrays \['encoder.0.weight'\]"),
    ],
)
def test_wrong_codec_file_fails_clearly(tmp_path, change, message):
    arrays = vqvae.random_codec_arrays(0)
    change(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message) as info:
        vqvae.load_codec(str(path))
    assert str(path) in str(info.value) and "vae-oid.npz layout" in str(info.value)


def test_training_buffers_of_the_pytorch_quantizer_are_accepted(tmp_path):
    arrays = vqvae.random_codec_arrays(0)
    arrays["_vq_vae._ema_w"] = np.zeros((128, 512), np.float32)
    arrays["_vq_vae._ema_cluster_size"] = np.zeros(128, np.float32)
    np.savez(tmp_path / "c.npz", **arrays)
    assert vqvae.load_codec(str(tmp_path / "c.npz")).encode(np.zeros((1, 64, 64))).shape == (1, 16)


def test_not_an_npz_and_missing_file(tmp_path, monkeypatch):
    (tmp_path / "x.npz").write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a readable .npz"):
        vqvae.load_codec(str(tmp_path / "x.npz"))
    monkeypatch.setenv("PALIGEMMA_FT_CODEC", str(tmp_path / "cache" / "vae-oid.npz"))
    with pytest.raises(FileNotFoundError) as info:
        vqvae.resolve_codec("oi")
    text = str(info.value)  # What to download, and where to put it.
    assert "https://storage.googleapis.com/big_vision/paligemma/vae-oid.npz" in text
    assert f"curl -L -o {tmp_path / 'cache' / 'vae-oid.npz'}" in text and "input.data.codec" in text
    with pytest.raises(ValueError, match="integer seed"):
        vqvae.load_codec("random:x")
