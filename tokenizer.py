"""Tokenizer: byte-level BPE, trained here in pure Python, encoded by tiktoken's Rust core.

Byte-level BPE starts from the 256 possible bytes (so any string, in any script, can be encoded)
and repeatedly merges the most frequent adjacent pair of tokens into a new token. Text is first
cut into chunks by a regex (words, numbers, punctuation, whitespace) and merges never cross a chunk.

The playbook's findings this file serves: vocabularies of ~50k suit English-only models and 100k+
multilingual ones, and sizes should be a multiple of 128 (efficient embedding matmuls); digits are
split one by one, as SmolLM2's tokenizer does (Llama 3's, which SmolLM3 adopted, groups up to three),
so arithmetic always sees single digits.
Training returns a `tiktoken.Encoding`, so encoding during data preparation is fast Rust.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime
import heapq
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import regex
import tiktoken
from tqdm import tqdm

from corpus import (DEFAULT_MAX_BYTES, SOURCES, corpus_documents, expand_inputs, file_sample, sample_documents,
                    tokenizer_training_text)
from gguf_file import gguf_field, open_gguf

# GPT-4's (cl100k) pre-tokenizer with `\p{N}` instead of `\p{N}{1,3}+`: every digit is its own
# chunk, so no merge can ever join two digits.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}"""
                 r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def _chunk_counts(texts: Iterable[str]) -> Counter:
    if isinstance(texts, str):  # a lone string would otherwise be iterated character by character
        texts = [texts]
    counts: Counter = Counter()
    for text in texts:
        counts.update(regex.findall(SPLIT_PATTERN, text))
    return counts


def _merge(ids: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace every (a, b) in ids by new, left to right (so "aaa" with (a, a) gives [aa, a])."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _pop_best(heap: list, pair_counts: dict) -> tuple[int, int] | None:
    """The most frequent pair, ties broken by the lowest (left id, right id).

    Heap entries go stale when a count drops; a stale entry is re-pushed with its current count
    when it reaches the top. Every live pair always has an entry whose count is >= its true count
    (counts only rise through a push), so the first entry that is up to date is the true best."""
    while heap:
        neg, a, b = heapq.heappop(heap)
        current = pair_counts.get((a, b), 0)
        if current == -neg:
            return a, b
        if current > 0:
            heapq.heappush(heap, (-current, a, b))
    return None


def train_bpe(texts: Iterable[str], vocab_size: int, name: str = "nanoplaybook",
              progress: bool = True) -> tiktoken.Encoding:
    """Learn a byte-level BPE with exactly `vocab_size` ids: 256 bytes + merges + special tokens.

    Incremental: chunks are deduplicated and weighted by count, pair counts are updated only for
    the chunks that contain the merged pair (found through an index pair -> chunks), and the best
    pair comes from a lazily invalidated max-heap, so each merge costs what it touches. Ties go to
    the lowest (left id, right id), so training is deterministic.

    tiktoken needs unique bytes per rank, but two merges could spell the same bytes, e.g. (a, bc)
    and (ab, c). With left-to-right merging we never saw it happen (none in 79k merges over the
    whole corpus); should it, the merge still happens but reuses the existing id and adds no rank,
    and merging goes on until the vocabulary is exactly full."""
    n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
    if n_merges < 1:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS) + 1} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens + 1 merge), got {vocab_size}")
    counted = _chunk_counts(texts)
    if not counted:
        raise ValueError("train_bpe got no text to train on (empty or no documents)")
    chunks = [list(chunk.encode("utf-8")) for chunk in counted]
    weights = list(counted.values())

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i, ids in enumerate(chunks):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += weights[i]
            where[pair].add(i)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    vocab = [bytes([i]) for i in range(256)]  # token id -> bytes; the id is also its tiktoken rank
    ids_of = {tok: i for i, tok in enumerate(vocab)}
    bar = tqdm(total=n_merges, desc="bpe merges", unit="merge", disable=not progress)
    while len(vocab) < 256 + n_merges:
        best = _pop_best(heap, pair_counts)
        if best is None:
            bar.close()
            raise ValueError(f"training text too small for vocab_size={vocab_size}: only "
                             f"{len(vocab) - 256} merges possible, {n_merges} needed; train on more "
                             f"text (tokenizer_training_text(max_bytes=...); tokenizer.py --max-bytes, "
                             f"tokenizer_eval.py --train-bytes)")
        a, b = best
        merged = vocab[a] + vocab[b]
        new = ids_of.get(merged)
        if new is None:  # a genuinely new token (not just a new spelling of an existing one)
            new = ids_of[merged] = len(vocab)
            vocab.append(merged)
            bar.update(1)
        _apply_merge(best, new, chunks, weights, pair_counts, where, heap)
    bar.close()
    ranks = {tok: i for i, tok in enumerate(vocab)}
    special = {tok: len(vocab) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=name, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens=special, explicit_n_vocab=vocab_size)


