"""label.py's model-based step labellers: the judge's verdict parser and prompt, the Monte-Carlo rule,
both end to end with real tiny models, and resuming a partially written output."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from stepkto import engines, jsonl, judging, models, prompting, sharding

import label


@pytest.fixture(scope="module")
def coin_flip_policy(tmp_path_factory):
    """A tiny Llama trained to continue every step prefix of COMPLETIONS with \\boxed{14} or \\boxed{16},
    each about half of the time: its rollouts reach the gold answer 14 by chance, so mc labels depend
    on the seed."""
    tok = models.make_char_tokenizer()
    model = models.make_tiny_llama(tok, hidden_size=64, num_layers=1, intermediate_size=128, seed=0)
    prefixes = [sample_row(0, "")["prompt"] + p for c in COMPLETIONS for p in label.solution_prefixes(c, prompting.step_spans(c))]
    pairs = [(p, reply) for p in prefixes for reply in ("\\boxed{14}", "\\boxed{16}")]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p, _ in pairs]
    full_ids = [tok(p + r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p, r in pairs]
    width = max(map(len, full_ids))
    input_ids = torch.full((len(pairs), width), tok.pad_token_id)  # (N, S)
    targets = torch.full((len(pairs), width), -100)  # (N, S): loss on the reply and EOS only
    for i, (prompt, full) in enumerate(zip(prompt_ids, full_ids)):
        input_ids[i, : len(full)] = torch.tensor(full)
        targets[i, len(prompt) : len(full)] = torch.tensor(full[len(prompt) :])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):  # stops after ~50 steps: the loss floor is ln 2 on the digit, ~0.06 per token
        loss = model(input_ids=input_ids, attention_mask=(input_ids != tok.pad_token_id).long(), labels=targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1, f"the coin-flip policy did not learn its replies (loss {loss.item():.3f})"
    path = tmp_path_factory.mktemp("coin_flip_policy")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def sample_row(i, completion, answer="14", model="policy", solution=None):
    row = {"id": f"p{i}#0", "problem_id": f"p{i}", "problem": "Compute (3 + 4) * 2.", "answer": answer,
           "prompt": "Problem: Compute (3 + 4) * 2.\nSolution:\n", "completion": completion,
           "finish_reason": "stop", "gen": {"model": model}}
    return row if solution is None else {**row, "solution": solution}


COMPLETIONS = [
    "3 + 4 = 7\n\n7 * 2 = 14\n\nThe answer is \\boxed{14}.",
    "3 + 4 = 8\n\n8 * 2 = 16\n\nThe answer is \\boxed{16}.",
    "3 + 4 = 7\n\n7 * 2 = 14",  # no final answer
    "",  # no steps at all
]


# ----------------------------------------------------------------------------- verdict parser


@pytest.mark.parametrize(
    "reply, verdict",
    [
        # bare verdict words, any case, punctuation and markdown
        ("correct", True),
        (" Correct.", True),
        ("CORRECT!", True),
        ("**Correct**", True),
        ("incorrect", False),
        (" Incorrect.", False),
        ("INCORRECT", False),
        ("- **Incorrect**: 7 * 3 = 21", False),
        ("wrong", False),
        ("Wrong!", False),
        ("Invalid.", False),
        ("The step is valid.", True),
        ("The step is correct.", True),
        ("The step is not correct.", False),
        ("It isn't correct.", False),
        ("It isn\u2019t correct.", False),  # typographic apostrophe
        ("It wasn't correct.", False),
        ("The step is not valid.", False),
        ("The step is erroneous.", False),
        ("The reasoning in this step is flawed.", False),
        ("The step contains an error: 7 * 3 is 21, not 24.", False),
        ("The student made a sign mistake.", False),
        ("The step has no errors.", True),
        ("There is nothing wrong with this step.", True),
        ("I don't think the step is correct.", False),
        # hedges and qualifications: never True
        ("The step is not entirely correct.", False),
        ("Partially correct: the sign is off.", False),
        ("This step is not quite correct.", False),
        ("Mostly correct.", False),
        ("The step is almost right.", False),
        ("Correct, but the sign is off.", False),
        ("Correct. However, 7 * 3 is 21, not 24.", False),  # the qualification in the next sentence
        ("The step is correct except for the final multiplication.", False),
        ("Correct up to a sign.", False),
        ("That's not right.", False),
        ("It isn't right.", False),
        ("Not wrong.", None),  # a double negative vouches for nothing
        # explicit markers decide, and must agree
        ("Verdict: correct", True),
        ("verdict - Correct", True),
        ("The verdict is that the step is correct", True),
        ("\\boxed{correct}", True),
        ("\\boxed{\\text{Correct}}", True),
        ("**Verdict:** Incorrect", False),
        ("**Final verdict:** Correct", True),
        ("\\boxed{incorrect}", False),
        ("\\boxed{\\text{incorrect}}", False),
        ("Final answer: Incorrect", False),
        ("Answer: yes", True),
        ("Judgment: wrong", False),
        ("Verdict:\nIncorrect", False),
        ("Verdict: correct, but the sign is off.", False),
        ("Verdict: incorrect. The final answer is correct though.", False),  # the marker decides
        ("\\boxed{correct} \\boxed{incorrect}", None),  # markers that contradict each other: no verdict
        ("\\boxed{incorrect} Wait, let me recheck: 7 * 3 = 21. \\boxed{correct}", None),
        ("Correct.\n\nVerdict: incorrect", None),  # the opening verdict and the marker disagree
        ("Verdict: incorrect. Final verdict: incorrect", False),
        ("The step says 3 + 4 = 7, which is correct. Verdict: incorrect", False),
        ("Verdict: unsure", None),
        # reasoning first: the last sentence with a verdict decides
        ("Let me check: 3 + 4 = 7, which is correct. But 7 * 3 is 21, not 24. So the step is incorrect.", False),
        ("3 + 4 = 7 is correct. 7 * 3 = 24 is wrong. So the step is incorrect.", False),
        ("First, 3 + 4 = 8 would be wrong, but the student wrote 7. So the step is correct.", None),  # rule 6
        ("The step is correct. 7 * 3 = 24 is wrong.", None),  # right as a whole, wrong in a part: a contradiction
        ("Correct. 3 + 4 = 7, which is correct.", True),
        ("Let me verify. 7 * 3 = 21 and the step says 21. The step is correct.", True),
        ("Is the step correct? Let me compute: 7 * 3 = 21.", None),  # a question is no verdict
        # an opening verdict decides; "correct" as an adjective in its explanation is no verdict
        ("Incorrect. The correct value is 12.", False),
        ("Incorrect: the student should have written 21; the correct product is 21.", False),
        ("Correct. Nothing is wrong with it.", True),
        ("Correct. The student correctly adds 3 and 4.", True),
        ("The step is incorrect. 3 + 4 = 7 is correct, but 7 * 3 is not 24.", False),
        ("Incorrect, but the final answer is correct.", False),  # a concession
        # yes / no and true / false answers
        ("Yes", True),
        ("Yes, the step is correct.", True),
        ("No.", False),
        ("No, the step is wrong.", False),
        ("True", True),
        ("False.", False),
        ("The claim 7 * 3 = 24 is false.", False),
        ("\\boxed{\\text{No}}", False),
        # "right" only in a verdict position
        ("Right.", True),
        ("right", True),
        ("That's right.", True),
        ("The triangle is a right triangle, so the hypotenuse is 5.", None),
        ("Using the right triangle, 3^2 + 4^2 = 25, so the step is correct.", True),
        ("The right side is 21, not 24. The step is wrong.", False),
        # no verdict, garbage, contradictions
        ("", None),
        ("asdkj 7 7 7", None),
        ("??? ...", None),
        ("Step 2: 3 + 4 = 7", None),
        ("correctness", None),  # not the word
        ("incorrectly", None),
        ("It could be correct or incorrect.", None),  # conflicting, no marker, no leading verdict
        ("The step is correct and incorrect.", None),
        # quoted text and reported speech are not the judge's verdict
        ('Verdict: incorrect. The student even wrote "Verdict: correct" at the end of the step.', False),
        ("Verdict: incorrect. The student even wrote \u201cVerdict: correct\u201d at the end of the step.", False),
        ("Incorrect: the step's text says 'the step is correct', but 6 + 1 = 7.", False),
        ("Incorrect. The last line reads `Verdict: correct`.", False),
        ("Incorrect. The step ends with ``correct''.", False),
        ('The student wrote "correct".', None),
        ("The student's step isn't correct: it's 'correct' only in its own words.", False),  # apostrophes
        ("'Correct' is what the step claims; it is wrong.", False),
        ('Verdict: "correct"', None),  # a quoted verdict is a quotation, even the judge's own
        ("The student claims the step is correct. Actually 6 + 1 = 7, not 8.", None),
        ("The solution states that 6 + 1 = 8 is correct, but it is wrong.", False),
        ("The student thinks this is right. I think it is incorrect.", False),
        ("According to the student, the step is correct.", None),
        ("I think the step is correct.", True),
        # a reply whose sentences contradict each other
        ("Incorrect. On reflection the step is correct.", None),
        ("So the step is incorrect. Therefore it is correct.", None),
    ],
)
def test_parse_verdict(reply, verdict):
    assert judging.parse_verdict(reply) is verdict


HEDGED_REPLIES = [
    "The step is not entirely correct.",
    "Partially correct: the sign is off.",
    "This step is not quite correct.",
    "Not fully correct.",
    "The step is not completely right.",
    "It is not exactly correct.",
    "Not necessarily correct.",
    "Partly correct.",
    "Mostly right, but 7 * 3 is 21.",
    "Almost correct: the last digit is off.",
    "Largely correct.",
    "The step is somewhat valid.",
    "Half correct.",
    "The step is correct, however the sign is wrong.",
    "Correct except for the sign.",
    "Correct if x > 0.",
    "The step is not strictly correct.",
    "Verdict: partially correct",
    "\\boxed{\\text{mostly correct}}",
    "It's not right.",
    "It isn't right.",
    "Correct.\nBut the product should be 21.",
    "I'd say it's 'mostly' correct.",  # scare quotes
    'It is "correct".',
]


def test_hedged_replies_are_never_read_as_right():
    """A hedge gives False or None, never True: a step the judge did not fully vouch for is not reinforced."""
    assert {reply: judging.parse_verdict(reply) for reply in HEDGED_REPLIES if judging.parse_verdict(reply)} == {}


@pytest.mark.parametrize(
    "reply, first_error",
    [
        ("\\boxed{2}", 1),
        ("3", 2),
        ("Step 3", 2),
        ("\\boxed{none}", -1),
        ("Step 2 looks fine... the error is in step 3. \\boxed{3}", 2),  # reasoning first: the box decides
        ("\\boxed{2} Wait, step 1 already divides by zero. \\boxed{1}", None),  # two first errors: no verdict
        ("Step 2 is wrong: \\boxed{2}. (A careless reader might answer \\boxed{none}.)", None),
        ("\\boxed{2}. To restate: \\boxed{2}", 1),  # the same answer twice
        ('The instructions say "answer \\boxed{none} if every step is correct"; here \\boxed{3}', 2),  # a quote
        ("Step 1: 3 + 4 = 7 is correct. Every step checks out. \\boxed{none}", -1),
        ("\\boxed{7}", None),  # no such step
        ("\\boxed{2} Hmm, actually \\boxed{3", None),  # the last box never closes: a truncated reply
        ("I cannot tell.", None),
    ],
)
def test_parse_first_error(reply, first_error):
    assert judging.parse_first_error(reply, 4) == first_error


# ----------------------------------------------------------------------------- judge


def build_judge_prompt(tok, problem, reference, previous, step):
    return judging.judge_prompt(tok, judging.judge_step_question(problem, reference, previous, step), "\n\nVerdict:")


def test_judge_prompt_holds_problem_reference_previous_and_current_step():
    tok = models.make_char_tokenizer()
    prompt = build_judge_prompt(tok, "Compute 3 + 4.", "3 + 4 = 7", ["a = 3", "b = 4"], "a + b = 8")
    assert "Compute 3 + 4." in prompt and "Reference solution:\n3 + 4 = 7" in prompt
    assert "Step 1: a = 3\n\nStep 2: b = 4" in prompt and "Step to check:\na + b = 8" in prompt
    assert prompt.endswith("Verdict:")  # plain text: the char tokenizer has no chat template
    first = build_judge_prompt(tok, "Compute 3 + 4.", None, [], "3 + 4 = 7")
    assert judging.NO_REFERENCE in first and judging.NO_PREVIOUS_STEPS in first
    tok.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<assistant>"
    chat = build_judge_prompt(tok, "Compute 3 + 4.", None, [], "3 + 4 = 7")
    assert chat.startswith("<user>You are checking") and chat.endswith("</user><assistant>")
    # a chat API (no tokenizer here) gets the same user message, which its server templates
    assert build_judge_prompt(None, "Compute 3 + 4.", None, [], "3 + 4 = 7") == [
        {"role": "user", "content": chat.removeprefix("<user>").removesuffix("</user><assistant>")}]


def test_judge_step_verdicts_keeps_row_and_step_order():
    """One call for all steps; replies map back to their (row, step); unparseable replies give None."""
    tok = models.make_char_tokenizer()
    calls = []

    def ask(prompts):
        calls.append(len(prompts))
        steps = [p.split("Step to check:\n")[1].split("\n\n")[0] for p in prompts]
        replies = ["Correct." if "= 7" in s else "incorrect" if "= 8" in s else "hmm" for s in steps]
        return [engines.Sample(reply, "stop", [], []) for reply in replies]

    solutions = [("p", None, ["3 + 4 = 7", "x"]), ("p", "ref", []), ("p", None, ["3 + 4 = 8", "y = 7", "z"])]
    read = lambda sample: judging.parse_verdict(sample.text)  # noqa: E731
    assert judging.judge_step_verdicts(solutions, tok, ask, read) == [[True, None], [], [False, True, None]]
    assert calls == [5]


def entry(token: str, top: dict) -> engines.TokenLogprobs:
    return engines.TokenLogprobs(token, {t: math.log(p) for t, p in top.items()})


def test_verdict_score_is_the_verdict_mass_at_the_first_word():
    pieces = {"correct": {"correct", "cor"}, "incorrect": {"incorrect", "inc", "in"}}
    # markup before the first word is skipped; case, spaces and punctuation do not matter
    reply = [entry("**", {"**": 0.9}), entry("Correct", {"Correct": 0.6, " in": 0.2, "The": 0.1, "Cor": 0.05})]
    assert judging.verdict_score(reply, pieces) == pytest.approx(0.65 / 0.85)
    assert judging.verdict_score([entry("The", {"The": 0.5, "INCORRECT": 0.1})], pieces) == pytest.approx(0.0)
    assert judging.verdict_score([entry("The", {"The": 0.9, "A": 0.1})], pieces) is None  # no verdict among them
    assert judging.verdict_score([], pieces) is None and judging.verdict_score(None, pieces) is None
    # without a tokenizer (a chat API) any start of a verdict word of 3 letters or more counts, "I" / "In" do not
    chat = judging.verdict_pieces(None)
    assert judging.verdict_score([entry("In", {"In": 0.5, "Corr": 0.3, "Incor": 0.1, "I": 0.1})], chat) == pytest.approx(0.75)


def test_verdict_pieces_are_the_first_tokens_of_the_verdict_words():
    tok = models.make_char_tokenizer()  # one token per character
    assert judging.verdict_pieces(tok) == {"correct": {"c"}, "incorrect": {"i"}}


def test_judge_end_to_end_counts_unparseable_verdicts(tiny_model, tmp_path):
    rows = [sample_row(i, c, solution="(3 + 4) * 2 = 14" if i == 0 else None) for i, c in enumerate(COMPLETIONS)]
    src, out = tmp_path / "samples.jsonl", tmp_path / "labels.jsonl"
    jsonl.write_jsonl_atomic(src, rows)
    args = label.Args(input=str(src), output=str(out), prm="judge", judge_model=tiny_model,
                      judge_engine="transformers", judge_max_new_tokens=6, chunk_size=3)
    label.main(args)
    got = jsonl.read_jsonl(out, {"labels": list, "completions": list, "prm_failures": int, "outcome": bool})
    assert [len(r["labels"]) for r in got] == [3, 3, 2, 0]  # one label per step
    assert [r["outcome"] for r in got] == [True, False, False, False]
    # the untrained judge never says "correct" or "incorrect": every step is a counted failure, without a label
    assert [r["prm_failures"] for r in got] == [3, 3, 2, 0]
    assert all(step_label is None for r in got for step_label in r["labels"])
    assert all(0 <= r["prm_cutoffs"] <= r["prm_failures"] for r in got)
    assert {r["prm"] for r in got} == {"judge"}


def test_a_step_without_a_verdict_is_written_as_null_and_counted(monkeypatch, tmp_path):
    """A labeller's None is no verdict: label.py writes null, never a label nobody gave, and counts it."""
    verdicts = {"p0#0": [True, None, False], "p1#0": [None, None, None]}
    monkeypatch.setitem(label.LABELLERS, "check", lambda rows, spans, settings, engine=None: [verdicts[r["id"]] for r in rows])
    src, out = tmp_path / "samples.jsonl", tmp_path / "labels.jsonl"
    jsonl.write_jsonl_atomic(src, [sample_row(0, COMPLETIONS[0]), sample_row(1, COMPLETIONS[1])])
    assert label.label_file(str(src), str(out), label.Settings())
    assert '"labels": [true, null, false]' in out.read_text()
    got = jsonl.read_jsonl(out, jsonl.LABELLED_ROW)
    assert [(r["labels"], r["prm_failures"], r["prm_cutoffs"]) for r in got] == [
        ([True, None, False], 1, 0), ([None, None, None], 3, 0)]
    assert label.summary(got) == ("2 samples, 6 steps: 1 right, 1 wrong, 4 without a verdict (no evidence: left out "
                                  "of the step level)")


