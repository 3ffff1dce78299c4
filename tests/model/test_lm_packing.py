"""Packed documents: under cu_seqlens every document's logits equal running it alone, through the plain
path and through the sequence-parallel seam (a one-rank stand-in for parallel/sequence.py)."""
import pytest
import torch

from model.attention import document_starts

VOCAB = 97  # tests/model/conftest.py's small models
ROW = 70  # rows longer than one 64-token kernel chunk
# Documents of two packed rows: a 7-token one, one crossing the chunk boundary, a 1-token one.
CU_SEQLENS = torch.tensor([0, 7, 70, 71, 100, 140], dtype=torch.int32)


def test_documents_are_isolated(make_lm, pattern):
    lm = make_lm(pattern)
    ids = torch.randint(0, VOCAB, (2, ROW))
    with torch.no_grad():
        packed = lm(ids, cu_seqlens=CU_SEQLENS).flatten(0, 1)
        flat = ids.flatten()
        for start, end in zip(CU_SEQLENS[:-1].tolist(), CU_SEQLENS[1:].tolist()):
            alone = lm(flat[start:end][None])[0]
            torch.testing.assert_close(packed[start:end], alone, atol=1e-5, rtol=1e-4)


def test_rows_without_cu_seqlens_are_independent(make_lm):
    lm = make_lm("GMDAW")
    ids = torch.randint(0, VOCAB, (3, 11))
    with torch.no_grad():
        batched = lm(ids)
        torch.testing.assert_close(batched[1], lm(ids[1:2])[0], atol=1e-5, rtol=1e-4)


def test_bad_cu_seqlens_is_rejected(make_lm):
    lm = make_lm("A")
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        lm(torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4]))


class OneRankSequenceParallel:
    """The seam's contract with a single rank: no collectives, the batch's cu_seqlens inside."""

    def __init__(self, cu_seqlens: torch.Tensor, batch: int, seq_len: int):
        self.cu_seqlens, self.batch, self.seq_len = cu_seqlens, batch, seq_len
        self.calls = []

    def _flat(self, t):
        return t.reshape(1, self.batch * self.seq_len, *t.shape[2:])

    def positions(self):
        return torch.arange(self.seq_len)

    def doc_start(self):
        return document_starts(self.cu_seqlens, self.batch, self.seq_len, torch.device("cpu"))

    def scan(self, core, q, k, v, scale=None, **gates):
        self.calls.append(core.kernel)
        gates = {name: self._flat(g) for name, g in gates.items()}
        o, _ = core.chunk(self._flat(q), self._flat(k), self._flat(v), scale=scale, cu_seqlens=self.cu_seqlens, **gates)
        return o.view(*q.shape[:3], -1)

    def conv(self, x, weight, bias=None, activation=None):
        from kernels import causal_conv1d
        self.calls.append("conv")
        return causal_conv1d(self._flat(x), weight, bias, activation, cu_seqlens=self.cu_seqlens)[0].view(x.shape)

    def gather_kv(self, k, v, window=None):
        self.calls.append("gather_kv")
        return k, v, self.positions()


def test_sequence_parallel_seam(make_lm):
    """Every mixer routes its sequence mixing through sp (lm gets no cu_seqlens, so a bypass would
    mix documents and fail the comparison), with the calls COMMON.md names."""
    lm = make_lm("GMDAW")
    ids = torch.randint(0, VOCAB, (2, ROW))
    sp = OneRankSequenceParallel(CU_SEQLENS, 2, ROW)
    with torch.no_grad():
        torch.testing.assert_close(lm(ids, sp=sp), lm(ids, cu_seqlens=CU_SEQLENS), atol=1e-5, rtol=1e-4)
    assert sp.calls == ["conv"] * 3 + ["gla"] + ["conv", "gla_scalar"] + ["conv"] * 3 + [
        "gated_delta_rule"] + ["gather_kv"] * 2
