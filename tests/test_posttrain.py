"""posttrain.py: the ecosystem's data files load, render and mask as the built-in tasks do; the
verifiers check what they say; every post-training command shares train.py's CLI convention; a
resumed run equals an uninterrupted one; 2 gloo ranks equal 1 process for an SFT step, a DPO step
and a GRPO update, and a checkpoint written by 2 ranks resumes on 1."""

import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dpo
import merge
import posttrain
import rl
import sft
import train
from chat import chat_segments
from config import field_comments, help_text
from conftest import ROOT, TEST_VOCAB
from model import ModelConfig, Transformer
from posttrain import DataError, Example, check_answer, load_conversations, load_preferences, load_prompts
from test_dpo import save_start

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"},
            {"role": "assistant", "content": "42"}, {"role": "user", "content": "And 1 + 1?"},
            {"role": "assistant", "content": "2"}]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=TEST_VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                   max_seq_len=256))


# ---- data files -----------------------------------------------------------------------------------

def test_sft_rows_render_and_mask_exactly_what_the_assistant_wrote(small_data, tmp_path):
    """Both SFT formats (messages, with tools; prompt/completion as strings or messages) become the
    conversation the chat template renders, and the loss mask covers exactly the assistant's text."""
    enc = small_data[1]
    tools = [{"name": "add", "parameters": {"a": "int", "b": "int"}}]
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": MESSAGES, "tools": tools},
        {"prompt": "Reverse: a b", "completion": "b a"},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]}])
    rows = load_conversations(path)
    assert rows[0] == (MESSAGES, tools)
    assert rows[1][0] == [{"role": "user", "content": "Reverse: a b"}, {"role": "assistant", "content": "b a"}]
    for (messages, row_tools), written in zip(rows, (["42<|im_end|>", "2<|im_end|>"], ["b a<|im_end|>"],
                                                     ["Hello<|im_end|>"])):
        ids, mask = sft.encode_chat(enc, messages, tools=row_tools)
        assert enc.decode(ids) == "".join(text for text, _ in chat_segments(messages, tools=row_tools))
        assert enc.decode([t for t, m in zip(ids, mask) if m]) == "".join(written)
    # the built-in tasks exported to the format read back as the same conversations
    # into a folder that does not exist yet (data_cache/ on a fresh clone)
    exported = posttrain.export_builtin("sft", tmp_path / "new" / "tasks.jsonl", 9, seed=4)
    examples = posttrain.make_examples(9, seed=4, exclude={e.question for e in posttrain.held_out_examples(50)})
    assert [m for m, _ in load_conversations(exported)] == [
        [{"role": "user", "content": e.question}, {"role": "assistant", "content": e.answer}] for e in examples]


def test_preference_and_rl_rows_read_in_both_of_trls_formats(small_data, tmp_path):
    enc = small_data[1]
    path = write_jsonl(tmp_path / "pref.jsonl", [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "user", "content": "Capital of France?"}],
         "chosen": [{"role": "assistant", "content": "Paris"}], "rejected": [{"role": "assistant", "content": "Lyon"}]}])
    assert load_preferences(path)[0] == ([{"role": "user", "content": "What is 2 + 2?"}],
                                         [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}])
    pairs = dpo.file_pairs(enc, path)
    for pair, (chosen, rejected) in zip(pairs, (("4", "5"), ("Paris", "Lyon"))):
        assert (pair.chosen, pair.rejected) == (chosen + "<|im_end|>", rejected + "<|im_end|>")
        # prompt + chosen is the conversation's rendering, up to the template's closing newline
        messages = load_preferences(path)[pairs.index(pair)]
        ids, _ = sft.encode_chat(enc, messages[0] + messages[1])
        assert list(pair.prompt_ids) + list(pair.chosen_ids) == ids[:-1]
    rows = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "What is 6 * 7?", "answer": 42},
                                               {"prompt": [{"role": "system", "content": "Be terse."},
                                                           {"role": "user", "content": "Pick: A. cat B. dog"}],
                                                "answer": "B"}])
    number, choice = load_prompts(rows, "number")
    assert (number.question, number.answer, number.verifier, number.system) == ("What is 6 * 7?", "42", "number", "")
    assert choice.system == "Be terse." and choice.messages()[0] == {"role": "system", "content": "Be terse."}
    assert check_answer(number, "6 times 7 is 42.<|im_end|>") and not check_answer(number, "It is 41")
    with gzip.open(tmp_path / "rl.jsonl.gz", "wt") as f:  # compressed files read the same
        f.write((tmp_path / "rl.jsonl").read_text())
    assert load_prompts(tmp_path / "rl.jsonl.gz", "number")[0] == number