def _apply_merge(pair, new, chunks, weights, pair_counts, where, heap) -> None:
    a, b = pair
    risen = set()  # only pairs that contain `new` can gain counts; they get fresh heap entries
    for i in where.pop(pair, ()):
        ids = chunks[i]
        merged = _merge(ids, a, b, new)
        if len(merged) == len(ids):
            continue  # the index is never pruned, so it may point at chunks that lost the pair
        w = weights[i]
        for p in zip(ids, ids[1:]):
            pair_counts[p] -= w
        for p in zip(merged, merged[1:]):
            pair_counts[p] += w
            where[p].add(i)
            if new in p:
                risen.add(p)
        chunks[i] = merged
    pair_counts.pop(pair, None)  # every occurrence is merged, so its count is now zero
    for p in risen:
        if pair_counts[p] > 0:
            heapq.heappush(heap, (-pair_counts[p], p[0], p[1]))


def train_bpe_rust(texts: Iterable[str], vocab_size: int, name: str = "nanoplaybook",
                   progress: bool = True) -> tiktoken.Encoding:
    """train_bpe's result from Hugging Face's Rust BPE trainer (`pip install tokenizers`, which the
    Smol models' tokenizers were trained with): the same regex chunks, byte alphabet, pair counts
    and merge rule, in parallel Rust, returned in train_bpe's layout (byte b has id b, merges
    follow in order, then the special tokens).

    One difference: on a tie between equally frequent pairs, Hugging Face takes the lowest pair of
    its own ids, which order bytes by their GPT-2 printable stand-ins (printable bytes first), while
    train_bpe orders them by byte value. On text of printable ASCII without spaces both orders
    agree and so do the merges (tested); on other text the vocabularies differ only after a tie."""
    try:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        raise ImportError("the rust trainer needs Hugging Face's tokenizers package: pip install tokenizers") from None
    n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
    if n_merges < 1:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS) + 1} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens + 1 merge), got {vocab_size}")
    if isinstance(texts, str):
        texts = [texts]
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=256 + n_merges, show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    vocab = json.loads(hf.to_str())["model"]["vocab"]
    if len(vocab) <= 256:
        raise ValueError("train_bpe got no text to train on (empty or no documents)")
    if len(vocab) < 256 + n_merges:
        raise ValueError(f"training text too small for vocab_size={vocab_size}: only {len(vocab) - 256} merges "
                         f"possible, {n_merges} needed; train on more text (tokenizer.py --max-bytes)")
    byte_of = _gpt2_byte_decoder()
    # Hugging Face's ids: the 256 byte stand-ins in their own order, then merges in order
    ranks = {bytes(byte_of[ch] for ch in token): i for token, i in vocab.items() if i >= 256}
    ranks.update({bytes([b]): b for b in range(256)})
    special = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=name, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens=special, explicit_n_vocab=vocab_size)


# --------------------------------------------------------------------------------------------
# Saving, loading, special ids
# --------------------------------------------------------------------------------------------

