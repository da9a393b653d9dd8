"""Stages 2-4 of the pipeline: a VITS text encoder, acoustic decoder and HiFi-GAN vocoder in torch.

Each stage is an `nn.Module` with a tensor contract (shapes below use B batch, T phonemes, F frames,
H hidden channels, C latent channels, G speaker-conditioning channels) so a user can swap in a
checkpoint of their own for any one of them:

  TextEncoder     ids [B,T] long, lengths [B]        -> hidden [B,H,T], m [B,C,T], logs [B,C,T], mask [B,1,T]
  AcousticDecoder hidden, m, logs, mask, scales, g?  -> latents [B,C,F], frame mask [B,1,F]
  Vocoder         latents [B,C,F], g?                -> waveform [B,1,F*hop] in [-1, 1]

The architecture is VITS (Kim et al., 2021) as Piper trains it; hyper-parameters are read from the
weights being loaded (see piper.py), so low/medium/high and multi-speaker Piper voices all fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LRELU_SLOPE = 0.1


@dataclass(frozen=True)
class VitsConfig:
    n_vocab: int = 256
    hidden: int = 192
    latent: int = 192  # C: inter channels
    filter: int = 768
    n_heads: int = 2
    n_layers: int = 6
    kernel: int = 3
    window: int = 4
    dp_filter: int = 192
    dp_kernel: int = 3
    dp_flows: int = 4
    flow_layers: int = 4  # coupling layers
    flow_wn_layers: int = 4
    flow_kernel: int = 5
    gin: int = 0  # speaker-conditioning channels (0: single speaker)
    n_speakers: int = 1
    up_initial: int = 256
    up_rates: tuple[int, ...] = (8, 8, 4)
    up_kernels: tuple[int, ...] = (16, 16, 8)
    rb_kernels: tuple[int, ...] = (3, 5, 7)
    rb_dilations: tuple[tuple[int, ...], ...] = ((1, 2), (2, 6), (3, 12))
    resblock: str = "2"

    @property
    def hop(self) -> int:
        return math.prod(self.up_rates)


class Pointwise(nn.Conv1d):
    """A kernel-1 Conv1d computed as a matrix product: same parameters, none of the per-call
    convolution set-up, which dominates on the short sequences of the text side."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.matmul(self.weight[:, :, 0], x)
        return y if self.bias is None else y + self.bias[:, None]


def sequence_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    n = int(max_len if max_len is not None else lengths.max())
    return torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]