def test_verifiers_accept_exactly_what_they_say():
    v = posttrain.VERIFIERS
    assert v["number"]("so the total is 1,042.", "1042") and v["number"]("3.50 dollars", "3.5")
    assert not v["number"]("41, or maybe 42? no, 41", "42") and not v["number"]("no number", "7")
    assert v["string"]("  paris   france ", "paris france") and not v["string"]("Paris", "paris")
    assert v["choice"]("The answer is B.", "B") and not v["choice"]("A or B", "B") and not v["choice"]("none", "A")
    ex = Example("t", "q", "", "7 20 51", "string")
    assert check_answer(ex, "<think>\nx\n</think>\n7 20  51<|im_end|>") and not check_answer(ex, "7 20<|im_end|> 51")


def test_bad_rows_name_the_file_and_line(tmp_path):
    cases = {"broken.jsonl": ('{"messages": [\n', r"broken\.jsonl:1: not a JSON object"),
             "nofield.jsonl": ('{"text": "hi"}\n', r"nofield\.jsonl:1: an SFT row needs 'messages'"),
             "role.jsonl": ('{"messages": [{"role": "robot", "content": "x"}]}\n', r"role\.jsonl:1: expected a string"),
             "silent.jsonl": ('{"prompt": "q", "completion": []}\n', r"silent\.jsonl:1: expected a string"),
             "empty.jsonl": ("\n\n", r"empty\.jsonl holds no rows")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            load_conversations(tmp_path / name)
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl is not UTF-8 text"):
        load_preferences(tmp_path / "latin1.jsonl")
    (tmp_path / "half.jsonl").write_text('{"prompt": "q", "chosen": "a"}\n')
    with pytest.raises(DataError, match=r"half\.jsonl:1: .* missing \['rejected'\]"):
        load_preferences(tmp_path / "half.jsonl")
    (tmp_path / "noanswer.jsonl").write_text('{"prompt": "q"}\n')
    with pytest.raises(DataError, match=r"noanswer\.jsonl:1: an RL row needs 'prompt' and 'answer'"):
        load_prompts(tmp_path / "noanswer.jsonl", "number")
    with pytest.raises(DataError, match="not found"):
        load_conversations(tmp_path / "missing.jsonl")


# ---- one CLI convention ---------------------------------------------------------------------------

@pytest.mark.parametrize("module", [train, sft, dpo, rl, merge])
def test_help_describes_every_key_with_its_default(module):
    text = help_text(module.__doc__, module.SECTIONS)
    for section, cls in module.SECTIONS.items():
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            assert f"--{section}.{f.name} (" in text
            assert comments.get(f.name), f"{section}.{f.name} has no comment to describe it in --help"


def test_post_training_commands_refuse_unknown_keys_with_the_closest_one():
    for module, key in ((sft, "sft.lora_rnak"), (dpo, "dpo.betta"), (rl, "rl.group_sise")):
        with pytest.raises(ValueError, match=f"unknown config key '{key}'; did you mean {key.split('.')[0]}\\."):
            module.load_config(None, [f"--{key}=1"])


# ---- runs: resume, several processes --------------------------------------------------------------

def sft_args(base, tmp_path, name, *extra):
    return [f"--run.init={base}", f"--run.out_dir={tmp_path}", f"--run.name={name}", "--sft.train_examples=48",
            "--sft.eval_examples=0", "--sft.seq_len=256", "--sft.rows_per_step=4", "--sft.epochs=1.0",
            "--run.threads=1", "--run.ckpt_interval=2", "--optim.warmup_steps=1", *extra]


def rows(run_dir, drop=("seconds",)) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_sft_run_equals_the_uninterrupted_one(small_data, tmp_path):
    base = save_start(tiny_model(), small_data[0], tmp_path / "base")
    sft.finetune(sft.load_config(None, sft_args(base, tmp_path, "whole")), log=lambda *a: None)
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")  # as if killed after the step-2 checkpoint
    final = sorted((tmp_path / "cut").glob("ckpt_*"))[-1]
    shutil.rmtree(final)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        sft.finetune(sft.load_config(None, sft_args(base, tmp_path, "cut")), log=lambda *a: None)
    sft.finetune(sft.load_config(None, sft_args(base, tmp_path, "cut", "--run.resume=true")), log=lambda *a: None)
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole") and len(rows(tmp_path / "whole")) > 2
    whole, cut = (torch.load(sorted((tmp_path / n).glob("ckpt_*"))[-1] / "state.pt") for n in ("whole", "cut"))
    assert all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])
    with pytest.raises(ValueError, match=r"its \[sft\] settings differ"):
        shutil.rmtree(sorted((tmp_path / "cut").glob("ckpt_*"))[-1])
        sft.finetune(sft.load_config(None, sft_args(base, tmp_path, "cut", "--run.resume=true", "--sft.epochs=2.0")),
                     log=lambda *a: None)