def save_tokenizer(enc: tiktoken.Encoding, path) -> None:
    """Write one JSON file atomically: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    # tiktoken has no public accessors for these; its README uses the same attributes to extend
    # an encoding.
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    if [r for _, r in ranks] != list(range(len(ranks))):
        raise ValueError("can only save encodings whose mergeable ranks are 0..n-1")
    payload = {"name": enc.name, "pattern": enc._pat_str,
               "mergeable_ranks": [base64.b64encode(tok).decode("ascii") for tok, _ in ranks],
               "special_tokens": dict(enc._special_tokens)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: os.replace stays atomic
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_tokenizer(path) -> tiktoken.Encoding:
    """This project's tokenizer file, or a Hugging Face tokenizer.json (from_hf_json), by its keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} not found; train one with "
                                f"`python tokenizer.py --vocab-size N --out {path}`")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(payload, dict) and "model" in payload and "mergeable_ranks" not in payload:
            hf_payload = payload  # a Hugging Face file: read below, outside this handler, with its own errors
        else:
            ranks = {base64.b64decode(tok, validate=True): i
                     for i, tok in enumerate(payload["mergeable_ranks"])}
            return tiktoken.Encoding(name=payload["name"], pat_str=payload["pattern"],
                                     mergeable_ranks=ranks,
                                     special_tokens={k: int(v) for k, v in payload["special_tokens"].items()})
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too
        raise ValueError(f"tokenizer file {path} is corrupt or not a tokenizer file "
                         f"({type(e).__name__}: {e}); retrain it with `python tokenizer.py`") from e
    return from_hf_json(path, hf_payload)


def special_id(enc: tiktoken.Encoding, token: str) -> int:
    """The id of a special token (<|endoftext|>, <|im_start|>, <|im_end|>), or one line saying the
    tokenizer has none."""
    try:
        return enc.encode_single_token(token)
    except KeyError:
        raise ValueError(f"tokenizer {enc.name!r} has no special token {token!r}; its specials are "
                         f"{sorted(enc.special_tokens_set)}") from None


def eot_id(enc: tiktoken.Encoding) -> int:
    """The end-of-document token that data.py writes after every document."""
    return special_id(enc, "<|endoftext|>")


# --------------------------------------------------------------------------------------------
# Tokenizers of real models, from GGUF files (SmolLM2)
# --------------------------------------------------------------------------------------------

# GPT-2's pre-tokenizer regex, which Hugging Face's ByteLevel pre-tokenizer applies.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2 (like StarCoder) first isolates every digit, then applies GPT-2's regex to the stretches
# between digits (tokenizer.json: Sequence[Digits(individual_digits), ByteLevel]; llama.cpp's
# pre-tokenizer "smollm"). One regex does both: a digit is always its own chunk, and a whitespace
# run followed by a digit ends the stretch, so it is taken whole, as GPT-2's `\s+(?!\S)` takes a
# run at the end of a string.
DIGITS_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
GGUF_PRE_TOKENIZERS = {"smollm": DIGITS_GPT2_PATTERN, "starcoder": DIGITS_GPT2_PATTERN,
                       "gpt-2": GPT2_PATTERN, "default": GPT2_PATTERN}


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes (space -> 'Ġ', newline -> 'Ċ') mapped back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def from_gguf(path) -> tiktoken.Encoding:
    """The byte-level BPE tokenizer stored in a GGUF file, as a tiktoken Encoding with the same ids.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, Hugging Face the
    pair that comes first in the merge list; with rank = token id these agree when ids follow the
    merge order, which is checked. Special tokens (GGUF token type 3 or 4) are tiktoken specials.
    SmolLM2's vocabulary lacks 21 of the 256 bytes (six ASCII control characters, the lead bytes
    of two unassigned Unicode planes, and the 13 bytes valid UTF-8 never uses); Hugging Face silently drops them,
    tiktoken needs every byte, so they get ids past the model's vocabulary (n_vocab grows by 21)."""
    reader = open_gguf(path)
    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}; from_gguf reads byte-level BPE "
                         f"('gpt2') tokenizers only, not SentencePiece ('llama') or others")
    pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not known here; known: {sorted(GGUF_PRE_TOKENIZERS)}")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    types = gguf_field(reader, "tokenizer.ggml.token_type")
    merges = gguf_field(reader, "tokenizer.ggml.merges", [])
    # control and user-defined tokens (types 3 and 4) are matched whole, never merged
    vocab = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind not in (3, 4)}
    special = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)}
    return _byte_level_encoding(Path(path).stem, GGUF_PRE_TOKENIZERS[pre], vocab, special, merges, len(tokens), path)


