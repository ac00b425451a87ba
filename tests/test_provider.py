"""A provider's own model and data: files in every format, a second real
model with its own vocabulary driven end to end through the command line,
Hub-style transform directories, and dataset purification."""

import copy
import json
import socket
import threading
import time

import numpy as np
import openai
import pytest
import torch

from cmiguard import LowRankTransform, load_transform, purify, purify_dataset, vocab_fingerprint
from cmiguard.checkpoint import from_pretrained, save_pretrained, save_transform
from cmiguard.cli import build_parser, main
from cmiguard.cli.serve import serve_app
from cmiguard.train.corpus import load_examples, split_validation
from cmiguard.train.models import load_model, teacher_gguf_dir
from tests.conftest import trained_like

TEXTS = [
    "The river runs through the old town and the old bridge.",
    "The old town has a market by the river every week.",
    "A bridge over the river joins the town to the hills.",
    "People in the town walk by the river in the evening.",
    "The market in the old town sells fish from the river.",
    "Hills rise behind the town, and the river bends below them.",
    "In the evening the bridge and the market are quiet.",
    "The town grew along the river, bridge by bridge.",
]


@pytest.fixture(scope="module")
def tokenizer_and_model(tmp_path_factory):
    """A GPT-2-style model (4 blocks) with a byte-level BPE vocabulary of its own
    (not the teacher's), trained and saved here, offline."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from cmiguard.train.data import wiki_summaries

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        wiki_summaries("calibration", 200) + TEXTS, vocab_size=700, special_tokens=["<|eos|>"]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|eos|>")
    config = AutoConfig.for_model(
        "gpt2", vocab_size=len(tokenizer), n_embd=64, n_layer=4, n_head=4, n_positions=256
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out = tmp_path_factory.mktemp("provider") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_and_answer_rows_in_every_format(tmp_path, teacher):
    import datasets

    _, tokenizer = teacher
    rows = [{"text": t} for t in TEXTS * 3]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    cal, held = load_examples(jsonl, tokenizer, max_tokens=16, heldout=0.25, seed=1)
    assert len(cal) + len(held) == len(rows) and held and cal
    first = tokenizer.encode(TEXTS[0], add_special_tokens=False)[:16]
    everything = cal + held
    assert any(e.input_ids == first and e.labels == first[1:] for e in everything)
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    table.save_to_disk(str(tmp_path / "saved"))
    for other in ("d.parquet", "d.csv", "saved"):
        again = load_examples(tmp_path / other, tokenizer, max_tokens=16, heldout=0.25, seed=1)
        assert [e.input_ids for e in again[0]] == [e.input_ids for e in cal], other
    qa = [
        {"prompt": f"Where is the {w}?", "answer": f"By the {w}."}
        for _ in range(4)
        for w in ("river", "town")
    ]
    qa[0]["split"] = "heldout"  # rows without one are calibration rows
    cal_qa, held_qa = load_examples(write_jsonl(tmp_path / "qa.jsonl", qa), tokenizer)
    # a split column decides: only the row marked heldout is held out
    assert len(held_qa) == 1 and len(cal_qa) == 7
    e = held_qa[0]
    answer = tokenizer.encode("By the river.", add_special_tokens=False)
    assert e.labels == answer and e.input_ids[-len(answer) :] == answer
    assert e.positions == list(range(len(e.input_ids) - len(answer) - 1, len(e.input_ids) - 1))
    assert "<|im_start|>" in tokenizer.decode(e.input_ids)  # the chat template wraps the prompt
    # the usual spellings hold out; a misspelt value would have been trained on
    qa[1]["split"], qa[2]["split"], qa[3]["split"] = " Dev ", "TEST", "train"
    cal_qa, held_qa = load_examples(write_jsonl(tmp_path / "qa.jsonl", qa), tokenizer)
    assert len(held_qa) == 3 and len(cal_qa) == 5
    qa[4]["split"] = "heldot"
    with pytest.raises(ValueError, match="qa.jsonl: row 4 has split 'heldot'; held-out rows"):
        load_examples(write_jsonl(tmp_path / "qa.jsonl", qa), tokenizer)


def test_selection_rows_come_from_the_calibration_share(tmp_path, teacher):
    """train --data selects on a share of the calibration rows, never on the
    held-out rows evaluate --data scores students on."""
    _, tokenizer = teacher
    rows = [{"text": f"{t} ({i})"} for i, t in enumerate(TEXTS * 5)]  # 40 distinct rows
    calibration, held_out = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer)
    train, validation = split_validation(calibration)

    def texts(examples):
        return [tokenizer.decode(e.input_ids) for e in examples]

    assert held_out and train and validation
    assert sorted(texts(train) + texts(validation)) == sorted(texts(calibration))
    assert not set(texts(train)) & set(texts(validation))
    assert not set(texts(validation)) & set(texts(held_out))
    assert 0.05 < len(validation) / len(calibration) < 0.5


def test_bad_data_is_named(tmp_path, teacher):
    _, tokenizer = teacher
    cases = [
        (write_jsonl(tmp_path / "cols.jsonl", [{"body": "x"}]), "needs a 'text' column"),
        (write_jsonl(tmp_path / "empty.jsonl", [{"text": "fine words"}, {"text": " "}]), "row 1"),
        (write_jsonl(tmp_path / "once.jsonl", [{"text": "alpha beta gamma"}]), "no label occurs"),
        (tmp_path / "missing.jsonl", "no such file"),
        (tmp_path / "d.xlsx", "unknown data format"),
        (tmp_path / "none.jsonl", "none.jsonl is empty"),
        (tmp_path / "broken.jsonl", "could not be read as json: JSON parse error"),
    ]
    (tmp_path / "d.xlsx").write_text("x")
    (tmp_path / "none.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text("not json\n")
    for path, words in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=words):
            load_examples(path, tokenizer, heldout=0.0)
    assert "cols.jsonl" in str(
        pytest.raises(ValueError, load_examples, cases[0][0], tokenizer).value
    )
    # a chat template that refuses a lone user turn ended in jinja2's traceback
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = "{{ raise_exception('conversations must start with a system turn') }}"
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Where?", "answer": "Here."}] * 4)
    with pytest.raises(ValueError, match="qa.jsonl: row 0: the tokenizer's chat template refused"):
        load_examples(qa, strict)


def test_models_load_from_a_directory_or_a_gguf_file(tmp_path, tokenizer_and_model):
    model, tokenizer = load_model(tokenizer_and_model)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer) == 700
    assert tokenizer.pad_token == "<|eos|>"  # none was set: padded with eos
    half, _ = load_model(tokenizer_and_model, dtype="bfloat16")
    assert half.get_output_embeddings().weight.dtype == torch.bfloat16
    gguf = teacher_gguf_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    from_gguf, tok = load_model(gguf)
    assert from_gguf.config.vocab_size == len(tok) == 49152
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(tokenizer_and_model, dtype="int8")
    # without its tokenizer files transformers builds an empty tokenizer from the
    # config's model type: every text became no tokens (train said "no calibration rows")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tokenizer_and_model / name).read_bytes())
    with pytest.raises(ValueError, match="bare: no tokenizer .* tokenizer files missing"):
        load_model(bare)
    folds_without_one, none = load_model(bare, need_tokenizer=False)
    assert none is None and folds_without_one.config.vocab_size == 700
    # tokens added to the tokenizer and not to the model ended train in an IndexError
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|bot|>"]})
    tokenizer.save_pretrained(bare)
    with pytest.raises(ValueError, match="bare: the tokenizer has 702 tokens but the model embeds"):
        load_model(bare)


def test_transform_directories_round_trip_and_refuse_a_mismatch(tmp_path):
    t = trained_like(LowRankTransform(40, 3, temperature=1.5, guard_margin=0.5))
    t.save_pretrained(str(tmp_path / "t"), vocab_fingerprint="abc")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["vocab_fingerprint"] == "abc" and config["temperature"] == "1.5"
    back = LowRankTransform.from_pretrained(str(tmp_path / "t"), vocab_size=40)
    assert back.guard_margin == 0.5 and back.temperature == 1.5
    torch.testing.assert_close(back.b, t.b, rtol=0, atol=0)
    assert torch.equal(load_transform(tmp_path / "t").a, t.a)  # load_transform reads both forms
    with pytest.raises(ValueError, match="another tokenizer"):
        from_pretrained(tmp_path / "t", vocab_fingerprint="xyz")
    save_transform(t, tmp_path / "single.safetensors")  # the single-file format still reads
    assert torch.equal(load_transform(tmp_path / "single.safetensors").b, t.b)
    config["temperature"] = "9.0"
    (tmp_path / "t" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not describe"):
        load_transform(tmp_path / "t")
    save_pretrained(t, tmp_path / "t")  # rewriting replaces the directory whole
    assert load_transform(tmp_path / "t").temperature == 1.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["single.safetensors", "t"]


def test_purify_dataset_matches_purify(tmp_path):
    import datasets

    t = trained_like(LowRankTransform(30, 2), scale=0.05)
    logits = torch.randn(7, 30) * 3
    table = datasets.Dataset.from_dict({"logits": logits.tolist(), "id": list(range(7))})
    out = purify_dataset(table, t, batch_size=3, progress=False)
    torch.testing.assert_close(
        torch.tensor(out["logits"]), purify(logits, t, output="logprobs"), rtol=1e-5, atol=1e-5
    )
    assert out["id"] == list(range(7))
    top = purify_dataset(table, t, top_k=4, progress=False)
    values, ids = purify(logits, t, output="logprobs", top_k=4)
    assert torch.equal(torch.tensor(top["logits_top_ids"]), ids)
    assert "logits" not in top.column_names
    # the dataset's format is kept: torch in, torch out; a chosen column set too
    # (the same batches as `out`: another row count per GEMM may round differently)
    as_torch = purify_dataset(table.with_format("torch"), t, batch_size=3, progress=False)
    rows = as_torch[:]
    assert torch.equal(rows["logits"], torch.tensor(out["logits"]))
    assert torch.equal(rows["id"], torch.arange(7))
    only_ids = purify_dataset(table.with_format("numpy", columns=["id"]), t, progress=False)
    assert list(only_ids[0]) == ["id"]
    topk_only = datasets.Dataset.from_dict({"logits": [[0.0] * 5] * 2})
    with pytest.raises(ValueError, match="only full-vocabulary logits"):
        purify_dataset(topk_only, t, progress=False)
    ragged = datasets.Dataset.from_dict({"logits": [[0.0] * 30, [0.0] * 29]})
    with pytest.raises(ValueError, match=r"rows 0-1: 'logits' rows have \[29, 30\] entries"):
        purify_dataset(ragged, t, progress=False)
    bad = np.zeros((50, 30), dtype=np.float32)
    bad[33, 2] = np.nan  # named by its batch's rows, in a table that may hold millions
    with pytest.raises(ValueError, match="rows 32-47: logits contain NaN"):
        purify_dataset(datasets.Dataset.from_dict({"logits": bad}), t, batch_size=16)
    log_p = datasets.Dataset.from_dict({"logits": torch.log_softmax(logits, -1).tolist()})
    with pytest.raises(
        ValueError, match="rows 0-2: every row's logsumexp is at most 0.*allow_log_probs"
    ):
        purify_dataset(log_p, t, batch_size=3, progress=False)
    # an API's stored top 5, the rest masked: their logsumexp is below 0, still log-probs
    top_5 = torch.log_softmax(logits, -1)
    top_5[top_5 < top_5.topk(5).values[:, -1:]] = float("-inf")
    stored = datasets.Dataset.from_dict({"logits": top_5.tolist()})
    with pytest.raises(ValueError, match="rows 0-2: every row's logsumexp is at most 0"):
        purify_dataset(stored, t, batch_size=3, progress=False)
    anyway = purify_dataset(log_p, t, batch_size=3, progress=False, allow_log_probs=True)
    want = purify(torch.log_softmax(logits, -1), t, output="logprobs")
    torch.testing.assert_close(torch.tensor(anyway["logits"]), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no 'values' column"):
        purify_dataset(table, t, column="values", progress=False)
    # whole-table batches (datasets' reading of 0) and a bad top_k, named once before any batch
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        purify_dataset(table, t, batch_size=0, progress=False)
    with pytest.raises(ValueError, match=r"^top_k must be in \[1, 30\], got 31$"):
        purify_dataset(table, t, top_k=31, progress=False)


def test_purify_dataset_streams_and_goes_split_by_split():
    """A provider's large table is a stream (``streaming=True``) or a DatasetDict."""
    import datasets

    t = trained_like(LowRankTransform(30, 2), scale=0.05)
    logits = torch.randn(7, 30) * 3
    want = purify(logits, t, output="logprobs")
    table = datasets.Dataset.from_dict({"logits": logits.tolist(), "id": list(range(7))})
    stream = purify_dataset(table.to_iterable_dataset(), t, batch_size=3)
    assert isinstance(stream, datasets.IterableDataset)  # lazy: purified as it is read
    rows = list(stream)
    assert [r["id"] for r in rows] == list(range(7))
    got = torch.from_numpy(np.stack([r["logits"] for r in rows]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    top = list(purify_dataset(table.to_iterable_dataset(), t, top_k=2, batch_size=3))
    ids = torch.from_numpy(np.stack([r["logits_top_ids"] for r in top]))
    assert torch.equal(ids, want.topk(2).indices)
    as_torch = next(iter(purify_dataset(table.to_iterable_dataset().with_format("torch"), t)))
    assert isinstance(as_torch["logits"], torch.Tensor)  # its format kept
    log_p = {"logits": torch.log_softmax(logits, -1).tolist()}
    refused = purify_dataset(datasets.Dataset.from_dict(log_p).to_iterable_dataset(), t)
    with pytest.raises(ValueError, match="rows 0-6: every row's logsumexp is at most 0"):
        list(refused)

    def unnamed():  # a stream that does not know its columns until read
        yield from ({"scores": row} for row in logits.tolist())

    stream = datasets.IterableDataset.from_generator(unnamed)
    with pytest.raises(ValueError, match=r"rows 0-6: the dataset has no 'logits' column"):
        list(purify_dataset(stream, t))
    splits = datasets.DatasetDict({"train": table, "test": table.select(range(2))})
    out = purify_dataset(splits, t, progress=False)
    assert isinstance(out, datasets.DatasetDict) and list(out) == ["train", "test"]
    torch.testing.assert_close(torch.tensor(out["test"]["logits"]), want[:2], rtol=1e-5, atol=1e-5)
    splits["test"] = table.rename_column("logits", "scores")
    with pytest.raises(ValueError, match="split 'test': the dataset has no 'logits' column"):
        purify_dataset(splits, t, progress=False)


def test_rows_past_the_models_positions_are_named_before_anything_runs(
    tmp_path, tokenizer_and_model, capsys
):
    """The GPT-2 takes 256 positions: a longer row used to end training (or an
    evaluation, after its demo transform had trained) in an IndexError from
    the position embedding."""
    model_dir = str(tokenizer_and_model)
    long_prompt = " ".join(TEXTS * 6)  # about 400 of this vocabulary's tokens
    rows = [{"prompt": t, "answer": t} for t in TEXTS * 2]
    rows[5] = {"prompt": long_prompt, "answer": "The river."}
    answers = str(write_jsonl(tmp_path / "answers.jsonl", rows))
    texts = str(write_jsonl(tmp_path / "texts.jsonl", [{"text": long_prompt}] * 8))
    train = ["train", "--model", model_dir, "--objective", "cmi", "--stop-after", "1"]
    evaluate = ["evaluate", "--model", model_dir, "--quick"]
    shorten = "answers.jsonl: row 5 is"
    cases = [
        ([*train, "--data", answers, "--out", str(tmp_path / "a")], shorten, "shorten its prompt"),
        ([*evaluate, "--data", answers, "--out", str(tmp_path / "b")], shorten, "shorten its"),
        (
            [*train, "--data", texts, "--max-tokens", "300", "--out", str(tmp_path / "c")],
            "texts.jsonl: row 0 is cut at 300 tokens",
            "cut rows at 256 tokens or fewer",
        ),
    ]
    for argv, where, fix in cases:
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert where in error and "past the model's 256 positions" in error and fix in error
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing trained, nothing written
    # the fix each message gives works
    _, tokenizer = load_model(model_dir)
    n = len(tokenizer.encode(long_prompt, add_special_tokens=False))
    assert n > 256
    cal, held = load_examples(texts, tokenizer, max_tokens=256, context=256)
    assert max(len(e.input_ids) for e in cal + held) == 256


def test_a_providers_model_and_data_end_to_end(tmp_path, tokenizer_and_model, capsys):
    """train → evaluate --quick → fold → serve → the openai client, on a GPT-2
    with its own 700-token vocabulary and a JSONL file."""
    model_dir = str(tokenizer_and_model)
    data = str(write_jsonl(tmp_path / "mine.jsonl", [{"text": t} for t in TEXTS * 4]))
    out = tmp_path / "t"
    train = ["train", "--model", model_dir, "--data", data, "--objective", "cmi", "--rank", "4"]
    train += ["--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--no-guard", "--out", str(out)]
    train += ["--seed", "1"]  # evaluate's is 0: the held-out rows must still be the same
    assert main(train) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] > 0 and summary["selected_step"] is not None
    # the held-out rows evaluate scores students on are not the selection rule's
    calibration, held_out = load_examples(data, load_model(model_dir)[1], 64)
    seen = summary["examples"]
    assert held_out and seen["train"] > 0 and seen["validation"] > 0
    assert seen["train"] + seen["validation"] == len(calibration)
    transform = load_transform(out / "transform.safetensors", vocab_size=700)
    evaluate = ["evaluate", "--model", model_dir, "--data", data, "--quick", "--json"]
    evaluate += ["--transform", str(out / "transform.safetensors"), "--out", str(tmp_path / "e")]
    assert main(evaluate) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results["attacks"]["forward_kl"]) == {"no_defense", "cmiguard", "sharpen@0.5"}
    assert "likelihood_accuracy" not in results  # no capital questions for a provider's data
    folded = tmp_path / "folded"
    fold = ["fold", "--model", model_dir, "--transform", str(out / "transform.safetensors")]
    assert main([*fold, "--out", str(folded)]) == 0
    assert not list(tmp_path.glob(".folded*"))  # written atomically: no temporary left
    raw, tokenizer = load_model(model_dir)
    folded_model, _ = load_model(folded)
    ids = tokenizer.encode("The old town by the river", add_special_tokens=False)
    with torch.no_grad():
        want = purify(raw(torch.tensor([ids])).logits[0], transform, output="logprobs")
        got = torch.log_softmax(folded_model(torch.tensor([ids])).logits[0], -1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    import uvicorn

    args = build_parser().parse_args(
        ["serve", "--model", str(folded), "--unprotected", "--name", "mine", "--device", "cpu"]
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(serve_app(args), port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        reply = client.completions.create(
            model="mine", prompt=ids, max_tokens=1, logprobs=3, temperature=0
        )
        served = max(reply.choices[0].logprobs.top_logprobs[0].values())
        assert served == pytest.approx(float(want[-1].max()), abs=1e-4)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_transform_for_another_vocabulary_is_refused_everywhere(tmp_path, tokenizer_and_model):
    _, tokenizer = load_model(tokenizer_and_model)
    other = LowRankTransform(700, 2)
    save_transform(other, tmp_path / "other.safetensors", "0123456789abcdef")
    fold = ["fold", "--model", str(tokenizer_and_model), "--out", str(tmp_path / "f")]
    assert main([*fold, "--transform", str(tmp_path / "other.safetensors")]) == 2
    save_transform(LowRankTransform(49152, 2), tmp_path / "big.safetensors", "")
    assert main([*fold, "--transform", str(tmp_path / "big.safetensors")]) == 2
    assert not (tmp_path / "f").exists()
    assert vocab_fingerprint(tokenizer) != "0123456789abcdef"


def test_the_dataset_benchmark_runs_and_writes_its_json(tmp_path, monkeypatch, capsys):
    from bench import purify_dataset as bench

    out = tmp_path / "r.json"
    argv = ["purify_dataset.py", "--rows", "8", "--vocab", "64", "--rank", "4", "--batch-size", "3"]
    monkeypatch.setattr("sys.argv", [*argv, "--repeats", "1", "--out", str(out)])
    bench.main()
    result = json.loads(out.read_text())
    ways = [r["way"] for r in result["results"]]
    assert ways == ["purify (one tensor)", "purify_dataset", "map through Python lists"]
    assert result["results"][0]["over_floor"] == 1.0 and result["rows"] == 8
    assert result["repeats"] == 1 and result["timing"].startswith("median")
    assert all(r["rows_per_s"] > 0 for r in result["results"])
    assert "| purify_dataset |" in capsys.readouterr().out