class ScriptedJudge:
    """A judge engine (no tokenizer: chat prompts) that replies to each step-protocol prompt by the step it checks,
    and to each first-error prompt by its problem: (text, finish_reason)."""

    tokenizer = None

    def __init__(self, replies: dict):
        self.replies = replies

    def generate(self, prompts, sampling, seed):
        keys = [p[0]["content"].split("Step to check:\n")[-1].split("\n\n")[0] for p in prompts]
        return [[engines.Sample(*self.replies[key], [], [])] for key in keys]


def test_a_reply_cut_off_at_the_token_budget_is_no_verdict(monkeypatch):
    """finish_reason "length": no verdict, whatever the text so far says; counted in prm_failures and prm_cutoffs."""
    judge = ScriptedJudge({"3 + 4 = 7": ("Correct.", "stop"),
                           "7 * 2 = 14": ("The first part, the sum, is correct. Next, the student multiplies and gets",
                                          "length"),
                           "The answer is \\boxed{14}.": ("hmm", "stop")})
    monkeypatch.setattr(label, "get_judge", lambda settings: judge)
    settings = label.Settings(prm="judge", judge_model="judge")
    assert judging.parse_verdict(judge.replies["7 * 2 = 14"][0]) is True  # the text alone reads as right
    [row] = label.label_rows([sample_row(0, COMPLETIONS[0], solution="ref")], settings)
    assert (row["labels"], row["prm_failures"], row["prm_cutoffs"]) == ([True, None, None], 2, 1)
    assert "1 of them because the judge's reply was cut off at its token budget (33% of the steps: raise " \
           "--judge_max_new_tokens)" in label.summary([row])


