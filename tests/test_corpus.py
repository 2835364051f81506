import pytest

from sae_repro.corpus import load_corpus, tokenize_contexts, work_of
from sae_repro.models import ByteTokenizer


def test_default_corpus_split_by_work():
    c = load_corpus()
    assert len(c.train) > 40 and len(c.test) > 3
    assert not {work_of(d) for d in c.train} & {work_of(d) for d in c.test}  # no work on both sides
    assert sum(map(len, c.train.values())) > 5_000_000  # characters of real text
    assert "Lear" in " ".join(c.train.values()) + " ".join(c.test.values())
    assert c.fingerprint() == load_corpus().fingerprint()


def test_work_grouping():
    assert work_of("lear_gut_f.txt") == work_of("lear_gut.txt") == "lear"


def test_tokenize_contexts_bos_and_no_cross_document():
    docs = {"a": "x" * 25, "b": "y" * 9}
    ctx = tokenize_contexts(docs, ByteTokenizer(), ctx_len=5)
    assert ctx.shape == (6 + 2, 5)  # 25 // 4 = 6 contexts of 'a', 9 // 4 = 2 of 'b'
    assert (ctx[:, 0] == ByteTokenizer.bos_token_id).all()
    assert set(ctx[6:, 1:].flatten().tolist()) == {ord("y")}


def test_errors_name_the_parameter():
    with pytest.raises(ValueError, match="unknown corpus name"):
        load_corpus("not-a-corpus")
    with pytest.raises(ValueError, match="test_frac"):
        load_corpus(test_frac=1.5)
    with pytest.raises(ValueError, match="ctx_len"):
        tokenize_contexts({"a": "abc"}, ByteTokenizer(), ctx_len=1)


@pytest.mark.slow
def test_default_corpus_has_enough_tokens():
    from sae_repro.models import load_model

    tok = load_model().tokenizer
    c = load_corpus()
    n = sum(len(tok(t)["input_ids"]) for t in list(c.train.values()) + list(c.test.values()))
    assert n >= 1_500_000, n
