"""nanochat's synthetic spelling tasks, generated offline from an embedded list of common English words.

- SpellingBee: "How many r are in strawberry?" The answer spells the word out letter by letter, counts the hits by
  hand, then double-checks with the python tool (`'strawberry'.count('r')`) and ends with `#### 3`. Mixing a manual
  method with a tool call is a habit RL can later refine.
- SimpleSpelling: "Spell the word: apple" -> `apple:a,p,p,l,e`. Spelling is the hard part of counting for a small
  model: it must learn which characters each token stands for, which bigger models pick up on their own.
Example i of a split is drawn from its own seeded RNG, so the sets are deterministic in (seed, split, index) and a
bigger `size` only appends examples. nanochat mixed SimpleSpelling 200K + SpellingBee 80K into mid-training and
300 + 300 into SFT.
- Train and test words are disjoint: a word is a test word when `crc32(word) % 10 == 0` (stable across runs and
  machines, ~1 word in 10; 54 of the embedded 421), so the test split measures spelling of words never trained on.
- nanochat draws from dwyl/english-words (~370K words); our list is ~420 words, so mid-training's 280K examples see
  each train word hundreds of times. That is enough for the lesson (tokens -> letters), not for a broad vocabulary:
  pass `words=` for a bigger list.
"""

import random
import string
import zlib

from .common import from_conversations

# ~420 everyday words of 3-11 letters (some with doubled letters): enough, the lesson is tokens -> letters
WORDS = """
the and that have for not with you this but his from they say her she will one all would there their what out
about who get which when make can like time just him know take people into year your good some could them see
other than then now look only come its over think also back after use two how our work first well way even new
want because any these give day most apple banana strawberry orange cherry grape lemon melon peach pear plum
mango papaya raspberry blueberry coconut tomato potato carrot onion garlic pepper cabbage lettuce spinach bread
butter cheese coffee sugar honey water juice dinner breakfast kitchen table chair window door house garden
street bridge river mountain forest desert island ocean beach valley village city country world planet moon
star galaxy rocket engine machine computer keyboard mouse screen phone camera battery pencil paper letter book
library school teacher student lesson question answer problem number seven eleven twelve hundred thousand
million yellow purple silver golden bright shadow mirror pillow blanket bottle basket bucket hammer ladder
needle scissors umbrella balloon whistle puzzle rabbit squirrel elephant giraffe kangaroo penguin dolphin
octopus turtle butterfly mosquito spider beetle falcon parrot sparrow tiger lion zebra monkey donkey horse
sheep goat chicken kitten puppy happiness sadness courage patience freedom justice knowledge mystery history
science physics chemistry biology geometry algebra calculus language grammar sentence paragraph chapter
address balance cabinet channel climate college comfort connect correct culture current deliver diamond
digital discuss display economy element energy evening example excited express factory feather festival
finally follow forever forward fountain freeze gallery general gentle giant glass globe govern guitar harbor
harvest health heavy hidden holiday honest hospital hunger imagine include inside invite jacket journey jungle
kettle kingdom labor lantern laugh lizard luggage magnet marble market meadow memory message middle minute
modern moment morning mountain muscle museum musical napkin narrow nature nearby needle neighbor nervous
noodle notebook ocean office orchestra package paddle palace pattern pebble pencil people perfect picnic
pirate pocket polite pottery powder practice present pretty private promise pudding pumpkin quarter quickly
quiet rainbow reason record remember repeat rescue ribbon riddle rocket saddle sailor sandwich satellite
scarecrow season secret shallow shelter shoulder signal simple skill slipper soccer spaghetti sparkle spirit
spoon spring square stadium stairs station statue sunflower surprise sweater swimming symbol teapot thunder
ticket tomorrow tornado traffic treasure triangle trumpet tunnel umbrella uniform unusual vacation vanilla
vegetable velvet village violin volcano voyage waffle wagon walnut warrior weather wedding whisper wizard
wonderful wooden yesterday zipper accommodate mississippi bookkeeper committee occurrence assessment
possession succeeded llama bubble
""".split()
WORDS = list(dict.fromkeys(WORDS))  # no duplicates: every word equally likely

LETTERS = string.ascii_lowercase
USER_TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}",
    "Tell me the number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}",
    "How many {letter}s are in {word}",
    "Number of {letter} in {word}",
    "How many {letter} does {word} have",
    "{word} has how many {letter}",
    "Calculate the number of {letter} in {word}",
    # other languages: people ask in theirs
    "¿Cuántas {letter} hay en {word}?",
    "Combien de {letter} dans {word}",
    "Wie viele {letter} sind in {word}",
    "{word}中有多少个{letter}",
]


def _rng(task: str, seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"{task}:{seed}:{split}:{index}")  # str seeds hash with sha512: stable across runs


def is_test_word(word: str) -> bool:
    return zlib.crc32(word.encode()) % 10 == 0  # crc32, not hash(): Python salts str hashes per process


def _words(words, split: str) -> list[str]:
    """The split's share of the word list."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    words = list(WORDS if words is None else words)
    bad = [w for w in words if not (isinstance(w, str) and w.isalpha() and w.islower())]
    if not words or bad:
        raise ValueError(f"the word list must hold lowercase alphabetic words, got {bad[:5] or 'none'}")
    words = [w for w in words if is_test_word(w) == (split == "test")]
    if not words:
        raise ValueError(f"the word list has no {split} words (a word is a test word when crc32(word) % 10 == 0)")
    return words


def spelling_bee_conversation(rng: random.Random, words: list[str]) -> dict:
    word = rng.choice(words)
    letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)  # 10%: often a letter it lacks
    count = word.count(letter)
    template = rng.choice(USER_TEMPLATES)
    if rng.random() < 0.3:
        template = template.lower()
    quote_letter, quote_word = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
    question = template.format(letter=f"{quote_letter}{letter}{quote_letter}", word=f"{quote_word}{word}{quote_word}")
    if rng.random() < 0.5 and not question.endswith("?"):
        question += "?"
    # "3:r hit!" and never "3: r": " r" and "r" are different tokens, and the count must stay on the letter's token
    steps = "".join(
        f"{i}:{c} hit! count={word[:i].count(letter)}\n" if c == letter else f"{i}:{c}\n" for i, c in enumerate(word, 1)
    )
    manual = (
        f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach first."
        f"\n\nFirst spell the word out:\n{word}:{','.join(word)}\n\nThen count the occurrences of '{letter}':\n"
        f"{steps}\nThis gives us {count}."
    )
    return {
        "messages": [
            {"role": "user", "content": question},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": manual + "\n\nLet me double check this using Python:\n\n"},
                    {"type": "python", "text": f"'{word}'.count('{letter}')"},
                    {"type": "python_output", "text": str(count)},
                    {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
                ],
            },
        ]
    }


def spelling_bee(size: int = 1000, split: str = "train", *, seed: int = 0, words=None):
    words = _words(words, split)
    return from_conversations(
        (spelling_bee_conversation(_rng("bee", seed, split, i), words) for i in range(size)), "SpellingBee"
    )


def simple_spelling(size: int = 1000, split: str = "train", *, seed: int = 0, words=None):
    words = _words(words, split)
    items = []
    for i in range(size):
        word = _rng("spell", seed, split, i).choice(words)
        items.append(
            {
                "messages": [
                    {"role": "user", "content": f"Spell the word: {word}"},
                    {"role": "assistant", "content": f"{word}:{','.join(word)}"},
                ]
            }
        )
    return from_conversations(items, "SimpleSpelling")
