"""The sentencepiece tokenizer: exact round trip, determinism, options, loading, bad input."""
import pytest

from data.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer
from shard_fixtures import corpus


@pytest.fixture(scope="module")
def docs():
    return corpus(60, seed=1)


@pytest.fixture(scope="module")
def tokenizer(docs, tmp_path_factory):
    return train_tokenizer(docs, tmp_path_factory.mktemp("tok") / "a.model", TokenizerConfig(vocab_size=500))


def test_round_trip_is_exact(tokenizer, docs):
    texts = docs[:5] + ["", "  leading and trailing spaces  ", "tabs\tand\n\n\nblank lines\n",
                        "unseen: Ωμέγα 🙂 ∑ 漢字 \x00\x7f", "crlf\r\nline"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    assert tokenizer.eos_id not in tokenizer.encode(docs[0])


def test_training_is_deterministic_and_options_change_the_model(docs, tmp_path, tokenizer):
    again = train_tokenizer(docs, tmp_path / "b.model", TokenizerConfig(vocab_size=500))
    assert again.hash == tokenizer.hash
    assert again.encode(docs[3]) == tokenizer.encode(docs[3])
    unigram = train_tokenizer(docs, tmp_path / "c.model", TokenizerConfig(vocab_size=320, model_type="unigram"))
    assert unigram.hash != tokenizer.hash and unigram.decode(unigram.encode(docs[0])) == docs[0]


def test_vocab_size_special_ids_and_digit_splitting(docs, tmp_path, tokenizer):
    custom = train_tokenizer(docs, tmp_path / "d.model", TokenizerConfig(
        vocab_size=600, unk_id=0, eos_id=1, bos_id=-1, pad_id=2, split_digits=False))
    assert (custom.vocab_size, custom.eos_id, custom.bos_id, custom.pad_id) == (600, 1, -1, 2)
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id) == (500, 2, 1, 3)
    number = "9876543210"
    assert len(tokenizer.encode(number)) == len(number)  # split_digits: one piece per digit
    assert all(len(tokenizer.sp.id_to_piece(i)) == 1 for i in tokenizer.encode(number))


def test_load_existing_model(tokenizer, docs):
    loaded = Tokenizer(tokenizer.path)
    assert loaded.hash == tokenizer.hash and loaded.encode(docs[2]) == tokenizer.encode(docs[2])


def test_bad_tokenizer_input(tmp_path, docs):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model: not a sentencepiece model"):
        Tokenizer(tmp_path / "junk.model")
    with pytest.raises(ValueError, match="empty source"):
        train_tokenizer(["", ""], tmp_path / "e.model", TokenizerConfig(vocab_size=500))
    with pytest.raises(ValueError, match="tokenizer training failed"):
        train_tokenizer(docs[:1], tmp_path / "f.model", TokenizerConfig(vocab_size=60000))
    assert not (tmp_path / "f.model").exists()
    for bad in ({"model_type": "wordpiece"}, {"eos_id": -1}, {"bos_id": 2}, {"vocab_size": 100},
                {"character_coverage": 0}):
        with pytest.raises(ValueError, match="tokenizer"):
            TokenizerConfig(**bad)


def test_hugging_face_tokenizer_json(tmp_path):
    """An imported model's tokenizer.json: the same interface, EOS from its tokenizer_config.json (one line if absent)."""
    from data.tokenizer import HFTokenizer, open_tokenizer
    from tests.checkpoints.hf_models import make_tokenizer

    make_tokenizer(tmp_path)
    tokenizer = open_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(tokenizer, HFTokenizer) and (tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id) == (1, 0, 2)
    text = "def recurrent_state(self):\n    return 42 ∑"
    assert tokenizer.decode(tokenizer.encode(text)) == text and tokenizer.encode_batch([text]) == [tokenizer.encode(text)]
    assert tokenizer.files() == [tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json"]
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="no eos_token in tokenizer_config.json"):
        open_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        open_tokenizer(tmp_path / "broken.json")
