"""Outcome-only Step-KTO (w_step=0) equals TRL's KTOTrainer loss, computed by TRL itself.

TRL's KTOTrainer.compute_loss (trl 1.16: `_compute_loss`) is called on a batch from the trainer's own
dataloader and collator, with a real tiny LlamaForCausalLM and a perturbed reference. Our side recomputes
per-token log-probs from the same models on the same token ids (TRL sums them over completion tokens), takes
the batch's KL rows (TRL cycles completions within the batch) as the mismatched pairs for estimate_z0, and
calls stepkto_loss with w_step=0. Nothing of TRL's formula is re-typed here.
"""

import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl import KTOConfig, KTOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import perturbed_copy, tiny_llama  # noqa: E402
from stepkto_loss import estimate_z0, step_rewards, stepkto_loss  # noqa: E402

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
WORDS = [str(d) for d in range(10)] + "+ - * = ? . what is so the answer step add carry".split()
BATCH_SIZE = 4

# prompt, completion, label: mixed labels, unequal lengths; two batches of 4 (one 3:1, one 2:2).
ROWS = [
    ("what is 2 + 3 ?", " 2 + 3 = 5 so the answer is 5", True),
    ("what is 4 * 2 ?", " 4 * 2 = 6 .", False),
    ("what is 7 - 1 ?", " step 7 - 1 = 6 so 6", True),
    ("what is 9 + 9 ?", " 9 + 9 = 18 carry 1 so the answer is 18", True),
    ("what is 3 * 3 ?", " 9", True),
    ("what is 8 - 5 ?", " 8 - 5 = 2 so the answer is 2", False),
    ("what is 6 + 1 ?", " add 1 to 6 = 7", True),
    ("what is 5 * 0 ?", " 5 * 0 = 5 .", False),
]


def tiny_tokenizer():
    """A word-level tokenizer built in memory (no downloads), wrapped as a transformers tokenizer."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def completion_logratios(policy, reference, input_ids, attention_mask, completion_mask):
    """(B,) sum over completion tokens of log pi - log pi_ref: the one-step case of step_rewards."""
    def token_logps(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
        return logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)

    # Position j scores token j+1: a completion token is step 0, anything else (prompt, padding) is -1.
    step_ids = torch.where(completion_mask[:, 1:].bool(), 0, -1)  # (B, T-1)
    with torch.no_grad():
        return step_rewards(token_logps(policy), token_logps(reference), step_ids, num_steps=1)[:, 0]


def trl_trainer(tmp_path, policy, reference, tokenizer, beta, desirable_weight, undesirable_weight):
    prompts, completions, labels = zip(*ROWS)
    dataset = Dataset.from_dict({"prompt": list(prompts), "completion": list(completions), "label": list(labels)})
    args = KTOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH_SIZE, beta=beta,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        report_to="none", use_cpu=True, max_length=None, disable_tqdm=True,
    )
    return KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize("beta, desirable_weight, undesirable_weight", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.7)])
def test_outcome_only_equals_trl_kto_trainer_loss(tmp_path, beta, desirable_weight, undesirable_weight):
    tokenizer = tiny_tokenizer()
    policy = tiny_llama(len(tokenizer), seed=0)
    reference = perturbed_copy(policy, seed=0)  # seeds chosen so that z0 is clamped in one batch, not the other
    trainer = trl_trainer(tmp_path, policy, reference, tokenizer, beta, desirable_weight, undesirable_weight)
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == len(ROWS) // BATCH_SIZE
    raw_kl_means, z0s = [], []
    for batch in batches:
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, batch)

        outcome = completion_logratios(
            policy, reference, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )  # (B,)
        kl_pairs = completion_logratios(  # (B,) the batch's KL rows: prompt i with completion i-1
            policy, reference, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"]
        )
        z0 = estimate_z0(kl_pairs)
        no_steps = torch.zeros(BATCH_SIZE, 0, dtype=torch.bool)
        ours, metrics = stepkto_loss(outcome, batch["label"].bool(), torch.zeros(BATCH_SIZE, 0), no_steps, no_steps, z0,
                                     beta=beta, lambda_d=desirable_weight, lambda_u=undesirable_weight, w_step=0.0)

        raw_kl_means.append(kl_pairs.mean().item())
        z0s.append(z0.item())
        assert batch["label"].any() and not batch["label"].all()
        assert trainer._metrics["train"]["kl"][-1] == pytest.approx(z0.item(), rel=1e-5)
        assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5)
        assert "loss/step" not in metrics
    # Both regimes of z0 were compared: clamped to 0 (negative raw mean) and a positive reference point.
    assert min(raw_kl_means) < 0 and max(z0s) > 0.1
