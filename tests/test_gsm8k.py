"""GSM8K loader, final-answer extraction and reward (vinekv/tasks/gsm8k.py): exact values, no model."""

from __future__ import annotations

import json
import threading

import pytest

from vinekv.tasks.gsm8k import extract_answer, load_jsonl, normalize_answer, reward

ITEMS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "question": "A library has 250 books on each of its 4 floors. How many books does it have?",
        "answer": "It has 250 * 4 = <<250*4=1000>>1,000 books.\n#### 1,000",
    },
    {
        "question": "The temperature was 5 degrees at noon and fell 8 degrees by midnight. "
        "What was the temperature at midnight?",
        "answer": "5 - 8 = <<5-8=-3>>-3\n#### -3",
    },
    {
        "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
        "How much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    },
]


def write_lines(tmp_path, lines: list[str]):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_reads_prompts_and_normalised_answers(tmp_path):
    path = write_lines(tmp_path, [json.dumps(ITEMS[0]), "", json.dumps(ITEMS[1]), "   ", *map(json.dumps, ITEMS[2:])])
    data = load_jsonl(path)
    assert data.column_names == ["prompt", "answer"]
    assert data["prompt"] == [item["question"] for item in ITEMS]
    assert data["answer"] == ["72", "1000", "-3", "10"]

    templated = load_jsonl(str(path), prompt_template="Q: {question}\nA:")
    assert templated["prompt"][2] == f"Q: {ITEMS[2]['question']}\nA:"
    assert templated["answer"] == ["72", "1000", "-3", "10"]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"question": "How many?", "answer": "#### 3"', "invalid JSON"),
        ('{"question": "How many?"}', "missing key(s) 'answer'"),
        ('{"answer": "#### 3"}', "missing key(s) 'question'"),
        ('["How many?", "#### 3"]', "expected a JSON object"),
        ('{"question": "How many?", "answer": 3}', "must be strings"),
        ('{"question": "How many?", "answer": "She has 3 apples."}', "no '#### <number>' line"),
        ('{"question": "How many?", "answer": "She has 3 apples.\\n####  "}', "no '#### <number>' line"),
    ],
)
def test_load_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path, [json.dumps(ITEMS[0]), "", bad_line, json.dumps(ITEMS[1])])
    with pytest.raises(ValueError) as error:
        load_jsonl(path)
    assert str(error.value).startswith(f"{path}, line 3: ")
    assert message in str(error.value)


def test_load_jsonl_empty_file(tmp_path):
    path = write_lines(tmp_path, ["", ""])
    with pytest.raises(ValueError, match="no examples"):
        load_jsonl(path)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        # right, wrong and missing answers
        ("48 / 2 = 24 in May, 48 + 24 = 72 in total.\n#### 72", "72"),
        ("48 + 48 = 96 in total.\n#### 96", "96"),
        ("I am not sure how to solve this.", None),
        ("", None),
        # formatted answers
        ("#### 1,234", "1234"),
        ("She earned $5.00.", "5"),
        ("#### $2.50", "2.5"),
        ("#### +7", "7"),
        (r"So the total is \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}} is wrong, the answer is \boxed{\dfrac{1}{2}}", r"\dfrac{1}{2}"),
        (r"\boxed{3 / 4}", "3/4"),
        (r"\boxed{\$1{,}000}", "1000"),
        ("The answer is: -3.", "-3"),
        ("the answer is 18, so she pays 18 dollars in total", "18"),
        ("The final answer is **72**.", "72"),
        (r"The answer is $\frac{1}{2}$. Done.", r"\frac{1}{2}"),
        ("#### 72 clips", "72"),
        # fallback to the last number; a binary minus is not a sign
        ("She has 3 apples and buys 4, so 7 apples.", "7"),
        ("10 - 3 = 7", "7"),
        ("The change is -4 degrees", "-4"),
        # priorities: the last ####, then boxes, then "the answer is", then numbers
        ("#### 5\nWait, let me recheck.\n#### 6\nThat is 7 in another base.", "6"),
        (r"The answer is 3. \boxed{4} 5", "4"),
        ("\\boxed{4}\n#### 8", "8"),
        (r"#### \boxed{8}.", "8"),
        ("The answer is 3, not 9.", "3"),
        ("#### \nso 12", "12"),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 1,000 ", "1000"),
        ("$5.00.", "5"),
        ("5.0", "5"),
        ("2.50", "2.5"),
        ("+12", "12"),
        ("-0.50", "-0.5"),
        ("-0", "0"),
        ("1,00", "1,00"),
        (r"\frac{1}{2}", r"\frac{1}{2}"),
        (r" \pi r^2 ", r"\pi r^2"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_reward_gsm8k_answers():
    completions = [
        "48 + 24 = 72\n#### 72",  # right
        "48 + 48 = 96\n#### 96",  # wrong
        "I don't know.",  # missing
        "The library has 1,000 books.\n#### 1,000",  # formatted, gold "1000"
        "She earned $10.00.",  # last-number fallback, decimal zeros
        "The answer is: -3.",  # negative
    ]
    answers = ["72", "72", "72", "1000", "10", "-3"]
    assert reward([""] * 6, completions, answers) == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    # gold values pass through the same normalisation; extra reward kwargs are ignored
    assert reward(["q"], ["#### 1000"], ["1,000"], trajectory_ids=[0]) == [1.0]
    # conversational completions: the last message's content
    assert reward(["q", "q"], [[{"role": "assistant", "content": "#### 72"}], []], ["72", "72"]) == [1.0, 0.0]


def test_reward_math_style_answers_via_math_verify():
    completions = [
        r"So \boxed{0.5}",
        r"So \boxed{1/3}",
        r"So \boxed{\dfrac{1}{2}}",
        r"So \boxed{2/4}",
        r"So \boxed{\sqrt{2}/2}",
        r"So \boxed{1 + x}",
        r"So \boxed{x - 1}",
        "#### 0.75",
        r"So \boxed{\frac{3}{4}}",
    ]
    answers = [r"\frac{1}{2}"] * 4 + [r"\frac{\sqrt{2}}{2}", "x+1", "x+1", "3/4", "0.75"]
    assert reward([""] * len(answers), completions, answers) == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def test_reward_math_verify_off_the_main_thread():
    """math-verify's timeouts use SIGALRM, main thread only: rewards computed elsewhere must still work."""
    result = []
    worker = threading.Thread(target=lambda: result.append(reward(["", ""], [r"\boxed{0.5}", "1/3"], [r"\frac12"] * 2)))
    worker.start()
    worker.join()
    assert result == [[1.0, 0.0]]


def test_reward_length_mismatch():
    with pytest.raises(ValueError, match="2 completions for 1 answers"):
        reward(["", ""], ["#### 1", "#### 2"], ["1"])
