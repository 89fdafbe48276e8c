"""stepkto/prompting.py: steps split at blank lines, the prompt templates and chat templates."""

from stepkto import models, prompting


def test_step_spans_and_split():
    text = "\n2 + 3 = 5\n\n5 * 4 = 20  \n \n\n\nThe answer is \\boxed{20}.\n"
    steps = prompting.step_texts(text, prompting.step_spans(text))
    assert steps == ["2 + 3 = 5", "5 * 4 = 20", "The answer is \\boxed{20}."]
    for (a, b), step in zip(prompting.step_spans(text), steps):
        assert text[a:b] == step
    assert prompting.step_texts("one step only", prompting.step_spans("one step only")) == ["one step only"]
    assert prompting.step_texts("  \n\n ", prompting.step_spans("  \n\n ")) == []


def test_chat_prompt_with_and_without_a_template():
    tok = models.make_char_tokenizer()
    assert prompting.chat_prompt(tok, "Is it right?", "\n\nVerdict:") == "Is it right?\n\nVerdict:"
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    assert prompting.chat_prompt(tok, "Is it right?", "\n\nVerdict:") == "<|user|>Is it right?<|assistant|>"
    assert prompting.chat_prompt(tok, "q", "", system="s") == "<|system|>s<|user|>q<|assistant|>"


def test_prompt_minimal_and_chat_template():
    tok = models.make_char_tokenizer()
    assert prompting.build_prompt(tok, "Compute 1 + 2.", "minimal") == "Problem: Compute 1 + 2.\nSolution:\n"
    plain = prompting.build_prompt(tok, "Compute 1 + 2.", "instruct")
    assert "\\boxed{}" in plain and "Compute 1 + 2." in plain and "blank line" in plain
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    chat = prompting.build_prompt(tok, "Compute 1 + 2.", "instruct")
    assert chat.startswith("<|user|>Solve") and chat.endswith("<|assistant|>")
