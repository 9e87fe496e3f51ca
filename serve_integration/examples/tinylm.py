"""A small, real causal language model for CPU: the twin of a vLLM replica that runs here.

Byte-level tokens (vocabulary 256), learned positions, pre-norm transformer blocks
(multi-head causal self-attention and a GELU MLP), a tied-free output head; greedy
decoding. Sizes are configurable: tests use a few hundred KB, the scale-up benchmark
about 1.5 GB. Weights are random but deterministic (a seed), stored as safetensors with
a config.json beside them, as a Hugging Face checkpoint would be.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class TinyConfig:
    vocab: int = 256
    dim: int = 256
    layers: int = 4
    heads: int = 4
    context: int = 256

    @classmethod
    def from_json(cls, text: str) -> TinyConfig:
        return cls(**{k: v for k, v in json.loads(text).items() if k in cls.__dataclass_fields__})

    def to_json(self) -> str:
        return json.dumps({"model_type": "liftoff-tinylm", **asdict(self)}, indent=1)


class Block(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.norm1 = nn.LayerNorm(config.dim)
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.norm2 = nn.LayerNorm(config.dim)
        self.up = nn.Linear(config.dim, 4 * config.dim)
        self.down = nn.Linear(4 * config.dim, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(dim, dim=2)
        shape = (batch, length, self.heads, dim // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    """Byte-level causal LM: tokens -> logits."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.position = nn.Embedding(config.context, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    @torch.inference_mode()
    def generate(self, prompt: str, max_new_tokens: int = 16) -> str:
        """Greedy continuation of `prompt` (bytes in, bytes out; undecodable bytes are replaced)."""
        tokens = torch.tensor([list(prompt.encode()[-self.config.context :]) or [0]], dtype=torch.long)
        out = []
        for _ in range(max_new_tokens):
            logits = self(tokens[:, -self.config.context :])
            token = int(logits[0, -1].argmax())
            out.append(token)
            tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
        return bytes(out).decode("utf-8", "replace")


def build(config: TinyConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyLM:
    """A model with deterministic random weights."""
    torch.manual_seed(seed)
    return TinyLM(config).to(dtype).eval()


def save_checkpoint(
    directory: str | Path, config: TinyConfig, seed: int = 0, dtype: torch.dtype = torch.float32, shards: int = 1
) -> TinyLM:
    """Write config.json and model.safetensors (or `shards` files and an index) for a seeded model."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = build(config, seed, dtype)
    (directory / "config.json").write_text(config.to_json())
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if shards <= 1:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return model
    names = list(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return model


def parameter_bytes(config: TinyConfig, dtype: torch.dtype = torch.float32) -> int:
    """The checkpoint's size for a config (without building it)."""
    d = config.dim
    per_block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    total = config.vocab * d + config.context * d + config.layers * per_block + 2 * d + config.vocab * d
    return total * torch.tensor([], dtype=dtype).element_size()