def test_a_first_error_reply_cut_off_leaves_every_step_of_its_solution_without_a_verdict(monkeypatch):
    rows = [sample_row(0, COMPLETIONS[0], solution="ref"), {**sample_row(1, COMPLETIONS[1]), "problem": "Compute 8."}]
    judge = ScriptedJudge({})
    judge.generate = lambda prompts, sampling, seed: [
        [engines.Sample("\\boxed{2}", "length" if "Compute (3 + 4)" in p[0]["content"] else "stop", [], [])]
        for p in prompts]
    monkeypatch.setattr(label, "get_judge", lambda settings: judge)
    settings = label.Settings(prm="judge", judge_model="judge", judge_protocol="first_error")
    got = label.label_rows(rows, settings)
    assert [(r["labels"], r["prm_failures"], r["prm_cutoffs"]) for r in got] == [
        ([None, None, None], 3, 3), ([True, False, False], 0, 0)]


def test_the_summary_asks_for_a_larger_budget_only_when_many_replies_were_cut_off():
    rows = [{"labels": [True] * 39 + [None], "prm_failures": 1, "prm_cutoffs": 1}]
    assert "cut off" in label.summary(rows) and "--judge_max_new_tokens" not in label.summary(rows)
    rows = [{"labels": [True] * 19 + [None], "prm_failures": 1, "prm_cutoffs": 1}]  # 5% of the steps
    assert "(5% of the steps: raise --judge_max_new_tokens)" in label.summary(rows)


