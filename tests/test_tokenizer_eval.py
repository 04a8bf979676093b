"""tokenizer_eval.py: metrics equal hand-computed values; the sweep's truncated BPEs are real BPEs."""

import csv

import pytest
import tiktoken

import gguf_file
import tokenizer
from tokenizer_eval import (TextStats, embedded_vocab_size, main, parallel_sample, text_stats, word_spans,
                            truncate_bpe)


def toy_encoding(merges: list[bytes]) -> tiktoken.Encoding:
    """256 bytes, then `merges` in rank order; letters with an optional leading space, or else
    a run of other non-space characters, or whitespace, are the chunks."""
    ranks = {bytes([b]): b for b in range(256)}
    for tok in merges:
        ranks[tok] = len(ranks)
    return tiktoken.Encoding(name="toy", pat_str=r" ?\p{L}+| ?[^\s\p{L}]+|\s+", mergeable_ranks=ranks,
                             special_tokens={})


def prefixes(s: str) -> list[bytes]:
    """Merges that build s left to right one byte at a time, so that s becomes one token."""
    raw = s.encode()
    return [raw[:i] for i in range(2, len(raw) + 1)]


def words(text: str) -> list[str]:
    return [text[a:b] for a, b in word_spans(text)]


def test_words_split_by_script():
    assert words("Hello, world! don't stop") == ["Hello", "world", "don't", "stop"]
    assert words("aujourd'hui l’eau 3.14 x2") == ["aujourd'hui", "l’eau", "3", "14", "x2"]
    assert words("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]  # vowel signs (marks) stay in the word
    assert words("你好，世界。") == ["你", "好", "世", "界"]  # no spaces: one word per character
    assert words("私はコンピューターを") == list("私はコンピューターを")
    assert words("Привет, мир! مرحبا بالعالم") == ["Привет", "мир", "مرحبا", "بالعالم"]
    assert words("東京Tower 2026") == ["東", "京", "Tower", "2026"]
    assert words(" ... +-*/ \n") == []


def test_metrics_by_hand_english():
    enc = toy_encoding([b"he", b"ll", b"hell", b" w", b"or", b" wor", b"ld"])
    text = "hello world!"
    assert [enc.decode_single_token_bytes(t) for t in enc.encode(text)] == [b"hell", b"o", b" wor", b"ld", b"!"]
    s = text_stats(enc, text)
    # 2 words; 5 tokens, of which "!" touches no word; both words are split in two.
    assert s == TextStats(words=2, tokens=5, word_tokens=4, continued=2, n_bytes=12)
    assert (s.fertility, s.continued_share, s.bytes_per_token) == (2.0, 1.0, 12 / 5)


def test_metrics_by_hand_chinese():
    enc = toy_encoding(prefixes("你好"))
    s = text_stats(enc, "你好世界")
    # "你好" is one token shared by two words; 世 and 界 fall back to 3 byte tokens each.
    assert s == TextStats(words=4, tokens=7, word_tokens=7, continued=2, n_bytes=12)
    assert (s.fertility, s.continued_share, s.bytes_per_token) == (7 / 4, 0.5, 12 / 7)
    s = text_stats(enc, "你好你好")
    assert s == TextStats(words=4, tokens=2, word_tokens=2, continued=0, n_bytes=12)
    assert s.fertility == 0.5


def test_metrics_by_hand_spaces_and_punctuation():
    enc = toy_encoding([b" a", b" b", b"  "])
    # chunks "a", " b", "   ", ",", "c"; tokens of only spaces or punctuation touch no word
    text = "a b   ,c"
    tokens = [enc.decode_single_token_bytes(t) for t in enc.encode(text)]
    assert tokens == [b"a", b" b", b"  ", b" ", b",", b"c"]
    assert text_stats(enc, text) == TextStats(words=3, tokens=6, word_tokens=3, continued=0, n_bytes=8)
    assert text_stats(enc, "") == TextStats(0, 0, 0, 0, 0)
    assert text_stats(enc, "?!") == TextStats(0, 2, 0, 0, 2)


def test_stats_add_up_over_texts():
    enc = toy_encoding(prefixes("你好"))
    total = text_stats(enc, "你好") + text_stats(enc, "hello")
    assert total == TextStats(words=3, tokens=6, word_tokens=6, continued=1, n_bytes=11)


def test_truncated_bpe_equals_training_at_that_size():
    """The sweep trains once at the largest size; a BPE of V ids is its first V - 259 merges."""
    text = ["the quick brown fox jumps over the lazy dog; " * 3 + "tokenizers compress text by merging pairs. " * 4,
            "def f(x):\n    return x * 2  # 12345\n" * 5]
    small, large = tokenizer.train_bpe(text, 290, progress=False), tokenizer.train_bpe(text, 330, progress=False)
    cut = truncate_bpe(large, 290)
    assert cut._mergeable_ranks == small._mergeable_ranks
    assert cut._special_tokens == small._special_tokens
    probe = "the lazy fox returns 2 * x <|endoftext|>"
    assert cut.encode(probe, allowed_special="all") == small.encode(probe, allowed_special="all")
    assert embedded_vocab_size(cut) == cut.n_vocab == 290


def test_parallel_sample_is_parallel():
    sample = parallel_sample()
    assert {"en", "zh", "ja", "ar", "ru", "hi"} <= set(sample) and len(sample) >= 8
    n = {len(lines) for lines in sample.values()}
    assert len(n) == 1 and 10 <= n.pop() <= 20
    assert all(line.strip() for lines in sample.values() for line in lines)


def test_smollm2_embedded_vocab():
    pytest.importorskip("gguf", reason="needs gguf: pip install gguf")
    try:
        path = gguf_file.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    enc = tokenizer.from_gguf(path)
    assert (enc.n_vocab, embedded_vocab_size(enc)) == (49152 + 21, 49152)


@pytest.mark.slow
def test_cli_writes_tables(tmp_path, capsys):
    md, out_csv = tmp_path / "t.md", tmp_path / "t.csv"
    extra = tmp_path / "mine.txt"
    extra.write_text("A user's own text, with 12 numbers and words.")
    main(["--vocab-sizes", "300", "512", "--compare", "512", "--train-bytes", "300000", "--eval-bytes", "20000",
          "--files", str(extra), "--md", str(md), "--csv", str(out_csv)])
    printed = capsys.readouterr().out
    assert printed.strip() == md.read_text().strip()
    assert "Fertility" in printed and "Vocabulary sweep" in printed and "| mine.txt |" in printed
    rows = list(csv.DictReader(out_csv.open()))
    texts = {r["text"] for r in rows}
    assert {"prose", "code", "math", "mine.txt", "en", "zh"} <= texts
    assert {r["tokenizer"] for r in rows} >= {"bpe-300", "bpe-512"}
    for r in rows:  # every derived column is its formula over the counted columns
        assert float(r["fertility"]) == pytest.approx(int(r["word_tokens"]) / int(r["words"]), abs=1e-4)
        assert float(r["bytes_per_token"]) == pytest.approx(int(r["bytes"]) / int(r["tokens"]), abs=1e-4)
