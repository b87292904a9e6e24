"""The shapes world that the built-in model learns: seeded scenes, exact answers, and a pixel
checker that judges every rendered scene right (so it can judge generated images)."""

import random

from vlmkit.builtin import COLOURS, QUESTION_TYPES, SHAPES, caption, detect_objects, questions, render, sample_scene
from vlmkit.builtin.shapes import Scene, SceneObject, canonical


def test_the_same_seed_draws_the_same_scenes_and_pixels():
    first = [sample_scene(random.Random("s:1")) for _ in range(3)]
    again = [sample_scene(random.Random("s:1")) for _ in range(3)]
    assert first == again
    assert render(first[0]).tobytes() == render(again[0]).tobytes()


def test_checker_reads_every_rendered_scene_exactly():
    rng = random.Random("checker")
    for _ in range(150):
        scene = sample_scene(rng)
        seen = sorted((o.colour, o.shape, o.position) for o in detect_objects(render(scene)))
        assert seen == sorted((o.colour, o.shape, o.position) for o in scene.objects), scene


def test_every_colour_and_shape_is_told_apart_on_every_background():
    for background in ("white", "grey", "black"):
        for colour in COLOURS:
            for shape in SHAPES:
                scene = Scene(background, (SceneObject(shape, colour, "center", size=0.42),))
                (seen,) = detect_objects(render(scene))
                assert (seen.colour, seen.shape) == (colour, shape)


def test_questions_cover_every_type_with_exact_answers():
    scene = Scene("white", (SceneObject("circle", "red", "left"), SceneObject("star", "blue", "right")))
    asked = questions(scene, random.Random(0))
    assert {kind for kind, _, _ in asked} == set(QUESTION_TYPES)
    answers = {question: answer for _, question, answer in asked}
    assert answers["What shape is on the left?"] == "circle"
    assert answers["Where is the blue star?"] == "right"
    assert answers["How many shapes are there?"] == "two"
    assert answers["What is in this image?"] == caption(scene) == "a red circle on the left and a blue star on the right"


def test_training_conversations_ask_distinct_questions_about_one_scene():
    from vlmkit.builtin.source import ShapesSource

    source = ShapesSource(32, questions_per_image=3)
    for seed in range(20):
        rng = random.Random(f"conversation:{seed}")
        example = source.understanding(rng)
        roles = [m["role"] for m in example.messages]
        assert roles == ["user", "assistant"] * 3
        # the same draws, replayed, give the scene the conversation is about: every answer is its answer
        scene = source.scene(random.Random(f"conversation:{seed}"))
        answers = {q: a for _, q, a in questions(scene, random.Random(0))}
        asked = [m["content"] for m in example.messages[::2]]
        assert len(set(asked)) == 3
        for question, answer in zip(asked, [m["content"] for m in example.messages[1::2]]):
            if question in answers:  # the question's wording may be another of the same type
                assert answers[question] == answer
    assert len(ShapesSource(32).understanding(random.Random(0)).messages) == 2


def test_each_training_answer_names_the_object_its_question_asks_about():
    from vlmkit.builtin.source import ShapesSource

    source = ShapesSource(32, questions_per_image=3, two_object_share=0.8)
    seen = set()
    for seed in range(60):
        example = source.understanding(random.Random(f"subject:{seed}"))
        assert len(example.subjects) == len(example.messages) // 2
        for question, answer, subject in zip(example.messages[::2], example.messages[1::2], example.subjects):
            words = question["content"].rstrip("?").split()
            if subject is None:  # counting and describing ask about the whole scene
                assert words[:2] in (["How", "many"], ["What", "is"], ["Describe", "the"]), question
                continue
            named = example.scene.objects[subject]
            other = [o for o in example.scene.objects if o is not named]
            assert answer["content"] in (named.shape, named.colour, named.position)
            # what the question names (a colour, a shape or a position) belongs to the subject, not the other object
            names = {named.shape, named.colour, named.position} & set(words)
            assert names or question["content"] in ("What shape is this?", "What colour is the shape?",
                                                    "What color is the shape?")
            for o in other:
                assert not set(words) & ({o.shape, o.colour, o.position} - {named.shape, named.colour, named.position})
            seen.add((len(example.scene.objects), subject))
    assert {(2, 0), (2, 1), (1, 0)} <= seen