SAME_UPDATES = r'''
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import dpo, posttrain, rl
from distributed import parallelize, setup_distributed
from model import ModelConfig, Transformer
from posttrain import global_mean_scale

rank, _, world, device = setup_distributed("cpu", 1, "ddp")
out = {}
for name in ("sft", "dpo", "grpo"):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                    max_seq_len=32))
    ddp, _ = parallelize(model, "ddp", torch.float32, device, False, world)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (8, 24), generator=g)
    targets = torch.randint(0, 64, (8, 24), generator=g)
    for r, n in enumerate([3, 20, 7, 11, 15, 2, 9, 18]):  # rows with unequal numbers of loss tokens
        targets[r, :24 - n] = -100
    mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
    if name == "sft":
        loss, _ = ddp(ids[mine], targets[mine])
        (loss * global_mean_scale(float((targets[mine] != -100).sum()), device)).backward()
        optimizer.step()
    elif name == "dpo":  # 4 pairs: rows 0-3 chosen, 4-7 rejected; each process its pairs
        pairs = [i for i in range(4)][rank * 4 // world:(rank + 1) * 4 // world]
        rows = pairs + [p + 4 for p in pairs]
        logps, counts = dpo.response_logps(ddp, ids[rows], targets[rows])
        with torch.no_grad():
            ref = logps.detach() - 0.3
        k = len(pairs)
        loss, _ = dpo.preference_loss("apo_zero", logps[:k], logps[k:], ref[:k], ref[k:], 0.1)
        (loss * global_mean_scale(k, device)).backward()
        optimizer.step()
    else:  # the same 2 groups of 4 rollouts; each process its group
        rollouts = rl.Rollouts(ids[mine], targets[mine], [[1]] * (8 // world), torch.ones(8 // world),
                               torch.zeros(8 // world, dtype=torch.bool), 4)
        advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -1.0, -1.0])[mine]
        rl.policy_update(ddp, optimizer, rollouts, advantages, rl.RLConfig(group_size=4, updates_per_batch=2))
    out[name] = [p.detach().flatten()[:50].tolist() for p in model.parameters()]
if rank == 0:
    json.dump(out, open(sys.argv[2], "w"))
'''


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_for_an_sft_step_a_dpo_step_and_a_grpo_update(tmp_path):
    """Each process holds half the batch (rows with different token counts); the loss normalised by
    posttrain.global_mean_scale makes DDP's averaged gradient the one-process gradient."""
    script = tmp_path / "same_updates.py"
    script.write_text(SAME_UPDATES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(script), str(ROOT), str(tmp_path / "one.json")], check=True, env=env,
                   capture_output=True, timeout=300)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(ROOT), str(tmp_path / "two.json")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    for name in ("sft", "dpo", "grpo"):
        for a, b in zip(one[name], two[name]):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5), name


@pytest.mark.slow
def test_sft_under_torchrun_fsdp_matches_one_process_and_its_checkpoint_resumes_on_one(small_data, tmp_path):
    base = save_start(tiny_model(), small_data[0], tmp_path / "base")
    sft.finetune(sft.load_config(None, sft_args(base, tmp_path, "one")), log=lambda *a: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "sft.py"), *sft_args(base, tmp_path, "two", "--run.parallelism=fsdp")],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    middle, final = sorted((tmp_path / "two").glob("ckpt_*"))
    assert len(list(middle.glob("*.distcp"))) == 2  # one shard per rank
    # the 2-rank checkpoint before the end resumes in one process and ends where the 2-rank run ended
    shutil.rmtree(final)
    sft.finetune(sft.load_config(None, sft_args(base, tmp_path, "two", "--run.parallelism=fsdp", "--run.resume=true")),
                 log=lambda *a: None)
    for a, b in zip(one, rows(tmp_path / "two")):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)