class ChannelNorm(nn.Module):
    """LayerNorm over the channel axis of [B, C, T] (parameters named gamma/beta, as VITS has them)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.transpose(1, -1), (x.shape[1],), self.gamma, self.beta, self.eps)
        return x.transpose(1, -1)


# ---------------------------------------------------------------------- stage 2: text encoder
class RelativeAttention(nn.Module):
    """Multi-head self-attention with windowed relative position embeddings (shared across heads)."""

    def __init__(self, channels: int, n_heads: int, window: int) -> None:
        super().__init__()
        self.n_heads, self.window = n_heads, window
        self.k_channels = channels // n_heads
        self.conv_q = Pointwise(channels, channels)
        self.conv_k = Pointwise(channels, channels)
        self.conv_v = Pointwise(channels, channels)
        self.conv_o = Pointwise(channels, channels)
        self.emb_rel_k = nn.Parameter(torch.zeros(1, 2 * window + 1, self.k_channels))
        self.emb_rel_v = nn.Parameter(torch.zeros(1, 2 * window + 1, self.k_channels))

    def _relative(self, emb: Tensor, length: int) -> Tensor:
        pad = max(length - (self.window + 1), 0)
        start = max((self.window + 1) - length, 0)
        padded = F.pad(emb, [0, 0, pad, pad, 0, 0]) if pad > 0 else emb
        return padded[:, start : start + 2 * length - 1]

    @staticmethod
    def _rel_to_abs(x: Tensor) -> Tensor:
        b, h, n, _ = x.shape
        x = F.pad(x, [0, 1]).view(b, h, n * 2 * n)
        x = F.pad(x, [0, n - 1]).view(b, h, n + 1, 2 * n - 1)
        return x[:, :, :n, n - 1 :]

    @staticmethod
    def _abs_to_rel(x: Tensor) -> Tensor:
        b, h, n, _ = x.shape
        x = F.pad(x, [0, n - 1]).view(b, h, n * n + n * (n - 1))
        x = F.pad(x, [n, 0]).view(b, h, n, 2 * n)
        return x[:, :, :, 1:]

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        b, d, t = x.shape
        q = self.conv_q(x).view(b, self.n_heads, self.k_channels, t).transpose(2, 3)
        k = self.conv_k(x).view(b, self.n_heads, self.k_channels, t).transpose(2, 3)
        v = self.conv_v(x).view(b, self.n_heads, self.k_channels, t).transpose(2, 3)
        q = q / math.sqrt(self.k_channels)
        scores = q @ k.transpose(-2, -1)
        rel_k = self._relative(self.emb_rel_k, t)
        scores = scores + self._rel_to_abs(q @ rel_k.unsqueeze(0).transpose(-2, -1))
        scores = scores.masked_fill(attn_mask == 0, -1e4)
        p = torch.softmax(scores, dim=-1)
        out = p @ v + self._abs_to_rel(p) @ self._relative(self.emb_rel_v, t).unsqueeze(0)
        return self.conv_o(out.transpose(2, 3).reshape(b, d, t))


class FeedForward(nn.Module):
    def __init__(self, channels: int, filter_channels: int, kernel: int) -> None:
        super().__init__()
        self.pad = [(kernel - 1) // 2, kernel // 2]
        self.conv_1 = nn.Conv1d(channels, filter_channels, kernel)
        self.conv_2 = nn.Conv1d(filter_channels, channels, kernel)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = torch.relu(self.conv_1(F.pad(x * mask, self.pad)))
        return self.conv_2(F.pad(x * mask, self.pad)) * mask


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: VitsConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.attn_layers = nn.ModuleList(RelativeAttention(h, cfg.n_heads, cfg.window) for _ in range(cfg.n_layers))
        self.norm_layers_1 = nn.ModuleList(ChannelNorm(h) for _ in range(cfg.n_layers))
        self.ffn_layers = nn.ModuleList(FeedForward(h, cfg.filter, cfg.kernel) for _ in range(cfg.n_layers))
        self.norm_layers_2 = nn.ModuleList(ChannelNorm(h) for _ in range(cfg.n_layers))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        attn_mask = mask.unsqueeze(2) * mask.unsqueeze(-1)
        x = x * mask
        for attn, n1, ffn, n2 in zip(
            self.attn_layers, self.norm_layers_1, self.ffn_layers, self.norm_layers_2, strict=True
        ):
            x = n1(x + attn(x, attn_mask))
            x = n2(x + ffn(x, mask))
        return x * mask


class TextEncoder(nn.Module):
    """Stage 2: phoneme ids -> hidden states and the prior's statistics (mean, log-std) per phoneme."""

    def __init__(self, cfg: VitsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.n_vocab, cfg.hidden)
        self.encoder = TransformerEncoder(cfg)
        self.proj = Pointwise(cfg.hidden, cfg.latent * 2)

    def forward(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = (self.emb(ids) * math.sqrt(self.cfg.hidden)).transpose(1, 2)
        mask = sequence_mask(lengths, ids.shape[1]).unsqueeze(1).to(x.dtype)
        x = self.encoder(x * mask, mask)
        m, logs = torch.split(self.proj(x) * mask, self.cfg.latent, dim=1)
        return x, m, logs, mask


# ---------------------------------------------------------------------- stage 3: acoustic decoder
class DDSConv(nn.Module):
    """Dilated depth-separable convolutions (the duration predictor's workhorse)."""

    def __init__(self, channels: int, kernel: int, n_layers: int) -> None:
        super().__init__()
        self.convs_sep = nn.ModuleList()
        self.convs_1x1 = nn.ModuleList()
        self.norms_1 = nn.ModuleList()
        self.norms_2 = nn.ModuleList()
        for i in range(n_layers):
            dilation = kernel**i
            self.convs_sep.append(
                nn.Conv1d(
                    channels,
                    channels,
                    kernel,
                    groups=channels,
                    dilation=dilation,
                    padding=(kernel * dilation - dilation) // 2,
                )
            )
            self.convs_1x1.append(Pointwise(channels, channels))
            self.norms_1.append(ChannelNorm(channels))
            self.norms_2.append(ChannelNorm(channels))

    def forward(self, x: Tensor, mask: Tensor, g: Tensor | None = None) -> Tensor:
        if g is not None:
            x = x + g
        for sep, n1, c11, n2 in zip(self.convs_sep, self.norms_1, self.convs_1x1, self.norms_2, strict=True):
            y = F.gelu(n1(sep(x * mask)))
            x = x + F.gelu(n2(c11(y)))
        return x * mask


def _rational_quadratic_inverse(
    inputs: Tensor,
    uw: Tensor,
    uh: Tensor,
    ud: Tensor,
    bound: float,
    min_width: float = 1e-3,
    min_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> Tensor:
    """Inverse of a monotonic rational-quadratic spline on [-bound, bound], identity outside."""
    inside = (inputs >= -bound) & (inputs <= bound)
    out = inputs.clone()
    if not bool(inside.any()):
        return out
    x, uw, uh = inputs[inside], uw[inside], uh[inside]
    constant = math.log(math.exp(1 - min_derivative) - 1)
    ud = F.pad(ud[inside], (1, 1), value=constant)
    bins = uw.shape[-1]
    widths = min_width + (1 - min_width * bins) * torch.softmax(uw, -1)
    cumw = F.pad(torch.cumsum(widths, -1), (1, 0)) * 2 * bound - bound
    cumw[..., 0], cumw[..., -1] = -bound, bound
    widths = cumw[..., 1:] - cumw[..., :-1]
    derivs = min_derivative + F.softplus(ud)
    heights = min_height + (1 - min_height * bins) * torch.softmax(uh, -1)
    cumh = F.pad(torch.cumsum(heights, -1), (1, 0)) * 2 * bound - bound
    cumh[..., 0], cumh[..., -1] = -bound, bound
    heights = cumh[..., 1:] - cumh[..., :-1]
    edges = cumh.clone()
    edges[..., -1] += 1e-6
    idx = (torch.sum(x[..., None] >= edges, -1) - 1).clamp(0, bins - 1)[..., None]

    def pick(t: Tensor) -> Tensor:
        return t.gather(-1, idx)[..., 0]

    in_cumw, in_w, in_cumh, in_h = pick(cumw), pick(widths), pick(cumh), pick(heights)
    delta = pick(heights / widths)
    d0, d1 = pick(derivs), pick(derivs[..., 1:])
    rel = x - in_cumh
    a = rel * (d0 + d1 - 2 * delta) + in_h * (delta - d0)
    b = in_h * d0 - rel * (d0 + d1 - 2 * delta)
    c = -delta * rel
    root = (2 * c) / (-b - torch.sqrt(b.pow(2) - 4 * a * c))
    out[inside] = root * in_w + in_cumw
    return out


class ConvFlow(nn.Module):
    def __init__(self, channels: int, kernel: int, n_layers: int = 3, bins: int = 10, bound: float = 5.0) -> None:
        super().__init__()
        self.channels, self.bins, self.bound = channels, bins, bound
        self.pre = Pointwise(1, channels)
        self.convs = DDSConv(channels, kernel, n_layers)
        self.proj = Pointwise(channels, bins * 3 - 1)

    def reverse(self, x: Tensor, mask: Tensor, g: Tensor) -> Tensor:
        x0, x1 = x[:, :1], x[:, 1:]
        h = self.proj(self.convs(self.pre(x0), mask, g=g)) * mask
        b, _, t = x0.shape
        h = h.reshape(b, 1, -1, t).permute(0, 1, 3, 2)
        scale = math.sqrt(self.channels)
        uw, uh, ud = h[..., : self.bins] / scale, h[..., self.bins : 2 * self.bins] / scale, h[..., 2 * self.bins :]
        x1 = _rational_quadratic_inverse(x1, uw, uh, ud, self.bound)
        return torch.cat([x0, x1], 1) * mask


class StochasticDurationPredictor(nn.Module):
    """Log-durations per phoneme from noise through a normalising flow conditioned on the text."""

    def __init__(self, cfg: VitsConfig) -> None:
        super().__init__()
        c = cfg.dp_filter
        self.pre = Pointwise(cfg.hidden, c)
        self.proj = Pointwise(c, c)
        self.convs = DDSConv(c, cfg.dp_kernel, 3)
        self.cond = Pointwise(cfg.gin, c) if cfg.gin else None
        # Indices follow the trained module list: 0 affine, then (ConvFlow, Flip) pairs.
        self.flows = nn.ModuleDict({str(1 + 2 * i): ConvFlow(c, cfg.dp_kernel) for i in range(cfg.dp_flows)})
        self.register_buffer("affine_m", torch.zeros(2, 1))
        self.register_buffer("affine_logs", torch.zeros(2, 1))

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        noise_w: float | Tensor,
        g: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        x = self.pre(x)
        if g is not None and self.cond is not None:
            x = x + self.cond(g)
        x = self.proj(self.convs(x, mask)) * mask
        z = torch.randn(x.shape[0], 2, x.shape[2], device=x.device, dtype=x.dtype, generator=generator)
        z = z * per_item(noise_w, x)
        # Reverse order; the first ConvFlow is not used at inference (VITS drops it).
        for i in reversed(range(1, len(self.flows))):
            z = torch.flip(z, [1])
            flow = self.flows[str(1 + 2 * i)]
            assert isinstance(flow, ConvFlow)
            z = flow.reverse(z, mask, x)
        z = torch.flip(z, [1])
        z = (z - self.get_buffer("affine_m")) * torch.exp(-self.get_buffer("affine_logs")) * mask
        return z[:, :1]


class WaveNet(nn.Module):
    def __init__(self, hidden: int, kernel: int, n_layers: int, gin: int) -> None:
        super().__init__()
        self.hidden, self.n_layers = hidden, n_layers
        self.in_layers = nn.ModuleList(
            nn.Conv1d(hidden, 2 * hidden, kernel, padding=(kernel - 1) // 2) for _ in range(n_layers)
        )
        self.res_skip_layers = nn.ModuleList(
            Pointwise(hidden, 2 * hidden if i < n_layers - 1 else hidden) for i in range(n_layers)
        )
        self.cond_layer = Pointwise(gin, 2 * hidden * n_layers) if gin else None

    def forward(self, x: Tensor, mask: Tensor, g: Tensor | None = None) -> Tensor:
        out = torch.zeros_like(x)
        cond = self.cond_layer(g) if g is not None and self.cond_layer is not None else None
        for i, (inl, rs) in enumerate(zip(self.in_layers, self.res_skip_layers, strict=True)):
            a = inl(x)
            if cond is not None:
                a = a + cond[:, i * 2 * self.hidden : (i + 1) * 2 * self.hidden]
            acts = torch.tanh(a[:, : self.hidden]) * torch.sigmoid(a[:, self.hidden :])
            r = rs(acts)
            if i < self.n_layers - 1:
                x = (x + r[:, : self.hidden]) * mask
                out = out + r[:, self.hidden :]
            else:
                out = out + r
        return out * mask


class CouplingLayer(nn.Module):
    def __init__(self, cfg: VitsConfig) -> None:
        super().__init__()
        self.split = cfg.latent // 2
        self.pre = Pointwise(self.split, cfg.hidden)
        self.enc = WaveNet(cfg.hidden, cfg.flow_kernel, cfg.flow_wn_layers, cfg.gin)
        self.post = Pointwise(cfg.hidden, self.split)

    def reverse(self, x: Tensor, mask: Tensor, g: Tensor | None) -> Tensor:
        x0, x1 = x[:, : self.split], x[:, self.split :]
        m = self.post(self.enc(self.pre(x0) * mask, mask, g)) * mask
        return torch.cat([x0, (x1 - m) * mask], 1)


def generate_path(durations: Tensor, mask: Tensor) -> Tensor:
    """Hard monotonic alignment [B,1,F,T] from integer durations [B,1,T]."""
    b, _, t_y, t_x = mask.shape
    cum = torch.cumsum(durations, -1).view(b * t_x)
    path = sequence_mask(cum, t_y).to(mask.dtype).view(b, t_x, t_y)
    path = path - F.pad(path, [0, 0, 1, 0, 0, 0])[:, :-1]
    return path.unsqueeze(1).transpose(2, 3) * mask


@dataclass(frozen=True)
class Scales:
    """Sampling controls: a float for the whole batch, or a [B] tensor (one value per request)."""

    noise_scale: float | Tensor = 0.667
    length_scale: float | Tensor = 1.0
    noise_w: float | Tensor = 0.8


def per_item(value: float | Tensor, like: Tensor) -> Tensor:
    """A scale broadcastable against [B, C, T]."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(-1, 1, 1)


class AcousticDecoder(nn.Module):
    """Stage 3: durations, length regulation onto frames, and the flow from the prior to latents."""

    def __init__(self, cfg: VitsConfig) -> None:
        super().__init__()
        self.dp = StochasticDurationPredictor(cfg)
        self.flows = nn.ModuleDict({str(2 * i): CouplingLayer(cfg) for i in range(cfg.flow_layers)})

    def forward(
        self,
        hidden: Tensor,
        m: Tensor,
        logs: Tensor,
        mask: Tensor,
        scales: Scales,
        g: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        logw = self.dp(hidden, mask, scales.noise_w, g, generator)
        w_ceil = torch.ceil(torch.exp(logw) * mask * per_item(scales.length_scale, logw))
        frames = torch.clamp_min(torch.sum(w_ceil, [1, 2]), 1).long()
        y_mask = sequence_mask(frames).unsqueeze(1).to(mask.dtype)
        attn = generate_path(w_ceil, mask.unsqueeze(2) * y_mask.unsqueeze(-1)).squeeze(1)
        m_f = (attn @ m.transpose(1, 2)).transpose(1, 2)
        logs_f = (attn @ logs.transpose(1, 2)).transpose(1, 2)
        noise = torch.randn(m_f.shape, device=m_f.device, dtype=m_f.dtype, generator=generator)
        z = m_f + noise * torch.exp(logs_f) * per_item(scales.noise_scale, m_f)
        for i in reversed(range(len(self.flows))):
            z = torch.flip(z, [1])
            layer = self.flows[str(2 * i)]
            assert isinstance(layer, CouplingLayer)
            z = layer.reverse(z, y_mask, g)
        return z * y_mask, y_mask


# ---------------------------------------------------------------------- stage 4: vocoder
# The vocoder runs its 1-D convolutions as 2-D ones over [B, C, 1, T] in channels-last layout: the
# same weights and results, but oneDNN's NHWC kernels are ~1.6x faster on the long, narrow signals
# of the last upsampling stages (and channels-last suits tensor cores in half precision).
def _as_2d(x: Tensor) -> Tensor:
    return x.unsqueeze(2).contiguous(memory_format=torch.channels_last)


def _conv(conv: nn.Module, x: Tensor) -> Tensor:
    assert isinstance(conv, nn.Conv1d)
    padding = int(conv.padding[0])
    return F.conv2d(
        x, conv.weight.unsqueeze(2), conv.bias, (1, conv.stride[0]), (0, padding), (1, conv.dilation[0]), conv.groups
    )


def _conv_t(conv: nn.Module, x: Tensor) -> Tensor:
    assert isinstance(conv, nn.ConvTranspose1d)
    padding = int(conv.padding[0])
    return F.conv_transpose2d(x, conv.weight.unsqueeze(2), conv.bias, (1, conv.stride[0]), (0, padding))


class ResBlock(nn.Module):
    """HiFi-GAN residual block; type "2" has one conv per dilation, type "1" two."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...], kind: str) -> None:
        super().__init__()

        def conv(d: int) -> nn.Conv1d:
            return nn.Conv1d(channels, channels, kernel, dilation=d, padding=(kernel * d - d) // 2)

        self.kind = kind
        if kind == "1":
            self.convs1 = nn.ModuleList(conv(d) for d in dilations)
            self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        else:
            self.convs = nn.ModuleList(conv(d) for d in dilations)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """[B, C, 1, T] channels-last in and out; zero where `mask` ([B, 1, 1, T]) is, as it came in."""
        # In-place where the tensor is our own: big fresh allocations cost page faults on every call.
        if self.kind == "1":
            for c1, c2 in zip(self.convs1, self.convs2, strict=True):
                inner = _masked(_conv(c1, F.leaky_relu(x, LRELU_SLOPE)), mask)
                x = _masked(_conv(c2, F.leaky_relu_(inner, LRELU_SLOPE)).add_(x), mask)
            return x
        for c in self.convs:
            x = _masked(_conv(c, F.leaky_relu(x, LRELU_SLOPE)).add_(x), mask)
        return x


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the padded frames in place, so the next convolution sees the zeros an unpadded item has."""
    return x if mask is None else x.mul_(mask)


def padding_mask(z: Tensor) -> Tensor | None:
    """[B, 1, 1, F] frame mask of a padded batch of latents, or None when nothing is padded.

    Read from the latents themselves: the acoustic decoder zeroes every frame past an item's end, and
    a real frame is never exactly zero in all C channels. That keeps the vocoder's contract
    (z, g) -> waveform, so a user's own vocoder still fits."""
    if z.shape[0] == 1:
        return None
    voiced = z.detach().abs().amax(dim=1) > 0  # [B, F]
    n = voiced.shape[1]
    frames = n - voiced.flip(1).int().argmax(dim=1)  # one past the last voiced frame
    frames = torch.where(voiced.any(dim=1), frames, n)
    if bool((frames == n).all()):
        return None
    return sequence_mask(frames, n).to(z.dtype)[:, None, None, :]


def _upsampled(mask: Tensor | None, rate: int) -> Tensor | None:
    return None if mask is None else mask.repeat_interleave(rate, dim=-1)


class Vocoder(nn.Module):
    """Stage 4: HiFi-GAN generator, latents [B,C,F] -> waveform [B,1,F*hop]."""

    def __init__(self, cfg: VitsConfig) -> None:
        super().__init__()
        self.conv_pre = nn.Conv1d(cfg.latent, cfg.up_initial, 7, padding=3)
        self.cond = Pointwise(cfg.gin, cfg.up_initial) if cfg.gin else None
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        ch = cfg.up_initial
        for u, k in zip(cfg.up_rates, cfg.up_kernels, strict=True):
            self.ups.append(nn.ConvTranspose1d(ch, ch // 2, k, u, padding=(k - u) // 2))
            ch //= 2
            for rk, rd in zip(cfg.rb_kernels, cfg.rb_dilations, strict=True):
                self.resblocks.append(ResBlock(ch, rk, rd, cfg.resblock))
        self.n_kernels = len(cfg.rb_kernels)
        self.rates = cfg.up_rates
        self.conv_post = nn.Conv1d(ch, 1, 7, padding=3, bias=False)

    def forward(self, z: Tensor, g: Tensor | None = None) -> Tensor:
        """In a padded batch every stage's input is masked: each item's audio equals its unbatched audio
        (a convolution's receptive field would otherwise carry the padding into an item's last samples)."""
        mask = padding_mask(z)
        x = self.conv_pre(z)
        if g is not None and self.cond is not None:
            x = x + self.cond(g)
        x = _masked(_as_2d(x), mask)
        for i, up in enumerate(self.ups):
            mask = _upsampled(mask, self.rates[i])
            x = _masked(_conv_t(up, F.leaky_relu_(x, LRELU_SLOPE)), mask)
            blocks = self.resblocks[i * self.n_kernels : (i + 1) * self.n_kernels]
            acc = blocks[0](x, mask)
            for rb in blocks[1:]:
                acc.add_(rb(x, mask))
            x = acc.div_(self.n_kernels)
        return torch.tanh_(_conv(self.conv_post, F.leaky_relu_(x))).squeeze(2).contiguous()