def test_the_share_of_two_object_scenes_follows_the_recipe():
    from vlmkit.builtin.source import ShapesSource

    def objects(share):
        source = ShapesSource(32, two_object_share=share)
        return [len(source.scene(random.Random(f"share:{i}")).objects) for i in range(200)]

    assert set(objects(0.0)) == {1} and set(objects(1.0)) == {2}
    assert 0.6 < objects(0.75).count(2) / 200 < 0.9
    easy = ShapesSource(32, two_object_share=1.0).scene(random.Random(0), easy=True)
    assert len(easy.objects) == 1


def test_canonical_generation_draws_one_picture_per_caption_and_background():
    from vlmkit.builtin.source import ShapesSource

    source = ShapesSource(64, canonical_generation=True)
    pictures = {}
    for i in range(300):
        rng = random.Random(f"canonical:{i}")
        example = source.generation(rng)
        scene = canonical(sample_scene(random.Random(f"canonical:{i}")))
        assert example.image.tobytes() == render(scene).tobytes()
        key = (scene.background, caption(scene))
        assert pictures.setdefault(key, example.image.tobytes()) == example.image.tobytes()
        seen = sorted((o.colour, o.shape, o.position) for o in detect_objects(example.image))
        assert seen == sorted((o.colour, o.shape, o.position) for o in scene.objects)
    assert len(pictures) < 300  # captions repeat, so the check above compared repeats
    jittered = ShapesSource(64).generation(random.Random("canonical:0")).image
    assert jittered.tobytes() != source.generation(random.Random("canonical:0")).image.tobytes()


def test_canonical_objects_on_the_token_grid_cover_the_same_patches_at_every_position():
    import numpy as np

    from vlmkit.builtin import POSITIONS

    token = 8
    tiles = {}
    for position in POSITIONS:
        scene = canonical(Scene("grey", (SceneObject("star", "red", position),)), grid=token / 64)
        image = render(scene)
        (seen,) = detect_objects(image)
        assert (seen.colour, seen.shape, seen.position) == ("red", "star", position)
        pixels = np.asarray(image)
        patches = [pixels[r:r + token, c:c + token].tobytes() for r in range(0, 64, token) for c in range(0, 64, token)]
        background = max(set(patches), key=patches.count)
        tiles[position] = sorted(p for p in patches if p != background)
    assert all(t == tiles["left"] for t in tiles.values())
    plain = [np.asarray(render(canonical(Scene("grey", (SceneObject("star", "red", p),))))) for p in ("left", "center")]
    assert plain[0][24:40, 0:32].tobytes() != plain[1][24:40, 16:48].tobytes()  # off the grid: not the same


def test_patch_labels_name_the_object_each_cell_of_the_rendering_shows():
    from vlmkit.builtin import BACKGROUNDS, POSITIONS
    from vlmkit.builtin.shapes import patch_labels
    from vlmkit.builtin.source import ShapesSource
    rng = random.Random("cells")
    for _ in range(40):
        scene = sample_scene(rng)
        image = render(scene, 64)
        labels = patch_labels(scene, 64, 8)
        assert len(labels) == 64 and set(labels) == set(range(len(scene.objects) + 1))
        for cell, label in enumerate(labels):
            box = ((cell % 8) * 8, (cell // 8) * 8, (cell % 8) * 8 + 8, (cell // 8) * 8 + 8)
            pixels = [image.getpixel((x, y)) for y in range(box[1], box[3]) for x in range(box[0], box[2])]
            colour = COLOURS[scene.objects[label - 1].colour] if label else None
            # judged on the rendering: a labelled cell shows its object's colour over an eighth of it (minus
            # anti-aliased edge pixels); a background cell shows no object over more than about an eighth
            near = sum(max(abs(a - b) for a, b in zip(p, colour)) < 40 for p in pixels) if colour else 0
            off_background = sum(max(abs(a - b) for a, b in zip(p, BACKGROUNDS[scene.background])) > 40
                                 for p in pixels)
            assert (near >= 4) if label else (off_background <= 12), (scene, cell, label)
    image, classes = ShapesSource(64).patch_example(random.Random("cells:source"), 8)
    scene = ShapesSource(64).scene(random.Random("cells:source"))
    assert image.tobytes() == render(scene, 64).tobytes()
    for cell, label in enumerate(patch_labels(scene, 64, 8)):
        obj = scene.objects[label - 1] if label else None
        assert classes["shape"][cell] == (1 + SHAPES.index(obj.shape) if obj else 0)
        assert classes["colour"][cell] == (1 + list(COLOURS).index(obj.colour) if obj else 0)
        assert classes["position"][cell] == (1 + POSITIONS.index(obj.position) if obj else 0)
