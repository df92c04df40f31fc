import pytest

from engine.rl.answer_extraction import answer_line, extract_choice, extract_final_answer, is_choice_gold, last_boxed, split_think


@pytest.mark.parametrize("response,expected", [
    (r"<think>so</think>The answer is \boxed{\frac{1}{\sqrt{2}}}.", r"\frac{1}{\sqrt{2}}"),   # nested braces
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),                                                        # escaped braces
    (r"first \boxed{3}, then \boxed{4}", "4"),                                               # the last one
    (r"Answer: $\frac{3}{4}$.", r"\frac{3}{4}"),
    ("<think>Answer: 5</think>Final answer: 7", "7"),                                        # reasoning ignored
    ("**Answer:** (B)", "(B)"),
    (r"\boxed 5", "5"),
    ("<think>never closed \\boxed{3}", None),                                                # truncated
    (r"\boxed{unbalanced", None),                                                            # malformed
    ("no answer here", None),
    (r"\fbox{x+1}", "x+1"),
])
def test_extract_final_answer(response, expected):
    assert extract_final_answer(response) == expected


@pytest.mark.parametrize("text,letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B) 42", "B"), (r"\text{C}", "C"), ("Option D", "D"), ("E:", "E"),
    ("(b)", "B"), ("b", None), ("Bx", None), ("42", None), ("", None), (None, None),
])
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_helpers():
    assert split_think("<think>r</think>a") == ("r", "a")
    assert split_think("plain") == ("", "plain")
    assert split_think("<think>r") == ("r", None)
    assert last_boxed("none") is None
    assert answer_line("Answer:   ") is None
    assert is_choice_gold("(C)") and not is_choice_gold("Chlorine")
