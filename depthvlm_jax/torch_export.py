"""PyTorch DepthVLM for export: HF `Qwen3VLForConditionalGeneration` plus our PyTorch depth heads.

`DepthVLMForConditionalGeneration.from_pretrained(DIR)` loads a directory written by
`python -m depthvlm_jax.export` (or the official DepthVLM checkpoint layout) strictly: backbone keys
`model.*`, `lm_head.*` and head keys `depth_head.*`. The heads follow the official
checkpoint's module names, including the official in-place ReLU of the residual conv unit (the
residual adds relu(x)). Depth is computed per image here (reference code, not a training path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers


class ResidualConvUnit(torch.nn.Module):

  def __init__(self, f):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(f, f, 3, padding=1)
    self.conv2 = torch.nn.Conv2d(f, f, 3, padding=1)
    self.act = torch.nn.ReLU(inplace=True)  # as in the official head: also rectifies the residual x

  def forward(self, x):
    y = self.act(x)
    y = self.conv2(self.act(self.conv1(y)))
    return y + x


class FusionBlock(torch.nn.Module):

  def __init__(self, f, residual):
    super().__init__()
    if residual:
      self.resConfUnit1 = ResidualConvUnit(f)
    self.resConfUnit2 = ResidualConvUnit(f)
    self.out_conv = torch.nn.Conv2d(f, f, 1)

  def forward(self, x, skip=None, size=None):
    if skip is not None:
      x = x + self.resConfUnit1(skip)
    x = self.resConfUnit2(x)
    if size is None:
      x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    else:
      x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    return self.out_conv(x)


class DPTDepthHead(torch.nn.Module):

  def __init__(self, c, features=256, out_channels=(256, 512, 1024, 1024), head_features=32):
    super().__init__()
    self.norm = torch.nn.LayerNorm(c)
    self.projects = torch.nn.ModuleList([torch.nn.Conv2d(c, o, 1) for o in out_channels])
    self.resize_layers = torch.nn.ModuleList(
        [torch.nn.ConvTranspose2d(out_channels[i], out_channels[i], k, stride=k) for i, k in enumerate((8, 4, 2))]
        + [torch.nn.Identity()])
    s = torch.nn.Module()
    for i in range(4):
      setattr(s, f"layer{i + 1}_rn", torch.nn.Conv2d(out_channels[i], features, 3, padding=1, bias=False))
      setattr(s, f"refinenet{i + 1}", FusionBlock(features, residual=i < 3))
    s.output_conv1 = torch.nn.Conv2d(features, features // 2, 3, padding=1)
    s.output_conv2 = torch.nn.Sequential(torch.nn.Conv2d(features // 2, head_features, 3, padding=1),
                                         torch.nn.ReLU(inplace=True), torch.nn.Conv2d(head_features, 1, 1),
                                         torch.nn.Softplus())
    self.scratch = s

  def forward(self, feats, h, w, output_size=None):  # feats: 4 x (B, h*w, C)
    pyr = []
    for i, x in enumerate(feats):
      x = self.norm(x).permute(0, 2, 1).reshape(x.shape[0], -1, h, w)
      pyr.append(self.resize_layers[i](self.projects[i](x)))
    s = self.scratch
    rn = [getattr(s, f"layer{i + 1}_rn")(x) for i, x in enumerate(pyr)]
    out = s.refinenet4(rn[3], size=rn[2].shape[2:])
    out = s.refinenet3(out, rn[2], size=rn[1].shape[2:])
    out = s.refinenet2(out, rn[1], size=rn[0].shape[2:])
    out = s.refinenet1(out, rn[0])
    out = s.output_conv1(out)
    out = F.interpolate(out, size=output_size or (32 * h, 32 * w), mode="bilinear", align_corners=True)
    return s.output_conv2(out)[:, 0]


class MLPDepthHead(torch.nn.Module):

  def __init__(self, c, mode, hidden=1024, patch=32):
    super().__init__()
    self.mode, self.p = mode, patch
    c_in = 4 * c if mode == "concat" else c
    self.norm = torch.nn.LayerNorm(c_in)
    self.mlp = torch.nn.Sequential(torch.nn.Linear(c_in, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, patch ** 2))

  def forward(self, feats, h, w, output_size=None):
    x = {"llm_last": lambda: feats[3], "concat": lambda: torch.cat(feats, -1), "sum": lambda: sum(feats)}[self.mode]()
    b, p = x.shape[0], self.p
    x = self.mlp(self.norm(x)).view(b, h, w, p, p).permute(0, 1, 3, 2, 4).reshape(b, h * p, w * p)
    if output_size is not None and tuple(output_size) != (h * p, w * p):
      x = F.interpolate(x[:, None], size=output_size, mode="bilinear", align_corners=True)[:, 0]
    return F.softplus(x)


def make_torch_depth_head(config) -> torch.nn.Module:
  """The head described by the top-level `depth_head_*` fields of a DepthVLM config."""
  head_type = getattr(config, "depth_head_type", "dpt")
  c = config.text_config.hidden_size
  if head_type == "dpt":
    return DPTDepthHead(c, features=getattr(config, "depth_head_features", 256),
                        out_channels=tuple(getattr(config, "depth_head_out_channels", (256, 512, 1024, 1024))),
                        head_features=getattr(config, "depth_head_head_features", 32))
  if head_type == "mlp":
    return MLPDepthHead(c, getattr(config, "depth_head_feature_mode", "llm_last"),
                        hidden=getattr(config, "depth_head_mlp_hidden", 1024))
  raise ValueError(f"config.depth_head_type={head_type!r}; expected 'dpt' or 'mlp'")


class DepthVLMForConditionalGeneration(transformers.Qwen3VLForConditionalGeneration):
  """Qwen3-VL with a `depth_head`; `depth_forward` returns logits and one depth map per image."""

  def __init__(self, config):
    super().__init__(config)
    self.depth_head = make_torch_depth_head(config)

  @torch.no_grad()
  def depth_forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, output_size=None):
    mm = (input_ids == self.config.image_token_id).int()
    out = self(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm,
               pixel_values=pixel_values, image_grid_thw=image_grid_thw, output_hidden_states=True)
    feats = self.model.get_image_features(pixel_values, image_grid_thw)
    last = out.hidden_states[-1][input_ids == self.config.image_token_id]
    merge = self.config.vision_config.spatial_merge_size
    depths, start = [], 0
    for i, (_, gh, gw) in enumerate(image_grid_thw.tolist()):
      h, w = gh // merge, gw // merge
      maps = [lvl[i][None] for lvl in feats.deepstack_features] + [last[start:start + h * w][None]]
      depths.append(self.depth_head(maps, h, w, output_size)[0])
      start += h * w
    return out.logits, depths
