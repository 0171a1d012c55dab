import pytest

from clvr.world.parser import ParseError, parse, tokenize
from clvr.world.vocab import words


def test_single_object_with_exact_count():
    md = parse("a red circle")
    assert md["tag"] == "world" and md["prompt"] == "a red circle"
    assert md["include"] == [{"class": "circle", "count": 1, "color": "red"}]
    assert md["exclude"] == [{"class": "circle", "count": 2}]


def test_relations_references_and_negations():
    md = parse("A photo of two red circles, a blue square above the red circles, three triangles "
               "to the left of the blue square and no green squares.")
    assert md["include"] == [
        {"class": "circle", "count": 2, "color": "red"},
        {"class": "square", "count": 1, "color": "blue", "position": ["above", 0]},
        {"class": "triangle", "count": 3, "position": ["left of", 1]},
    ]
    assert sorted(map(str, md["exclude"])) == sorted(map(str, [
        {"class": "circle", "count": 3}, {"class": "square", "count": 2}, {"class": "triangle", "count": 4},
        {"class": "square", "count": 1, "color": "green"}]))


def test_geneval_position_form_puts_the_new_target_first():
    md = parse("a photo of a circle right of a square")
    assert md["include"] == [{"class": "square", "count": 1},
                             {"class": "circle", "count": 1, "position": ["right of", 0]}]


def test_counts_sum_per_class_and_digits():
    md = parse("2 red circles and three blue circles")
    assert {"class": "circle", "count": 6} in md["exclude"]
    assert md["include"][0]["count"] == 2


@pytest.mark.parametrize("prompt,needle", [
    ("a purple circle", "unknown word 'purple' at characters 2-8"),
    ("a red hexagon", "unknown word 'hexagon' at characters 6-13"),
    ("a red circles", "'a red circles' (characters 0-13)"),
    ("two red circle", "does not agree"),
    ("a red circle above", "ends after 'above'"),
    ("a red circle above the blue square", "'the blue square' (characters 19-34) refers to nothing"),
    ("a red circle, a blue circle and a square above the circle", "ambiguous"),
    ("a red circle and a red circle", "repeats"),
    ("red circle", "expected a count"),
    ("a red circle,, a square", "missing words before ','"),
    ("a red circle and", "ends without a clause"),
    ("zero circles", "at least 1"),
    ("a circle above a square below a triangle", "one relation per clause"),
    ("no circles", "nothing to draw"),
    ("   ", "empty prompt"),
    ("a circle; a square", "unexpected ';'"),
])
def test_errors_name_the_offending_span(prompt, needle):
    with pytest.raises(ParseError) as e:
        parse(prompt)
    assert needle in str(e.value)


def test_every_token_is_a_vocab_word():
    known = set(words())
    for t in tokenize("a photo of two red circles, a blue square to the left of the red circles and no triangles."):
        assert t.text in known