def _byte_level_encoding(name: str, pattern: str, vocab: dict[str, int], special: dict[str, int],
                         merges: list[str], n_ids: int, where) -> tiktoken.Encoding:
    """A tiktoken Encoding of a byte-level BPE vocabulary written in GPT-2's printable characters
    (GGUF and Hugging Face store them so). Rank = token id, which reproduces the merge list when
    ids follow the merge order (checked). Bytes the vocabulary lacks get ids from n_ids on:
    tiktoken needs every byte, Hugging Face drops them."""
    byte_of = _gpt2_byte_decoder()
    try:
        ranks = {bytes(byte_of[ch] for ch in token): i for token, i in vocab.items()}
    except KeyError as e:
        raise ValueError(f"{where}: token with character {e} is not byte-level BPE (GPT-2's byte alphabet)") from e
    merged_ids = [ranks.get(bytes(byte_of.get(ch, 0) for ch in m.replace(" ", "", 1))) for m in merges]
    if None in merged_ids or any(a > b for a, b in zip(merged_ids, merged_ids[1:])):
        raise ValueError(f"{where}: token ids do not follow the merge order, so tiktoken cannot reproduce them")
    next_id = n_ids
    for b in range(256):
        if bytes([b]) not in ranks:
            ranks[bytes([b])] = next_id
            next_id += 1
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)


# --------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (byte-level BPE), written and read
# --------------------------------------------------------------------------------------------

def save_hf_tokenizer(enc: tiktoken.Encoding, out_dir) -> Path:
    """Write out_dir/tokenizer.json and tokenizer_config.json: the Encoding as a Hugging Face fast
    tokenizer (transformers' AutoTokenizer loads it) giving the same ids.

    The merge list is tiktoken's rule spelled out, as transformers' TikTokenConverter does: every
    split of a token into two vocabulary tokens is a merge, ordered by the merged token's rank, and
    ignore_merges looks whole pre-tokenized pieces up first, as tiktoken does. The pre-tokenizer
    is the Encoding's own regex (Oniguruma reads its possessive quantifiers), then the byte-level
    mapping. End of sequence is <|im_end|> when the Encoding has it (a chat model's turn end, as
    in SmolLM2-Instruct's config), else <|endoftext|>; padding <|endoftext|>, as sft.py pads
    (SmolLM2 pads with <|im_end|>); no BOS, since tiktoken adds none (nor does SmolLM2: its GGUF
    says add_bos_token false)."""
    ranks = enc._mergeable_ranks  # tiktoken has no public accessor (see save_tokenizer)
    char_of = {b: ch for ch, b in _gpt2_byte_decoder().items()}
    text = {tok: "".join(char_of[b] for b in tok) for tok in ranks}
    merges = []
    for tok, rank in ranks.items():
        splits = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        merges += [(rank, ranks[a], ranks[b], f"{text[a]} {text[b]}") for a, b in splits]
    specials = dict(enc._special_tokens)
    payload = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in sorted(specials.items(), key=lambda x: x[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  # special tokens in the vocabulary too, as Hugging Face's own files have them: an
                  # added token missing there would get a new id after the vocabulary
                  "vocab": dict(sorted([*((text[tok], r) for tok, r in ranks.items()), *specials.items()],
                                       key=lambda x: x[1])),
                  "merges": [m[-1] for m in sorted(merges)]},
    }
    end = "<|im_end|>" if "<|im_end|>" in specials else "<|endoftext|>" if "<|endoftext|>" in specials else None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
              "eos_token": end, "pad_token": "<|endoftext|>" if "<|endoftext|>" in specials else end,
              "bos_token": None, "clean_up_tokenization_spaces": False}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in (("tokenizer.json", payload), ("tokenizer_config.json", config)):
        tmp = out_dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, out_dir / name)
    return out_dir / "tokenizer.json"


