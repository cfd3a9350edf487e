"""Networks: the 2D UNet and its pretraining heads."""

from ssl_pretrain.models.unet import Decoder, Encoder, UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "Encoder", "Decoder"]
