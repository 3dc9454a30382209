"""The stand-in tokenizer's and GPT-2's English: word lists and sentence templates written for this course
(nothing downloaded), from which `caption_corpus` generates everyday, Flickr-style caption sentences.

A few thousand common caption words (people, animals, things, places, clothes, colours, actions, their
plurals and -ing / -s forms), so that the stand-in tokenizer's BPE keeps them whole or in two pieces, as
the real GPT-2's does, and a newcomer's captions are not cut into letters. The sentences mean nothing in
particular: they are there for the words and the grammar of captions.
"""

from __future__ import annotations

import numpy as np

# ---- people (singular, plural) --------------------------------------------------------------------
_PEOPLE = """man woman boy girl child kid baby toddler person lady guy gentleman teenager teen adult
player worker rider skier surfer skateboarder snowboarder biker cyclist runner swimmer climber hiker
dancer singer musician guitarist drummer artist painter photographer tourist student teacher doctor nurse
chef cook waiter waitress officer policeman soldier firefighter farmer fisherman vendor seller shopper
customer driver pilot sailor athlete boxer wrestler goalie pitcher batter catcher referee umpire coach fan
spectator crowd audience family couple friend mother father mom dad son daughter brother sister grandmother
grandfather grandma grandpa bride groom mechanic carpenter builder construction performer clown magician
juggler acrobat gymnast jockey cowboy skater golfer tennis bicyclist motorcyclist passenger pedestrian
hitchhiker beggar priest monk nun protester demonstrator marcher bystander onlooker individual youngster
infant newborn twin senior elder gymnast cheerleader quarterback soccer footballer basketball volleyball
baseball hockey""".split()
_PEOPLE_PLURAL = {"man": "men", "woman": "women", "child": "children", "person": "people", "gentleman":
                  "gentlemen", "policeman": "policemen", "fisherman": "fishermen", "crowd": "crowds"}

_ANIMALS = """dog puppy cat kitten horse pony bird duck goose chicken rooster cow bull calf sheep lamb goat pig
elephant giraffe zebra lion tiger bear monkey deer camel fish dolphin whale shark seal turtle frog snake
lizard rabbit squirrel mouse rat owl eagle hawk pigeon parrot swan seagull crow butterfly bee insect spider
donkey mule llama kangaroo panda fox wolf poodle terrier retriever labrador shepherd collie beagle bulldog
husky dachshund chihuahua pup animal pet""".split()

_THINGS = """ball frisbee kite bicycle bike motorcycle car truck bus train boat ship canoe kayak surfboard
skateboard snowboard ski sled wagon stroller cart umbrella bag backpack purse suitcase basket bucket box
bottle cup mug glass plate bowl fork knife spoon pan pot table chair bench couch sofa bed pillow blanket
lamp desk shelf book newspaper magazine sign poster flag banner map phone camera laptop computer screen
television guitar drum piano violin microphone trumpet saxophone flute speaker ladder rope net fence wall
door window gate roof stairs staircase pole post tower statue fountain bridge tent flower tree bush plant
leaf leaves rock stone log branch stick sand snow water wave ice fire smoke cake pizza sandwich burger
hotdog banana apple orange fruit vegetable carrot broccoli bread cheese meat salad soup rice pasta coffee
tea juice beer wine drink food meal dinner lunch breakfast cone ice-cream candle balloon toy doll teddy
blocks puzzle game card cards racket bat glove helmet goggles mask sunglasses glasses hat cap scarf jacket
coat shirt t-shirt sweater hoodie dress skirt pants jeans shorts suit tie uniform costume outfit vest
boots shoes sneakers sandals socks gloves apron bikini swimsuit wetsuit necklace bracelet earrings ring
watch belt wig beard mustache hair ponytail braid tattoo makeup paint brush pen pencil paper notebook
tool hammer shovel rake hose wheel tire engine cone barrel crate pallet cart trailer tractor helicopter
airplane plane jet rocket horseback saddle leash collar bone stick toy mat towel rug carpet curtain
mirror sink toilet shower bathtub oven stove fridge refrigerator microwave counter cabinet drawer clock
vase jar can trash garbage bin dumpster hydrant meter light lights lantern torch candle fireworks
sparkler bubble bubbles confetti sign signs letter letters word words picture photo painting drawing
image mural graffiti sculpture""".split()

_PLACES = """street road sidewalk path trail track field park yard garden lawn grass meadow hill mountain
mountains valley forest woods jungle desert beach shore coast ocean sea lake river pond pool stream creek
waterfall island city town village market shop store restaurant cafe bar kitchen room bedroom bathroom
office classroom school library museum church temple stadium arena court gym playground parking lot
station airport harbor dock pier boardwalk bridge tunnel alley corner intersection crosswalk highway
building house home apartment farm barn stage concert festival parade party wedding race game match
competition crowd snow rain sun sunset sunrise night dark daylight sky clouds air ground floor dirt mud
rocks cliff cave ledge slope ramp halfpipe rink ring arena area background foreground distance outdoors
indoors inside outside countryside neighborhood downtown subway platform""".split()