def test_a_run_started_from_a_hugging_face_folder_feeds_the_next_stage(small_data, tmp_path, monkeypatch):
    """A run started from weights that brought their own tokenizer (a Hugging Face folder, a GGUF
    file) keeps that tokenizer in its folder, so the next stage (or eval.py) loads it: no
    data_cache/ tokenizer of this project exists for it."""
    pytest.importorskip("safetensors")
    from checkpoint import load_model
    from weights import save_hf
    monkeypatch.chdir(tmp_path)  # no data_cache/ here: the tokenizer can only come from the run folders
    enc = small_data[1]
    save_hf(tiny_model(), tmp_path / "hf", enc)
    args = sft_args(tmp_path / "hf", tmp_path, "from-hf", "--run.ckpt_interval=0")
    sft.finetune(sft.load_config(None, args), log=lambda *a: None)
    assert (tmp_path / "from-hf" / "tokenizer.json").is_file()
    model, loaded_enc, _ = load_model(str(tmp_path / "from-hf"))
    text = "def add(a, b):\n    return a + b\n"
    assert loaded_enc.encode(text) == enc.encode(text) and model.cfg.vocab_size == TEST_VOCAB


def test_micro_batches_train_exactly_as_the_whole_batch_in_sft_dpo_and_grpo(small_data, tmp_path):
    """run.micro_batch cuts each process's share of a step into forwards of a few rows, weighting
    each micro-batch's loss by its share of the step's mean: the weights, the logged losses and the
    gradient norms equal the one-forward step's (up to float32 rounding: a margin is a difference of sums of log-probs)."""
    base = save_start(tiny_model(), small_data[0], tmp_path / "base")
    common = [f"--run.init={base}", f"--run.out_dir={tmp_path}", "--run.threads=1", "--optim.warmup_steps=1",
              "--run.eval_max_new_tokens=4"]
    stages = {
        "sft": (sft.finetune, sft.load_config, ["--sft.train_examples=24", "--sft.eval_examples=0",
                                                 "--sft.seq_len=256", "--sft.rows_per_step=5", "--sft.epochs=1.0"]),
        "dpo": (dpo.preference_train, dpo.load_config, ["--dpo.pairs=off_policy", "--dpo.prompts=10",
                                                          "--dpo.pairs_per_step=5", "--dpo.epochs=1.0",
                                                          "--dpo.eval_examples=0"]),
    }
    for stage, (run_stage, load_config, args) in stages.items():
        for micro in (0, 2):  # 2 does not divide 5 rows or 6 completions: a short last micro-batch
            cfg = load_config(None, [*common, *args, f"--run.name={stage}-{micro}", f"--run.micro_batch={micro}"])
            run_stage(cfg, log=lambda *a: None)
        whole, micro = (rows(tmp_path / f"{stage}-{m}", drop=("seconds",)) for m in (0, 2))
        assert len(whole) == len(micro) >= 2
        for a, b in zip(whole, micro):
            assert a.keys() == b.keys()
            assert all(b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5) for k in a), (stage, a, b)
        states = [torch.load(sorted((tmp_path / f"{stage}-{m}").glob("ckpt_*"))[-1] / "state.pt") for m in (0, 2)]
        for k, w in states[0]["model"].items():
            torch.testing.assert_close(states[1]["model"][k], w, rtol=1e-4, atol=1e-6, msg=f"{stage} {k}")

    # GRPO's update (sampling aside), for each aggregation, with SGD: any mis-weighting shows in the weights
    g = torch.Generator().manual_seed(0)
    ids, targets = torch.randint(0, TEST_VOCAB, (6, 20), generator=g), torch.randint(0, TEST_VOCAB, (6, 20), generator=g)
    for r, n in enumerate([3, 15, 7, 11, 2, 9]):  # completions of unequal lengths
        targets[r, :20 - n] = -100
    rollouts = rl.Rollouts(ids, targets, [[1]] * 6, torch.ones(6), torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool), 6)
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.0, 2.0, -0.75])
    for aggregation in rl.AGGREGATIONS:
        cfg = rl.RLConfig(group_size=3, updates_per_batch=2, aggregation=aggregation, kl_beta=0.1, overlong_filter=True)
        trained = []
        for micro in (0, 4):
            model = tiny_model()
            ref = tiny_model(seed=1)
            out = rl.policy_update(model, torch.optim.SGD(model.parameters(), lr=0.5), rollouts, advantages, cfg,
                                   ref=ref, micro_batch=micro)
            trained.append((out, model.state_dict()))
        (whole, w0), (micro, w1) = trained
        assert whole["grad_norm"] > 0 and micro == pytest.approx(whole, rel=1e-4, abs=1e-6), aggregation
        for k in w0:
            torch.testing.assert_close(w1[k], w0[k], rtol=1e-5, atol=1e-6, msg=f"{aggregation} {k}")
