"""Language-model data and model: corpora, tokenising, splits, batches, the model itself."""

import pytest
import torch

from lstm_ext.lm import data
from lstm_ext.lm.model import LanguageModel, sample_next


def test_default_corpus_exists_and_splits():
    corpus = data.load_corpus(None, "char")
    assert "standard library" in corpus.source
    sizes = [len(corpus.train), len(corpus.valid), len(corpus.test)]
    assert sizes[0] > 500_000 and sizes[1] > 10_000 and sizes[2] > 10_000
    assert abs(sizes[1] / sum(sizes) - 0.05) < 0.01
    assert corpus.train.dtype == torch.long and int(corpus.train.max()) < len(corpus.vocabulary)


def test_word_level_file_with_unknown_words(tmp_path):
    lines = [f"the cat sat on mat number {i % 7}" for i in range(200)]
    lines[195] = "a zebra appears"  # only in the test split
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    corpus = data.load_corpus(path, "word")
    itos = corpus.vocabulary.itos
    assert data.EOS in itos and data.UNK in itos and "zebra" not in itos
    test_tokens = [itos[i] for i in corpus.test.tolist()]
    assert test_tokens.count(data.UNK) >= 2 and test_tokens.count(data.EOS) == len(lines) - 190


@pytest.mark.parametrize("names", [("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"),
                                   ("train.txt", "valid.txt", "test.txt"),
                                   ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")])
def test_folder_layouts(tmp_path, names):
    for name, text in zip(names, ["a b c\nd e\n", "a b\n", "c d\n"]):
        (tmp_path / name).write_text(text)
    corpus = data.load_corpus(tmp_path, "word")
    assert [corpus.vocabulary.itos[i] for i in corpus.valid.tolist()] == ["a", "b", data.EOS]


def test_cleaning_can_be_turned_off(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("ab  \r\ncd\x07\n" * 100)
    cleaned = data.load_corpus(path, "char")
    raw = data.load_corpus(path, "char", cleaning=False)
    assert "\r" not in cleaned.vocabulary.itos and "\x07" not in cleaned.vocabulary.itos
    assert "\x07" in raw.vocabulary.itos


def test_bad_data_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="tokens"):
        data.load_corpus(tmp_path / "empty.txt")
    (tmp_path / "train.txt").write_text("a b\n")
    with pytest.raises(FileNotFoundError, match="no valid split"):
        data.load_corpus(tmp_path, "word")
    with pytest.raises(ValueError, match="--level"):
        data.load_corpus(None, "byte")


def test_batchify_and_windows_cover_the_stream_in_order():
    ids = torch.arange(103)
    columns = data.batchify(ids, 4)
    assert columns.shape == (25, 4) and columns[:, 1].tolist() == list(range(25, 50))
    windows = list(data.bptt_windows(columns, 7))
    inputs = torch.cat([x for x, _ in windows])
    targets = torch.cat([y for _, y in windows])
    assert torch.equal(inputs, columns[:-1]) and torch.equal(targets, columns[1:])
    with pytest.raises(ValueError, match="batch-size"):
        data.batchify(torch.arange(5), 4)


def test_same_seed_same_initial_weights_for_both_implementations():
    models = []
    for impl in ("ext", "torch"):
        torch.manual_seed(0)
        models.append(LanguageModel(50, 16, 32, 2, dropout=0.1, impl=impl))
    for (name, a), (_, b) in zip(*(m.state_dict().items() for m in models)):
        assert torch.equal(a, b), name


def test_tied_weights_need_matching_sizes():
    model = LanguageModel(50, 16, 32, 2, proj_size=16, tied=True)
    assert model.decoder.weight is model.embedding.weight
    with pytest.raises(ValueError, match="--proj-size 16"):
        LanguageModel(50, 16, 32, 2, tied=True)


def test_sampling():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=0).tolist() == [1, 0]
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, top_k=1, generator=generator) for _ in range(20)])
    assert (draws == torch.tensor([1, 0])).all()
