"""Word tags -> entities: adl's ``tag_spans`` (predict, serve, attach) agrees with seqeval's
``get_entities`` in its default mode (what training selects heads on) on every sequence."""

import random
import warnings

from seqeval.metrics.sequence_labeling import get_entities

from adl.serve.decode import tag_spans

IOB2 = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
# IOBES, a type holding a dash, and tags that are no NE tag at all (seqeval warns and still decodes them)
ODD = IOB2 + ["E-PER", "S-PER", "E-LOC", "S-LOC", "B-DATE-TIME", "I-DATE-TIME", "B", "I", "E", "S", "PER", ".", "X-Y"]


def test_the_documented_cases():
    assert tag_spans(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert tag_spans(["O", "I-PER", "I-PER"]) == [("PER", 1, 2)]  # an I after O starts an entity
    assert tag_spans(["B-PER", "I-LOC", "B-LOC", "B-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1), ("LOC", 2, 2), ("LOC", 3, 3)]
    assert tag_spans(["S-PER", "B-LOC", "E-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]
    assert tag_spans([]) == [] and tag_spans(["O", "O"]) == []


def test_agrees_with_seqeval_on_random_sequences():
    rng = random.Random(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns on the odd tags
        for vocab in (IOB2, ODD):
            for _ in range(3000):
                tags = [rng.choice(vocab) for _ in range(rng.randint(0, 12))]
                assert tag_spans(tags) == get_entities(tags), tags