# ----------------------------------------------------------------------------- Monte-Carlo rollouts


def test_mc_rule_counts_rollouts_that_reach_the_gold_answer():
    """K = 4 rollouts per step; the fake policy reaches 14 from a prefix with `= 7` in 3 of 4 tries,
    never after `= 8`, and stops at once (no new box) after a step that already holds the answer."""
    prompts_seen = []

    def rollout_fn(prompts):
        prompts_seen.extend(prompts)
        replies = []
        for p in prompts:
            if "\\boxed" in p:
                replies.append(["", "", "", ""])
            elif "= 8" in p:
                replies.append(["\\boxed{16}"] * 4)
            else:
                replies.append(["\\boxed{14}"] * 3 + ["\\boxed{15}"])
        return replies

    rows = [sample_row(i, c) for i, c in enumerate(COMPLETIONS)]
    spans = [prompting.step_spans(c) for c in COMPLETIONS]
    assert label.mc_step_labels(rows, spans, rollout_fn, 1) == [[True, True, True], [False, False, False], [True, True], []]
    assert label.mc_step_labels(rows, spans, rollout_fn, 4) == [[False, False, True], [False, False, False], [False, False], []]
    # prefix = prompt + completion through the end of step k + the step separator
    assert prompts_seen[:3] == [rows[0]["prompt"] + "3 + 4 = 7\n\n", rows[0]["prompt"] + "3 + 4 = 7\n\n7 * 2 = 14\n\n",
                                rows[0]["prompt"] + COMPLETIONS[0] + "\n\n"]


