"""Janus's VQ-VAE: a convolutional encoder/decoder around a codebook of image tokens.

Module names follow the transformers layout (``encoder.down.{i}.block.{j}``...) so its weights load
by name; DeepSeek's original names are mapped in ``original_layout.py``."""

import torch
from torch import nn
from torch.nn import functional as F

from .config import JanusVQVAEConfig


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    # x * sigmoid(x), as both references write it: F.silu rounds differently, and pixels then differ from theirs
    if torch.is_grad_enabled() and x.requires_grad:  # training (the VQ stage): autograd needs the sigmoid kept
        return x * torch.sigmoid(x)
    # decoding: the product written over the sigmoid (the same values; one temporary instead of two, which kept
    # a whole-image bf16 decode ~15% slower than F.silu)
    return torch.sigmoid(x).mul_(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, as 1x1 convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        # Two bmm's and a softmax in the input's dtype, as DeepSeek's VQ model and transformers' port compute
        # it: SDPA rounds differently in bf16/fp16, and decoded pixels then differ from theirs.
        batch, channels, height, width = x.shape
        h = self.norm(x)
        queries = self.q(h).reshape(batch, channels, height * width).permute(0, 2, 1)
        weights = torch.bmm(queries, self.k(h).reshape(batch, channels, height * width)) * (int(channels) ** -0.5)
        weights = F.softmax(weights, dim=2).permute(0, 2, 1)
        out = torch.bmm(self.v(h).reshape(batch, channels, height * width), weights)
        return x + self.proj_out(out.reshape(batch, channels, height, width))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as trained


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: residual blocks (with attention at the lowest resolution) and a resampler."""

    def __init__(self, channels_in: int, channels_out: int, num_blocks: int, with_attention: bool,
                 resample: type[nn.Module] | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(num_blocks):
            self.block.append(ResnetBlock(channels_in, channels_out))
            channels_in = channels_out
            if with_attention:
                self.attn.append(AttnBlock(channels_out))
        self.resample_name = resample_name
        if resample is not None:
            setattr(self, resample_name, resample(channels_out))

    def forward(self, x):
        for index, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[index](x)
        resampler = getattr(self, self.resample_name, None)
        return resampler(x) if resampler is not None else x


class Encoder(nn.Module):
    def __init__(self, config: JanusVQVAEConfig):
        super().__init__()
        base, mults = config.base_channels, list(config.channel_multiplier)
        self.conv_in = nn.Conv2d(config.in_channels, base, 3, padding=1)
        ins = [1] + mults
        last = len(mults) - 1
        self.down = nn.ModuleList(
            Level(base * ins[i], base * mults[i], config.num_res_blocks, i == last,
                  Downsample if i != last else None, "downsample") for i in range(len(mults)))
        channels = base * mults[-1]
        self.mid = MidBlock(channels)
        self.norm_out = _group_norm(channels)
        latent = 2 * config.latent_channels if config.double_latent else config.latent_channels
        self.conv_out = nn.Conv2d(channels, latent, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(_swish(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, config: JanusVQVAEConfig):
        super().__init__()
        base, mults = config.base_channels, list(config.channel_multiplier)
        channels = base * mults[-1]
        self.conv_in = nn.Conv2d(config.latent_channels, channels, 3, padding=1)
        self.mid = MidBlock(channels)
        self.up = nn.ModuleList()
        for i in reversed(range(len(mults))):
            out = base * mults[i]
            self.up.append(Level(channels, out, config.num_res_blocks + 1, i == len(mults) - 1,
                                 Upsample if i != 0 else None, "upsample"))
            channels = out
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, config.out_channels, 3, padding=1)

    def forward(self, x):
        x = self.mid(self.conv_in(x))
        for level in self.up:
            x = level(x)
        return self.conv_out(_swish(self.norm_out(x)))


class VectorQuantizer(nn.Module):
    """The codebook. Decoding L2-normalises the looked-up codes (both references agree on that)."""

    def __init__(self, config: JanusVQVAEConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.num_embeddings, config.embed_dim)

    def nearest_codes(self, latents: torch.Tensor, l2_normalized: bool = True) -> torch.Tensor:
        """Token ids [B, H*W] of the codes nearest to ``latents`` [B, C, H, W].

        DeepSeek's model L2-normalises latents and codebook before the search (``l2_normalized``);
        transformers 5 searches the raw codebook, which picks other codes for the same image."""
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        codebook = self.embedding.weight
        if l2_normalized:
            flat, codebook = F.normalize(flat, dim=-1), F.normalize(codebook, dim=-1)
        distances = (flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)
                     - 2 * flat @ codebook.t())
        return distances.argmin(dim=1).view(latents.shape[0], -1)

    def lookup(self, tokens: torch.Tensor, grid_side: int) -> torch.Tensor:
        """Normalised code vectors for ``tokens`` [B, side*side] as a latent map [B, C, side, side]."""
        codes = F.normalize(self.embedding(tokens), p=2, dim=-1)
        return codes.view(tokens.shape[0], grid_side, grid_side, -1).permute(0, 3, 1, 2).contiguous()


class JanusVQVAE(nn.Module):
    """Image <-> image tokens."""

    def __init__(self, config: JanusVQVAEConfig, grid_side: int):
        super().__init__()
        self.config = config
        self.grid_side = grid_side
        self.encoder = Encoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        self.decoder = Decoder(config)

    @property
    def patchwise(self) -> bool:
        """Whether this model's tokens were trained one patch at a time (see ``latents``); a vlmkit
        extension recorded in ``vq_config`` (``"patchwise_encoding": true``), false for DeepSeek's."""
        return bool(self.config.extra.get("patchwise_encoding", False))

    def latents(self, pixel_values: torch.Tensor, patchwise: bool | None = None) -> torch.Tensor:
        """The encoder's latents [B, embed_dim, H', W'] before quantisation. ``patchwise`` encodes each
        token's patch on its own, so a token depends on its patch alone: the encoder's group norms
        and attention otherwise mix the whole picture into every token, and the same patch of plain
        background gets a different token in every scene. Each patch is edge-padded by its own side
        (the group norms need more than one position to normalise over) and the centre latent kept.
        Defaults to ``self.patchwise``."""
        pixel_values = pixel_values.to(self.quant_conv.weight.dtype)
        if not (self.patchwise if patchwise is None else patchwise):
            return self.quant_conv(self.encoder(pixel_values))
        batch, channels, height, width = pixel_values.shape
        side = self.config.downsampling_factor
        rows, cols = height // side, width // side
        patches = pixel_values.unfold(2, side, side).unfold(3, side, side)  # [B, C, rows, cols, side, side]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch * rows * cols, channels * side * side)
        # identical patches (plain background, mostly) give identical latents: encode each once
        unique, inverse = torch.unique(patches, dim=0, return_inverse=True)
        padded = F.pad(unique.view(-1, channels, side, side), (side, side, side, side), mode="replicate")
        latents = self.quant_conv(self.encoder(padded))[..., 1, 1][inverse]  # [B*rows*cols, embed_dim]
        return latents.view(batch, rows, cols, -1).permute(0, 3, 1, 2)

    def encode(self, pixel_values: torch.Tensor, l2_normalized: bool = True,
               patchwise: bool | None = None) -> torch.Tensor:
        """Image token ids [B, H'*W'] of images [B, 3, H, W] normalised like the processor's output."""
        return self.quantize.nearest_codes(self.latents(pixel_values, patchwise), l2_normalized)

    def decode(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] (in the processor's normalised range) from image tokens [B, side*side]."""
        expected = self.grid_side * self.grid_side
        if image_tokens.ndim != 2 or image_tokens.shape[1] != expected:
            from ...errors import InputError
            raise InputError(f"image tokens must be shaped [batch, {expected}], got {tuple(image_tokens.shape)}")
        return self.decoder(self.post_quant_conv(self.quantize.lookup(image_tokens, self.grid_side)))
