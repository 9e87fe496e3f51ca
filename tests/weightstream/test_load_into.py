"""load_into: a small transformer filled from S3 matches the same model loaded by safetensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, load_model, save_model
from torch import nn

import weightstream
from weightstream.errors import LoadMismatchError


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """A few pre-norm transformer blocks with tied input/output embeddings."""

    def __init__(self, vocab: int = 300, dim: int = 64, heads: int = 4, layers: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(32, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor(1.5))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)) * self.scale


@pytest.fixture
def saved_model(tmp_path, s3_prefix):
    model = TinyLM(seed=1)
    with torch.no_grad():
        model.scale.fill_(0.75)  # a buffer that differs from the fresh model's
    save_model(model, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    s3_prefix.upload(tmp_path)
    return model, tmp_path / "model.safetensors", s3_prefix.url()


def test_load_into_matches_safetensors_and_writes_in_place(saved_model):
    original, path, url = saved_model
    reference = TinyLM(seed=2)
    load_model(reference, str(path))
    model = TinyLM(seed=3)
    pointers = {name: p.data_ptr() for name, p in model.state_dict().items()}
    result = weightstream.load_into(model, url, range_size=64 * 1024, concurrency=4)
    assert result.missing == [] and result.unexpected == []
    assert {name: p.data_ptr() for name, p in model.state_dict().items()} == pointers  # filled in place, no copies
    assert model.head.weight is model.embed.weight
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval(), reference.eval(), original.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens), reference(tokens))
        assert torch.equal(model(tokens), original(tokens))
    assert result.stats.bytes_delivered == sum(t.numel() * t.element_size() for t in load_file(str(path)).values())


def test_load_into_other_dtype_copies_and_converts(saved_model):
    original, _, url = saved_model
    model = TinyLM(seed=4).double()
    weightstream.load_into(model, url)
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor.double()), name


def test_strict_mismatch_is_reported_before_any_data_is_read(saved_model, s3_prefix, fault_proxy):
    _, _, _ = saved_model
    url = s3_prefix.url(endpoint=fault_proxy.endpoint)
    bigger = TinyLM(layers=4, seed=5)
    fault_proxy.requests = 0
    with pytest.raises(LoadMismatchError, match=r"missing 12 \(blocks\.3\.") as error:
        weightstream.load_into(bigger, url)
    assert "strict=False" in str(error.value)
    assert fault_proxy.requests == 3  # two HEADs (index? single file?) + the header: nothing else
    result = weightstream.load_into(bigger, url, strict=False)
    assert len(result.missing) == 12 and result.unexpected == []
    smaller = TinyLM(layers=2, seed=6)
    with pytest.raises(LoadMismatchError, match=r"unexpected 12 \(blocks\.2\."):
        weightstream.load_into(smaller, url)
    wider = TinyLM(dim=32, seed=7)
    with pytest.raises(
        LoadMismatchError, match=r"tensor 'blocks\.0\.attn\.in_proj_bias' has shape \[192\], the module expects \[96\]"
    ):
        weightstream.load_into(wider, url)


def test_load_into_a_subset_with_a_filter(saved_model):
    original, _, url = saved_model
    model = TinyLM(seed=8)
    untouched = model.blocks[1].mlp[0].weight.detach().clone()
    weightstream.load_into(model, url, filter="blocks.0.*")
    assert torch.equal(model.blocks[0].attn.in_proj_weight, original.blocks[0].attn.in_proj_weight)
    assert torch.equal(model.blocks[1].mlp[0].weight, untouched)
