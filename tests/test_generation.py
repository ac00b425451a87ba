import pytest
import torch

from cmiguard import LowRankTransform, fold_into_lm_head, purify, save_transform
from cmiguard.cli import main
from cmiguard.serve.generation import PurifyLogitsProcessor, generate_purified
from cmiguard.train.models import tiny_model
from tests.conftest import trained_like


def test_generate_scores_and_logits_are_purified():
    model = tiny_model(128)
    transform = trained_like(LowRankTransform(128, 4, temperature=1.5), scale=0.05)
    ids = torch.randint(0, 128, (3, 5))
    out = generate_purified(
        model, transform, input_ids=ids, max_new_tokens=6, do_sample=False,
        return_dict_in_generate=True, output_scores=True, output_logits=True, pad_token_id=0,
    )  # fmt: skip
    raw = model.generate(
        input_ids=out.sequences[:, :-1], max_new_tokens=1, do_sample=False,
        return_dict_in_generate=True, output_logits=True, pad_token_id=0,
    )  # fmt: skip
    # the last step's logits, recomputed raw, purify to what generate returned
    torch.testing.assert_close(
        out.logits[-1], purify(raw.logits[0], transform), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(out.scores[-1], out.logits[-1], rtol=1e-5, atol=1e-5)
    # greedy decoding on the folded model picks the same tokens
    folded = fold_into_lm_head(tiny_model(128), transform)
    same = folded.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(same, out.sequences)


def test_beam_search_purifies_logits_not_the_log_probs_it_hands_processors():
    """Beam search hands processors log-probs, and ``T`` is not shift-invariant:
    ``T(log p) ≠ T(z) − c``. ``generate_purified`` must beam-search what the
    folded model does, ``log_softmax(T(z)/τ)``."""
    model = tiny_model(128)
    transform = trained_like(LowRankTransform(128, 4, temperature=1.5), scale=0.3)
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(3))
    beams = {"num_beams": 3, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    kwargs = {"return_dict_in_generate": True, "output_scores": True, **beams}
    out = generate_purified(model, transform, input_ids=ids, **kwargs)
    folded = fold_into_lm_head(tiny_model(128), transform)
    want = folded.generate(input_ids=ids, **kwargs)
    assert torch.equal(out.sequences, want.sequences)
    torch.testing.assert_close(out.sequences_scores, want.sequences_scores, rtol=1e-4, atol=1e-4)
    for got, ref in zip(out.scores, want.scores, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_processor_refuses_beam_search_log_probs_unless_the_transform_is_centred():
    """The processor cannot see ``z`` in beam search, only ``log p``: an uncentred
    transform is refused there; a centred one beam-searches what the folded model
    does (``T(z − c) = T(z) − c``, renormalised)."""
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    beams = {"num_beams": 3, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    kwargs = {"return_dict_in_generate": True, "output_scores": True, **beams}
    uncentred = trained_like(LowRankTransform(128, 4), scale=0.3)
    processor = PurifyLogitsProcessor(uncentred)
    with pytest.raises(ValueError, match="handed log-probs.*generate_purified"):
        tiny_model(128).generate(input_ids=ids, logits_processor=[processor], **beams)
    # greedy decoding hands it logits: purified as before
    logits = torch.randn(2, 128) * 5 + 20
    torch.testing.assert_close(processor(ids, logits), purify(logits, uncentred))
    centred = trained_like(LowRankTransform(128, 4, centered=True, temperature=1.5), scale=0.3)
    got = tiny_model(128).generate(
        input_ids=ids, logits_processor=[PurifyLogitsProcessor(centred)], **kwargs
    )
    want = fold_into_lm_head(tiny_model(128), centred).generate(input_ids=ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for step, ref in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(step, ref, rtol=1e-4, atol=1e-4)


def test_processor_takes_log_probs_an_earlier_processor_masked_as_log_probs():
    """Beam search masks tokens after its log_softmax (bad words here), so the
    rows reach the processor summing to less than 1: still log-probs. An
    uncentred transform is refused; a centred one (bf16 factors too) purifies
    them as it purifies the logits with those tokens masked."""
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(5))
    beams = {"num_beams": 3, "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    beams |= {"bad_words_ids": [[5], [7]], "return_dict_in_generate": True, "output_scores": True}
    z = torch.randn(4, 128, generator=torch.Generator().manual_seed(6)) * 5
    log_p = torch.log_softmax(z, -1)
    log_p[:, [5, 7]] = float("-inf")
    uncentred = PurifyLogitsProcessor(trained_like(LowRankTransform(128, 4), scale=0.3))
    with pytest.raises(ValueError, match="handed log-probs"):
        uncentred(ids, log_p)
    with pytest.raises(ValueError, match="handed log-probs"):
        tiny_model(128).generate(input_ids=ids, logits_processor=[uncentred], **beams)
    t = LowRankTransform(128, 4, centered=True, factor_dtype="bfloat16", temperature=1.5)
    centred = trained_like(t, scale=0.3)
    masked = z.clone()
    masked[:, [5, 7]] = float("-inf")
    want = purify(masked, centred, output="logprobs")
    got = PurifyLogitsProcessor(centred)(ids, log_p)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    out = tiny_model(128).generate(
        input_ids=ids, logits_processor=[PurifyLogitsProcessor(centred)], **beams
    )
    for step in out.scores:  # each step's rows: the purified rest, renormalised
        assert torch.isneginf(step[:, [5, 7]]).all()
        torch.testing.assert_close(step.logsumexp(-1), torch.zeros(len(step)))


def test_a_head_that_is_not_called_is_named_not_left_raw():
    """A model whose logits bypass its output-embeddings module would return raw
    logits from a hook that never fired: refused, as is a model without a head."""
    model, transform = tiny_model(128), LowRankTransform(128, 2)
    ids = torch.randint(0, 128, (1, 4))
    model.get_output_embeddings = lambda: torch.nn.Linear(64, 128)  # not what forward calls
    with pytest.raises(RuntimeError, match="without calling its LM head module"):
        generate_purified(model, transform, input_ids=ids, max_new_tokens=2, pad_token_id=0)
    model.get_output_embeddings = lambda: None
    with pytest.raises(ValueError, match="has no output embeddings"):
        generate_purified(model, transform, input_ids=ids, max_new_tokens=2, pad_token_id=0)


def test_padded_vocabulary_is_masked():
    transform = LowRankTransform(100, 2)
    scores = torch.randn(2, 128)
    out = PurifyLogitsProcessor(transform)(None, scores)
    assert torch.isneginf(out[:, 100:]).all()
    torch.testing.assert_close(out[:, :100], scores[:, :100])
    with pytest.raises(ValueError, match="fewer than"):
        PurifyLogitsProcessor(transform)(None, torch.randn(2, 50))


def test_fold_command_writes_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(128)
    model.save_pretrained(tmp_path / "model")
    transform = trained_like(LowRankTransform(128, 4), scale=0.05)
    save_transform(transform, tmp_path / "t.safetensors")
    argv = [
        "fold",
        "--model",
        str(tmp_path / "model"),
        "--transform",
        str(tmp_path / "t.safetensors"),
    ]
    assert main([*argv, "--out", str(tmp_path / "folded")]) == 0
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded")
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        want = purify(model(ids).logits, transform)
        torch.testing.assert_close(folded(ids).logits, want, rtol=1e-4, atol=1e-4)
    save_transform(LowRankTransform(64, 2), tmp_path / "other.safetensors")
    bad = [
        "fold",
        "--model",
        str(tmp_path / "model"),
        "--transform",
        str(tmp_path / "other.safetensors"),
    ]
    assert main([*bad, "--out", str(tmp_path / "x")]) == 2


@pytest.mark.teacher
def test_real_teacher_generate_keeps_the_greedy_answer(teacher):
    model, tokenizer = teacher
    transform = LowRankTransform(model.config.vocab_size, 32, temperature=3.0)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    raw = model.generate(ids, max_new_tokens=4, do_sample=False)
    out = generate_purified(model, transform, input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, raw)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_vllm_adapter_says_what_to_install_without_vllm():
    import importlib.util
    import sys

    assert importlib.util.find_spec("vllm") is None  # cmiguard does not install vLLM
    sys.modules.pop("cmiguard.serve.vllm_adapter", None)
    with pytest.raises(ImportError, match="pip install vllm.*cmiguard fold"):
        import cmiguard.serve.vllm_adapter  # noqa: F401