def from_hf_json(path, payload: dict | None = None) -> tiktoken.Encoding:
    """A Hugging Face byte-level BPE tokenizer.json (SmolLM2's, GPT-2's, or one save_hf_tokenizer
    wrote) as a tiktoken Encoding with the same ids. The pre-tokenizer becomes one regex: a Split
    regex as written, GPT-2's for a bare ByteLevel, SmolLM2's digits-then-GPT-2 for Digits +
    ByteLevel. Anything else (SentencePiece/Unigram models, normalizers, word suffixes, a prefix
    space, a Split that drops or merges pieces) stops with one line, as does a malformed file."""
    path = Path(path)
    try:
        payload = payload if payload is not None else json.loads(path.read_text(encoding="utf-8"))
        return _hf_encoding(path, payload)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        # a shape this reader does not expect; its own refusals are plain ValueErrors and pass through
        raise ValueError(f"{path}: not a readable Hugging Face tokenizer.json ({type(e).__name__}: {e})") from e


def _hf_encoding(path: Path, payload: dict) -> tiktoken.Encoding:
    model = payload.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: a {model.get('type')!r} tokenizer; only byte-level BPE tokenizer.json files are "
                         f"read (for SentencePiece models such as Llama 2 use their GGUF file: gguf:PATH)")
    if payload.get("normalizer"):
        raise ValueError(f"{path}: has a normalizer ({payload['normalizer'].get('type')}), which tiktoken cannot apply")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):  # marks spelled into the tokens (WordPiece style), which tiktoken never adds
            raise ValueError(f"{path}: BPE with {key} {model[key]!r}; tiktoken's byte-level BPE has none")
    pre = payload.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    split = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    for s in steps:
        if s.get("type") == "Split" and (s.get("behavior") != "Isolated" or s.get("invert")):
            # tiktoken keeps every regex match as a piece and nothing else: that is Isolated, not inverted
            raise ValueError(f"{path}: Split pre-tokenizer with behavior {s.get('behavior')!r}"
                             f"{', inverted' if s.get('invert') else ''}; only 'Isolated', not inverted, can be read")
        if s.get("type") == "ByteLevel" and s.get("add_prefix_space"):
            raise ValueError(f"{path}: ByteLevel pre-tokenizer adds a prefix space, which tiktoken does not")
    if kinds == ["Split", "ByteLevel"] and split[0] and not steps[1].get("use_regex", True):
        pattern = split[0]
    elif kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        pattern = GPT2_PATTERN
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        pattern = DIGITS_GPT2_PATTERN
    else:
        raise ValueError(f"{path}: pre-tokenizer {kinds} is not one this code can turn into a regex "
                         f"(known: Split + ByteLevel, ByteLevel, Digits + ByteLevel)")
    special = {t["content"]: t["id"] for t in payload.get("added_tokens", [])}
    vocab = {tok: i for tok, i in model["vocab"].items() if tok not in special}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    n_ids = max([*model["vocab"].values(), *special.values()]) + 1
    return _byte_level_encoding(path.parent.name or path.stem, pattern, vocab, special, merges, n_ids, path)


def gguf_chat_template(path) -> str:
    """The Jinja chat template stored in a GGUF file (tokenizer.chat_template)."""
    template = gguf_field(open_gguf(path), "tokenizer.chat_template")
    if not template:
        raise ValueError(f"{path} has no tokenizer.chat_template")
    return template