_COLOURS = """red orange yellow green blue purple pink brown black white gray grey silver gold golden tan
beige dark light bright pale colorful striped spotted plaid checkered""".split()

_ADJECTIVES = """small large big little tiny huge tall short long young old older elderly happy smiling
laughing sad angry tired busy crowded empty quiet loud wet dry muddy sandy snowy sunny cloudy rainy windy
cold hot warm cool fresh clean dirty messy shiny wooden metal plastic glass stone brick concrete paved
grassy rocky steep deep shallow wide narrow open closed full front back side top bottom left right
middle center centre upper lower near far nearby distant busy calm rough smooth fast slow high low
curly straight blond blonde bald bearded muscular skinny shirtless barefoot masked helmeted uniformed
dressed costumed young-looking asian african american european indian native local professional amateur
famous traditional modern ancient new fancy simple pretty beautiful cute funny strange scary serious
excited surprised curious proud playful friendly fluffy furry hairy spotted wild stray baby adult male
female several many few some two three four five six seven eight nine ten dozen""".split()

# ---- actions: base forms; -ing and -s forms follow English rules (with the exceptions listed) --------
_VERBS = """walk run jump sit stand lie lay ride play throw catch kick hit swing climb swim dive surf ski
skate dance sing play eat drink cook cut hold carry pull push look watch stare smile laugh talk speak
shout yell cry sleep rest wait read write draw paint pose perform work fish sail paddle row drive park
cross fly float splash spray wash clean fix build dig plant pick sell buy shop carry hug kiss chase
fetch bite bark roll slide fall trip balance lean reach point wave clap cheer march protest race compete
practice train stretch kneel crouch bend squat crawl hang hop skip jog hike bike cycle wrestle box fight
tackle block shoot score serve bowl bat pitch lift raise lower open close enter leave exit arrive gather
meet greet help teach learn listen hear wear dress prepare serve pour stir mix chop slice bake grill
fry taste feed graze gallop trot herd pet groom brush comb shave hold grab drag tow haul load deliver
pass follow lead guide watch film photograph record play show display hang decorate celebrate blow pop
light burn smoke sweep mop scrub rake shovel mow water sprinkle""".split()
_DOUBLE = set("""run sit swim hit cut get put shop jog stop dig skip clap hug grab drag plan step wrap chat
nap drip spin trim rub drop pat slip tap trip hop mop chop sip scrub stir win begin pet bat set""".split())
_ING = {"lie": "lying", "die": "dying", "tie": "tying", "see": "seeing", "ski": "skiing", "canoe": "canoeing"}

_MORE = """hand arm leg foot feet head face eye eyes ear nose mouth teeth tooth finger fingers knee knees
shoulder shoulders back chest belly lap neck hip body smile tongue lip lips cheek fist thumb toe toes skin
day night morning afternoon evening summer winter spring fall autumn weekend holiday birthday christmas
time moment way set kind part piece side edge end corner top bottom middle half view scene shot closeup
entry entrance doorway hallway hall porch balcony deck patio driveway garage yard backyard fountain
courtyard plaza square avenue block neighborhood suburb skyline skyscraper tower monument landmark
hard soft heavy light thick thin round square flat sharp empty full broken old-fashioned homemade
giant miniature enormous massive gigantic wooden leather denim cotton wool silk knit knitted
pulley system machine equipment gear supplies stuff things items objects goods products vehicles
traffic crowd line queue group team band choir orchestra class crew staff army troop herd pack
shaggy curly wavy spiky messy neat wild long-haired short-haired dark-haired red-haired gray-haired
bald-headed bearded dreadlocks mohawk bun afro glasses sunglasses hardhat hardhats hard-hat helmets
something someone somebody everyone everybody anyone nothing nobody together alone away around again
almost about only even too quite really while during before after behind beyond upon within
game goal point net hoop basket field court pitch base bases mound plate dugout bleachers stands
summer-time sunlit shady shaded foggy misty icy frozen snowcovered grassy leafy flowery tropical
urban rural suburban industrial historic public private outdoor indoor nighttime daytime evening
uses using used does doing did makes making made takes taking took gets getting got goes going went
looks looking looked seems appears appearing stands standing sits sitting""".split()

_SMALL = """a an the one two three four five six several many some his her their its this that these those
and or but with without while as of in on at by near next to under over above below behind beside
between across along around through into onto from off up down out toward towards against among
beneath inside outside is are was were be being been has have had it they he she there here who which
what where when while very also just still another other each both all front back top bottom side left
right middle center while something someone each one few group lot lots pair bunch couple team line
row pile herd flock""".split()

