import pytest
import torch

from cmiguard import DiagLowRankTransform, LowRankTransform, fold_into_lm_head, purify
from cmiguard.train.models import tiny_model
from tests.conftest import trained_like


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_folded_model_logits_equal_purified_logits(tmp_path, arch):
    model = tiny_model(128, arch)
    ids = torch.randint(0, 128, (2, 9))
    raw = logits_of(model, ids)
    transform = trained_like(LowRankTransform(128, 4, temperature=1.7), scale=0.02)
    folded = fold_into_lm_head(model, transform)
    torch.testing.assert_close(logits_of(folded, ids), purify(raw, transform), rtol=1e-4, atol=1e-4)
    # the input embeddings were not touched by untying the head
    assert not torch.equal(
        folded.get_input_embeddings().weight, folded.get_output_embeddings().weight
    )
    folded.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(
        logits_of(reloaded, ids), purify(raw, transform), rtol=1e-4, atol=1e-4
    )


def test_fold_refuses_a_bias_the_head_cannot_hold():
    transform = trained_like(DiagLowRankTransform(128, 2))
    with pytest.raises(ValueError, match="without bias"):
        fold_into_lm_head(tiny_model(128), transform)
    with pytest.raises(ValueError, match="LM head has 128 rows"):
        fold_into_lm_head(tiny_model(128), LowRankTransform(100, 2))


@pytest.mark.teacher
def test_fold_on_the_real_teacher(teacher):
    model, tokenizer = teacher
    import copy

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    raw = logits_of(model, ids)
    transform = trained_like(LowRankTransform(model.config.vocab_size, 32), scale=1e-4)
    folded = fold_into_lm_head(copy.deepcopy(model), transform)
    torch.testing.assert_close(logits_of(folded, ids), purify(raw, transform), rtol=1e-4, atol=2e-4)