def gguf_special_tokens(path) -> dict[str, str]:
    """{"bos_token": ..., "eos_token": ...}: the texts of a GGUF file's BOS and EOS tokens, which
    chat templates may print and generation stops at ("" where the file names none)."""
    reader = open_gguf(path)
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    found = {}
    for name in ("bos", "eos"):
        i = gguf_field(reader, f"tokenizer.ggml.{name}_token_id")
        found[f"{name}_token"] = tokens[i] if i is not None and 0 <= i < len(tokens) else ""
    return found


def render_chat_template(template: str, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                         bos_token: str = "", eos_token: str = "") -> str:
    """Render a Hugging Face style Jinja chat template, as transformers' apply_chat_template does.

    jinja2 comes with torch. The environment is the one transformers builds: a sandbox (templates
    are data), loop controls, a tojson that keeps non-ASCII text, raise_exception and strftime_now."""
    import jinja2.ext
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos_token, eos_token=eos_token)


# --------------------------------------------------------------------------------------------
# CLI: python tokenizer.py --vocab-size V --out PATH [--files ...] [--trainer rust]
# --------------------------------------------------------------------------------------------

def bytes_per_token(enc: tiktoken.Encoding, texts: list[str]) -> float:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return n_bytes / max(1, sum(map(len, enc.encode_ordinary_batch(texts))))


TRAINERS = {"python": train_bpe, "rust": train_bpe_rust}


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a byte-level BPE tokenizer on the default corpus "
                                                 "or on your own files.")
    parser.add_argument("--vocab-size", type=int, required=True, help="total ids, incl. 256 bytes and specials")
    parser.add_argument("--out", required=True, help="where to write the tokenizer JSON (train.py reads "
                                                     "data_cache/vocab<V>/tokenizer.json)")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="training sample size")
    parser.add_argument("--files", nargs="*", default=[],
                        help="train on these instead: files, folders or globs of .txt/.md (one document each), "
                             ".jsonl, .jsonl.gz, .jsonl.zst (one per line) or .parquet (one per row); the first "
                             "--max-bytes of their documents, the files in a seeded random order")
    parser.add_argument("--text-field", default="text", help="the JSON field or parquet column holding the text")
    parser.add_argument("--trainer", choices=sorted(TRAINERS), default="python",
                        help="python: train_bpe, the readable reference; rust: Hugging Face's BPE trainer "
                             "(pip install tokenizers), the same file, many times faster on large samples")
    args = parser.parse_args()

    start = time.perf_counter()
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # an unusable --out stops before the training
        if args.files:
            texts = file_sample(expand_inputs(args.files), args.max_bytes, args.text_field)
            if not texts:
                raise ValueError(f"no documents in {' '.join(args.files)} (empty, or no {args.text_field!r} field: "
                                 f"--text-field)")
        else:
            texts = tokenizer_training_text(args.max_bytes)
        enc = TRAINERS[args.trainer](texts, args.vocab_size)
        seconds = time.perf_counter() - start
        save_tokenizer(enc, args.out)
    except (ValueError, OSError, ImportError) as e:  # bad size, too little text, a bad file or folder: one line
        parser.error(str(e))
    print(f"vocab size {enc.n_vocab}, trained in {seconds:.1f} s ({args.trainer} trainer, "
          f"{sum(len(t.encode('utf-8')) for t in texts) / 1e6:.1f} MB of text), saved to {args.out}")
    if args.files:  # 10 MB tell the compression as well as a GB would, in a second instead of minutes
        print(f"compression over 10 MB of the training sample: "
              f"{bytes_per_token(enc, sample_documents(texts, 10_000_000, 0)):.2f} bytes/token")
        return
    print("compression over each whole source:")
    for source in SOURCES:
        print(f"  {source:>6}: {bytes_per_token(enc, corpus_documents(source)):.2f} bytes/token")


if __name__ == "__main__":
    main()
