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
