import numpy as np
import pytest

from clvr.steps import OP_ARGS, SchemaError, Step, step_json_schema
from clvr.world.render import render
from clvr.world.scene import Obj, Scene
from clvr.world.vocab import OPS


def test_every_op_has_args_and_schema_variant():
    assert set(OP_ARGS) == set(OPS)
    variants = step_json_schema()["anyOf"]
    assert [v["properties"]["op"]["const"] for v in variants] == list(OPS)


@pytest.mark.parametrize("raw", [
    {"op": "add", "shape": "circle", "color": "red", "cell": [1, 2]},
    {"op": "recolor", "shape": "square", "color": "red", "cell": [0, 0], "new_color": "blue"},
    {"op": "move", "shape": "triangle", "color": "green", "cell": [0, 0], "to": [3, 3]},
    {"op": "generate", "prompt": "a red circle"},
    {"op": "stop"},
])
def test_valid_steps_round_trip(raw):
    step = Step.from_dict(raw)
    assert step.to_dict() == raw


@pytest.mark.parametrize("raw,needle", [
    ({"op": "paint"}, "op 'paint'"),
    ([1, 2], "must be an object"),
    ({"op": "add", "shape": "hexagon", "color": "red", "cell": [0, 0]}, "hexagon"),
    ({"op": "add", "shape": "circle", "color": ["red"], "cell": [0, 0]}, "color"),
    ({"op": ["add"]}, "op"),
    ({"op": "add", "shape": "circle", "color": "red", "cell": [0, 4]}, "outside"),
    ({"op": "add", "shape": "circle", "color": "red", "cell": [0, True]}, "integers"),
    ({"op": "add", "shape": "circle", "color": "red"}, "needs"),
    ({"op": "stop", "cell": [0, 0]}, "takes no"),
    ({"op": "generate", "prompt": ""}, "non-empty"),
])
def test_schema_rejects(raw, needle):
    with pytest.raises(SchemaError, match=needle):
        Step.from_dict(raw)


def test_apply_matches_instruction_semantics():
    scene = Scene((Obj("circle", "red", 0, 0),))
    add = Step("add", "square", "blue", (1, 1))
    assert add.instruction() == "add a blue square at row 1 column 1"
    s2 = add.apply(scene)
    assert s2.at((1, 1)) == Obj("square", "blue", 1, 1)
    moved = Step("move", "circle", "red", (0, 0), to=(3, 3)).apply(s2)
    assert moved.at((0, 0)) is None and moved.at((3, 3)).shape == "circle"
    assert Step("recolor", "circle", "red", (0, 0), new_color="green").apply(scene).at((0, 0)).color == "green"
    assert Step("remove", "circle", "red", (0, 0)).apply(scene).objects == ()
    assert not np.array_equal(render(scene), render(s2))


def test_scene_rejects_shared_cell():
    with pytest.raises(ValueError, match="share a cell"):
        Scene((Obj("circle", "red", 0, 0), Obj("square", "blue", 0, 0)))


# --- multi-op steps: {"op": "edit", "ops": [...]}, one generator call ---

EDIT = {"op": "edit", "ops": [
    {"op": "add", "shape": "circle", "color": "red", "cell": [0, 1]},
    {"op": "recolor", "shape": "square", "color": "blue", "cell": [2, 2], "new_color": "green"},
    {"op": "move", "shape": "triangle", "color": "yellow", "cell": [3, 0], "to": [3, 3]},
    {"op": "remove", "shape": "circle", "color": "green", "cell": [1, 1]},
]}


def test_multi_op_round_trip_text_regions_apply():
    step = Step.from_dict(EDIT)
    assert step.to_dict() == EDIT and Step.from_dict(step.to_dict()) == step
    assert [p.op for p in step.parts()] == ["add", "recolor", "move", "remove"]
    assert all(p.parts() == (p,) for p in step.parts())
    assert step.instruction() == (
        "add a red circle at row 0 column 1. recolor the blue square at row 2 column 2 to green. "
        "move the yellow triangle at row 3 column 0 to row 3 column 3. remove the green circle at row 1 column 1")
    assert step.regions() == ((0, 1), (2, 2), (3, 0), (3, 3), (1, 1))
    scene = Scene((Obj("square", "blue", 2, 2), Obj("triangle", "yellow", 3, 0), Obj("circle", "green", 1, 1)))
    after = step.apply(scene)
    assert after == Scene((Obj("circle", "red", 0, 1), Obj("square", "green", 2, 2), Obj("triangle", "yellow", 3, 3)))
    one = Step.from_dict({"op": "edit", "ops": EDIT["ops"][:1]})  # k = 1 is allowed: the same as the bare add
    assert one.apply(Scene(())) == Step.from_dict(EDIT["ops"][0]).apply(Scene(()))
    assert one.instruction() == Step.from_dict(EDIT["ops"][0]).instruction()


@pytest.mark.parametrize("raw,needle", [
    ({"op": "edit", "ops": []}, "non-empty list"),
    ({"op": "edit", "ops": {"op": "add"}}, "non-empty list"),
    ({"op": "edit"}, "needs \\['ops'\\]"),
    ({"op": "edit", "ops": [EDIT["ops"][0]], "cell": [0, 0]}, "takes no"),
    ({"op": "edit", "ops": [{"op": "stop"}]}, r"ops\[0\]: op 'stop' cannot be inside"),
    ({"op": "edit", "ops": [EDIT["ops"][0], {"op": "generate", "prompt": "x"}]}, r"ops\[1\]: op 'generate'"),
    ({"op": "edit", "ops": [EDIT]}, "op 'edit' cannot be inside"),
    ({"op": "edit", "ops": [EDIT["ops"][0], {**EDIT["ops"][1], "cell": [0, 1]}]}, r"ops\[0\] and ops\[1\] both act on cell \[0, 1\]"),
    ({"op": "edit", "ops": [EDIT["ops"][0], {**EDIT["ops"][2], "to": [0, 1]}]}, "both act on cell"),  # a move's destination
    ({"op": "edit", "ops": [EDIT["ops"][0], {"op": "add", "shape": "hexagon", "color": "red", "cell": [1, 1]}]},
     r"ops\[1\]: shape 'hexagon'"),
    ({"op": "edit", "ops": [{"op": "add", "shape": "circle", "color": "red", "cell": [0, 9]}]}, r"ops\[0\]: cell .* outside"),
    ({"op": "edit", "ops": [[1, 2]]}, r"ops\[0\]: step must be an object"),
    ({"op": "edit", "ops": [{"op": "add", "shape": "circle", "color": "red", "cell": [r, c]}
                            for r in range(5) for c in range(4)]}, "at most 16"),
])
def test_multi_op_schema_rejects(raw, needle):
    with pytest.raises(SchemaError, match=needle):
        Step.from_dict(raw)


def test_multi_op_json_schema_matches_from_dict():
    jsonschema = pytest.importorskip("jsonschema")
    schema = step_json_schema()
    edit = next(v for v in schema["anyOf"] if v["properties"]["op"]["const"] == "edit")
    assert [v["properties"]["op"]["const"] for v in edit["properties"]["ops"]["items"]["anyOf"]] == \
        ["add", "remove", "recolor", "move"]
    jsonschema.validate(EDIT, schema)
    jsonschema.validate(Step.from_dict(EDIT).to_dict(), schema)
    for bad in ({"op": "edit", "ops": []}, {"op": "edit", "ops": [{"op": "stop"}]},
                {"op": "edit", "ops": [{**EDIT["ops"][0], "extra": 1}]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(SchemaError):
            Step.from_dict(bad)