_TEMPLATES = (
    "{a_person} {verb_ing} {prep} {a_place} .",
    "{a_person} in {a_clothing} is {verb_ing} {prep} {a_place} .",
    "{A_person} {verb_s} {prep} {a_place} .",
    "{num} {people} are {verb_ing} {prep} {a_place} .",
    "{a_animal} {verb_ing} {prep} {a_place} .",
    "{A_animal} {verb_s} {prep} {a_thing} {prep} {a_place} .",
    "{a_person} {verb_ing} {a_thing} {prep} {a_place} .",
    "{A_person} wearing {a_clothing} {verb_s} {a_thing} .",
    "{num} {animals} {verb_ing} {prep} {a_place} .",
    "A group of {people} {verb_ing} {prep} {a_place} .",
    "{a_person} with {a_thing} {verb_ing} {prep} {a_place}",
    "There is {a_thing} {prep} {a_place} .",
    "{a_person} and {a_person} are {verb_ing} {prep} {a_place} .",
    "{A_person} is {verb_ing} while {a_person} {verb_s} .",
    "{a_thing} sits {prep} {a_thing} {prep} {a_place} .",
    "Close up of {a_person} {verb_ing} {a_thing} .",
    "{A_person} {verb_s} {their} {more} {prep} {a_place} .",
    "{a_person} {verb_ing} with {their} {more} {prep} {a_thing} .",
)
_PREPS = ("in", "on", "at", "near", "by", "next to", "in front of", "behind", "under", "across", "along",
          "through", "into", "down", "up", "over", "beside", "around", "outside", "inside")


def _ing(verb: str) -> str:
    if verb in _ING:
        return _ING[verb]
    if verb in _DOUBLE:
        return verb + verb[-1] + "ing"
    if verb.endswith("e") and not verb.endswith(("ee", "ye", "oe")):
        return verb[:-1] + "ing"
    return verb + "ing"


def _s(word: str) -> str:
    """The -s form of a verb, or the plural of a noun."""
    if word in _PEOPLE_PLURAL:
        return _PEOPLE_PLURAL[word]
    if word.endswith(("s", "sh", "ch", "x", "z")) or word.endswith("o") and word not in ("photo", "piano", "kangaroo"):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in tuple("aeiou"):
        return word[:-1] + "ies"
    if word.endswith("f") and word not in ("roof", "cliff"):
        return word[:-1] + "ves"
    return word + "s"


def vocabulary() -> list[str]:
    """Every word the lists make, with their plurals and verb forms, sorted."""
    nouns = _PEOPLE + _ANIMALS + _THINGS + _PLACES
    words = set(nouns) | {_s(n) for n in nouns} | set(_COLOURS) | set(_ADJECTIVES) | set(_SMALL) | set(_MORE)
    words |= set(_VERBS) | {_ing(v) for v in _VERBS} | {_s(v) for v in _VERBS}
    return sorted(words)


def caption_corpus(n_sentences: int, seed: int) -> list[str]:
    """`n_sentences` generated caption sentences, deterministic in `seed`; sentences 2k and 2k + 1 tell the
    same scene (the same people, things and place) in two templates."""
    rng = np.random.default_rng(seed)

    def pick(words):
        return words[int(rng.integers(len(words)))]

    def described(noun: str) -> str:
        r = rng.random()
        if r < 0.3:
            return f"{pick(_COLOURS)} {noun}"
        if r < 0.55:
            return f"{pick(_ADJECTIVES)} {noun}"
        if r < 0.65:
            return f"{pick(_ADJECTIVES)} {pick(_COLOURS)} {noun}"
        return noun

    def a(phrase: str) -> str:
        return ("an " if phrase[0] in "aeiou" else "a ") + phrase

    clothing = _THINGS[_THINGS.index("hat"):_THINGS.index("tattoo")]
    out = []
    while len(out) < n_sentences:  # two sentences per scene: the same fields in two templates
        fields = {
            "a_person": a(described(pick(_PEOPLE))), "a_animal": a(described(pick(_ANIMALS))),
            "a_thing": a(described(pick(_THINGS if rng.random() < 0.7 else _MORE))),
            "a_place": rng.choice(["the ", "a "]) + described(pick(_PLACES)),
            "a_clothing": a(described(pick(clothing))), "people": _s(pick(_PEOPLE)), "animals": _s(pick(_ANIMALS)),
            "num": pick(["two", "three", "four", "five", "several", "many", "some", "a few"]),
            "verb_ing": _ing(pick(_VERBS)), "verb_s": _s(pick(_VERBS)), "prep": pick(_PREPS),
            "their": pick(["his", "her", "their", "its", "the"]), "more": pick(_MORE),
        }
        fields["A_person"], fields["A_animal"] = fields["a_person"].capitalize(), fields["a_animal"].capitalize()
        for t in rng.choice(len(_TEMPLATES), size=2, replace=False):
            text = _TEMPLATES[t].format(**fields).replace(" ,", ",")
            text = text if rng.random() < 0.5 else text.replace(" .", ".")  # both spacings occur in caption files
            out.append(text[0].upper() + text[1:] if rng.random() < 0.6 else text)
    return out[:n_sentences]