def mc_args(src, out, **overrides):
    return label.Args(input=str(src), output=str(out), prm="mc", engine="transformers", mc_rollouts=2,
                      mc_max_new_tokens=12, chunk_size=2, seed=1, **overrides)


def test_mc_end_to_end_with_the_rows_policy(tiny_model, tmp_path):
    """The untrained policy never writes a box: only a last step that holds the gold answer is right."""
    rows = [sample_row(i, c, model=tiny_model) for i, c in enumerate(COMPLETIONS)]
    src, out = tmp_path / "samples.jsonl", tmp_path / "labels.jsonl"
    jsonl.write_jsonl_atomic(src, rows)
    label.main(mc_args(src, out))  # no --policy_model: the rows' gen.model
    got = jsonl.read_jsonl(out, {"labels": list, "completions": list, "prm_failures": int})
    assert [r["labels"] for r in got] == [[False, False, True], [False, False, False], [False, False], []]
    assert [r["prm_failures"] for r in got] == [0, 0, 0, 0] and {r["prm"] for r in got} == {"mc"}
    assert [r["completions"] for r in got][0] == ["3 + 4 = 7", "7 * 2 = 14", "The answer is \\boxed{14}."]


def eight_rows(model):
    rows = [sample_row(i, c, model=model) for i, c in enumerate(COMPLETIONS * 2)]
    return [{**row, "id": f"p{i}#0", "problem_id": f"p{i}"} for i, row in enumerate(rows)]


