"""UNet shapes and the export contract (weights_only load into a fresh UNet)."""

from __future__ import annotations

import pytest
import torch

from ssl_pretrain.export import EXPORT_FORMAT_VERSION, ExportError, load_export, save_export
from ssl_pretrain.models import UNet, UNetConfig


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_unet_shapes(norm):
    cfg = UNetConfig(in_channels=2, widths=(4, 8, 16), norm=norm)
    net = UNet(cfg, out_channels=3)
    x = torch.randn(2, 2, 16, 24)
    feats = net.encoder(x)
    assert [f.shape[1:] for f in feats] == [(4, 16, 24), (8, 8, 12), (16, 4, 6)]
    assert net.decoder(feats)[-1].shape == (2, 4, 16, 24)
    assert net(x).shape == (2, 3, 16, 24)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 2, 18, 16))


def test_export_roundtrip(tmp_path):
    cfg = UNetConfig(widths=(4, 8))
    net = UNet(cfg, out_channels=2)
    path = save_export(tmp_path / "export" / "model.pt", task="regression", model_config=cfg,
                       encoder_state=net.encoder.state_dict(), decoder_state=net.decoder.state_dict(),
                       preprocessing={"size": [16, 16]}, info={"steps": 3})
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == EXPORT_FORMAT_VERSION and raw["head"] is None
    data = load_export(path)
    fresh = UNet(data["model_config"], out_channels=2)
    fresh.encoder.load_state_dict(data["encoder"])
    fresh.decoder.load_state_dict(data["decoder"])
    for a, b in zip(fresh.encoder.parameters(), net.encoder.parameters(), strict=True):
        assert torch.equal(a, b)
    assert data["info"] == {"steps": 3}
    assert not list(path.parent.glob(".model.pt.*")), "temporary file left behind"


def test_export_errors(tmp_path):
    with pytest.raises(ExportError, match="nope.pt: export file not found"):
        load_export(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ExportError, match="junk.pt: not a loadable model export"):
        load_export(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(ExportError, match="other.pt: not an mri-ssl model export"):
        load_export(other)
    cfg = UNetConfig(widths=(4, 8))
    path = save_export(tmp_path / "m.pt", task="random", model_config=cfg,
                       encoder_state=UNet(cfg, 1).encoder.state_dict(), decoder_state=None, preprocessing={})
    data = torch.load(path, weights_only=True)
    data["format_version"] = 99
    torch.save(data, path)
    with pytest.raises(ExportError, match="m.pt: export format version 99"):
        load_export(path)