def test_mc_labels_follow_the_seeded_rollouts(coin_flip_policy, tmp_path):
    src = tmp_path / "samples.jsonl"
    jsonl.write_jsonl_atomic(src, eight_rows(coin_flip_policy))
    runs = {}
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        label.main(replace(mc_args(src, tmp_path / f"{name}.jsonl"), seed=seed, chunk_size=8))
        runs[name] = [r["labels"] for r in jsonl.read_jsonl(tmp_path / f"{name}.jsonl")]
    steps = [step for labels in runs["a"] for step in labels]
    assert True in steps and False in steps  # 2 rollouts that each reach 14 about half of the time
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]


@pytest.mark.parametrize("prm", ["mc", "judge"])
def test_resume_after_partial_output(tiny_model, coin_flip_policy, tmp_path, prm):
    """A rerun keeps the complete chunks of OUTPUT.partial, drops a cut-off line, and ends with the
    output of an uninterrupted run (mc: each chunk is seeded from its row ids, not from its position)."""
    src, ref, out = tmp_path / "samples.jsonl", tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    jsonl.write_jsonl_atomic(src, eight_rows(coin_flip_policy))

    def args(output):
        if prm == "mc":
            return mc_args(src, output)
        return label.Args(input=str(src), output=str(output), prm="judge", judge_model=tiny_model,
                          judge_engine="transformers", judge_max_new_tokens=4, chunk_size=2, allow_missing_reference=True)

    label.main(args(ref))
    done = jsonl.jsonl_lines(ref.read_text(), keepends=True)
    # chunks 1-2 complete, a row of chunk 3, then a line cut short by a kill -9 (after the record was written)
    Path(str(out) + ".partial").write_text("".join(done[:5]) + done[5][:20])
    Path(str(out) + ".provenance.json").write_bytes(Path(str(ref) + ".provenance.json").read_bytes())
    label.main(args(out))
    assert out.read_text() == ref.read_text()


# ----------------------------------------------------------------------------- bad input


def test_bad_options_and_rows_are_reported(tiny_model, tmp_path):
    src = tmp_path / "samples.jsonl"
    jsonl.write_jsonl_atomic(src, [sample_row(0, COMPLETIONS[0]), {**sample_row(1, COMPLETIONS[1]), "gen": {}}])
    with pytest.raises(ValueError, match="--judge_model"):
        label.main(label.Args(input=str(src), output=str(tmp_path / "a.jsonl"), prm="judge"))
    with pytest.raises(ValueError, match="--mc_threshold"):
        label.main(mc_args(src, tmp_path / "b.jsonl", mc_threshold=3))
    with pytest.raises(ValueError, match="--prm .oracle.: must be one of check"):
        label.main(label.Args(input=str(src), output=str(tmp_path / "c.jsonl"), prm="oracle"))
    with pytest.raises(jsonl.DataError, match=rf"{src}: row 2 \(id 'p1#0'\): field 'gen.model'"):
        label.main(mc_args(src, tmp_path / "d.jsonl"))
    assert not list(tmp_path.glob("[abcd].jsonl*"))  # nothing written
    rows = [sample_row(0, COMPLETIONS[0], model="m1"), sample_row(1, COMPLETIONS[1], model="m2")]
    jsonl.write_jsonl_atomic(src, rows)
    with pytest.raises(jsonl.DataError, match="2 models"):
        label.main(mc_args(src, tmp_path / "e.jsonl"))


# ----------------------------------------------------------------------------- options reach what they set


class RecordingEngine:
    """A engines.Engine stand-in that records the sampling settings and seed of every call; every
    continuation is "\\boxed{14}" (the gold answer of sample_row)."""

    tokenizer = None

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling, seed):
        self.calls.append((sampling, seed))
        return [[engines.Sample("\\boxed{14}", "stop", [], []) for _ in range(sampling.n)] for _ in prompts]


def test_mc_settings_reach_the_sampler(monkeypatch):
    """--mc_temperature, --mc_rollouts, --mc_max_new_tokens and --seed reach the engine."""
    engine = RecordingEngine()
    monkeypatch.setattr(engines, "get_engine", lambda model, settings: engine)
    settings = label.Settings(prm="mc", policy_model="policy", mc_temperature=0.3, mc_rollouts=3, mc_max_new_tokens=7,
                              seed=5)
    rows = [sample_row(0, COMPLETIONS[0]), sample_row(1, COMPLETIONS[1])]
    labelled = label.label_rows(rows, settings)
    assert engine.calls == [(engines.Sampling(3, 0.3, 1.0, 7), sharding.derived_seed(5, ["p0#0", "p1#0"]))]
    assert [r["labels"] for r in labelled] == [[True] * 3, [True] * 3]  # every rollout reaches 14


def test_judge_counts_rows_without_a_reference_and_refuses_when_none_has_one(tiny_model, tmp_path, capsys):
    """The paper's judge compares each step with a reference solution (Section 2.1)."""
    src = tmp_path / "samples.jsonl"
    jsonl.write_jsonl_atomic(src, [sample_row(0, COMPLETIONS[0]), sample_row(1, COMPLETIONS[1])])
    settings = label.Settings(prm="judge", judge_model=tiny_model, judge_engine="transformers", judge_max_new_tokens=2)
    with pytest.raises(jsonl.DataError, match="no row has a reference solution.*--allow_missing_reference"):
        label.label_file(str(src), str(tmp_path / "refused.jsonl"), settings)
    assert not (tmp_path / "refused.jsonl").exists()
    jsonl.write_jsonl_atomic(src, [sample_row(0, COMPLETIONS[0], solution="3 + 4 = 7"), sample_row(1, COMPLETIONS[1])])
    assert label.label_file(str(src), str(tmp_path / "labels.jsonl"), settings)
    assert "1 of 2 rows have no reference solution" in capsys.readouterr().out
    engines.close_engine()
