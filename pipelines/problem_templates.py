"""Per-language templates and vocabulary of the generated word problems (see `problems.py`).

Each language has one question and one worked answer per operation (add, sub, mul, div and the two-step
add_mul, add_sub), written in the style of MGSM's exemplars in the language YAMLs, and names, objects and
containers carrying the forms the templates need. Slots:
- `{a}` `{b}` `{c}` the operands as numerals; `{A}` `{B}` `{C}` the same in a question, where the language
  may spell small numbers out (`number_words`) or add a classifier (`count`, e.g. Bengali "3টি");
- `{ab}` = a + b, `{bc}` = b × c, `{r}` the result; the answer ends with it.
Numbers are ASCII numerals in every language, as in the real MGSM files (Bengali and Telugu included);
the answer extractor reads the scripts' own digits too. Swahili and Japanese always use numerals:
Swahili number words agree with the noun class and Japanese counts with counters, so numerals keep
every sentence grammatical. The non-English texts deserve a native speaker's review before
publication; they use only short, common constructions (the MGSM exemplars' own where possible).
"""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProblemLanguage:
    code: str
    names: tuple  # dicts with "name" and any forms the templates use (genitive, verb endings, ...)
    objects: tuple  # dicts with "obj" (plural) and its forms
    containers: tuple  # dicts with "container" and its forms
    templates: dict  # op -> (question, answer)
    number_words: dict = field(default_factory=dict)  # n -> spelled-out form used for {A} {B} {C}
    count: str = "{n}"  # how a numeral operand is written in a question


ENGLISH = ProblemLanguage(
    code="en",
    names=tuple({"name": n} for n in ("Amina", "Tom", "Maria", "Ravi", "Yuki", "Sam", "Lina", "David")),
    objects=tuple({"obj": o} for o in ("mangoes", "oranges", "eggs", "books", "pencils", "sweets", "bananas",
                                       "marbles")),
    containers=({"container": "box", "containers": "boxes"}, {"container": "bag", "containers": "bags"},
                {"container": "basket", "containers": "baskets"}),
    number_words={2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine",
                  10: "ten"},
    templates={
        "add": ("{name} has {A} {obj} and buys {B} more. How many {obj} does {name} have now?",
                "{name} has {a} {obj} and buys {b} more. {a} + {b} = {r}. The answer is {r}."),
        "sub": ("{name} has {A} {obj} and gives {B} of them to a friend. How many {obj} does {name} have left?",
                "{name} starts with {a} {obj} and gives away {b}. {a} - {b} = {r}. The answer is {r}."),
        "mul": ("{name} has {A} {containers}. Each {container} holds {B} {obj}. "
                "How many {obj} does {name} have in total?",
                "There are {a} {containers} with {b} {obj} in each. {a} × {b} = {r}. The answer is {r}."),
        "div": ("{name} has {A} {obj} and shares them equally among {B} friends. "
                "How many {obj} does each friend get?",
                "{name} shares {a} {obj} equally among {b} friends. {a} ÷ {b} = {r}. The answer is {r}."),
        "add_mul": ("{name} has {A} {obj}. Then {name} buys {B} {containers} of {obj}, and each {container} "
                    "holds {C} {obj}. How many {obj} does {name} have now?",
                    "{name} started with {a} {obj}. {b} {containers} of {c} {obj} each is {b} × {c} = {bc} {obj}. "
                    "{a} + {bc} = {r}. The answer is {r}."),
        "add_sub": ("{name} has {A} {obj}, buys {B} more and then gives {C} to a friend. "
                    "How many {obj} does {name} have now?",
                    "{name} started with {a} {obj}. {a} + {b} = {ab}. {ab} - {c} = {r}. The answer is {r}."),
    },
)

# Swahili: the numeral follows the noun ("maembe 3"); "how many" agrees with the noun class (`howmany`:
# maembe mangapi, vitabu vingapi, kalamu ngapi, mipira mingapi), and so does "has" after kila
# (`holds`: kila sanduku lina, kila mfuko una, kila kikapu kina).
SWAHILI = ProblemLanguage(
    code="sw",
    names=tuple({"name": n} for n in ("Amina", "Juma", "Neema", "Baraka", "Halima", "Omari", "Zawadi", "Musa")),
    objects=({"obj": "maembe", "howmany": "mangapi"}, {"obj": "machungwa", "howmany": "mangapi"},
             {"obj": "mayai", "howmany": "mangapi"}, {"obj": "vitabu", "howmany": "vingapi"},
             {"obj": "kalamu", "howmany": "ngapi"}, {"obj": "pipi", "howmany": "ngapi"},
             {"obj": "ndizi", "howmany": "ngapi"}, {"obj": "mipira", "howmany": "mingapi"}),
    containers=({"container": "sanduku", "containers": "masanduku", "holds": "lina"},
                {"container": "mfuko", "containers": "mifuko", "holds": "una"},
                {"container": "kikapu", "containers": "vikapu", "holds": "kina"}),
    templates={
        "add": ("{name} ana {obj} {a}. Ananunua {obj} {b} zaidi. Sasa ana {obj} {howmany}?",
                "{name} ana {obj} {a} na ananunua {obj} {b} zaidi. {a} + {b} = {r}. Jibu ni {r}."),
        "sub": ("{name} ana {obj} {a}. Anampa rafiki yake {obj} {b}. Sasa ana {obj} {howmany}?",
                "{name} alianza kwa {obj} {a} na akampa rafiki yake {obj} {b}. {a} - {b} = {r}. Jibu ni {r}."),
        "mul": ("{name} ana {containers} {a}. Kila {container} {holds} {obj} {b}. Ana {obj} {howmany} kwa jumla?",
                "Kuna {containers} {a}, na kila {container} {holds} {obj} {b}. {a} × {b} = {r}. Jibu ni {r}."),
        "div": ("{name} ana {obj} {a}. Anagawa {obj} kwa usawa kwa marafiki zake {b}. "
                "Kila rafiki anapata {obj} {howmany}?",
                "{name} anagawa {obj} {a} kwa usawa kwa marafiki {b}. {a} ÷ {b} = {r}. Jibu ni {r}."),
        "add_mul": ("{name} ana {obj} {a}. Ananunua {containers} {b}. Kila {container} {holds} {obj} {c}. "
                    "Sasa ana {obj} {howmany}?",
                    "{name} alianza kwa {obj} {a}. {b} × {c} = {bc}. {a} + {bc} = {r}. Jibu ni {r}."),
        "add_sub": ("{name} ana {obj} {a}. Ananunua {obj} {b} zaidi, kisha anampa rafiki yake {obj} {c}. "
                    "Sasa ana {obj} {howmany}?",
                    "{name} alianza kwa {obj} {a}. {a} + {b} = {ab}. {ab} - {c} = {r}. Jibu ni {r}."),
    },
)

# Japanese: objects carry their counter (`ctr`: 個, 冊, 本); containers are counted with つ (at most 9 of
# them in any problem, where つ is natural).
JAPANESE = ProblemLanguage(
    code="ja",
    names=tuple({"name": n} for n in ("さくら", "はると", "ゆい", "けんた", "あおい", "そうた", "みお", "りく")),
    objects=({"obj": "りんご", "ctr": "個"}, {"obj": "みかん", "ctr": "個"}, {"obj": "卵", "ctr": "個"},
             {"obj": "本", "ctr": "冊"}, {"obj": "鉛筆", "ctr": "本"}, {"obj": "あめ", "ctr": "個"},
             {"obj": "バナナ", "ctr": "本"}, {"obj": "ボール", "ctr": "個"}),
    containers=({"container": "箱"}, {"container": "袋"}, {"container": "かご"}),
    templates={
        "add": ("{name}さんは{obj}を{a}{ctr}持っています。さらに{b}{ctr}買いました。"
                "{name}さんは今{obj}を何{ctr}持っていますか？",
                "{name}さんは最初に{obj}を{a}{ctr}持っていて、{b}{ctr}買いました。{a} + {b} = {r}。答えは{r}です。"),
        "sub": ("{name}さんは{obj}を{a}{ctr}持っています。友達に{b}{ctr}あげました。"
                "{name}さんは今{obj}を何{ctr}持っていますか？",
                "{name}さんは最初に{obj}を{a}{ctr}持っていて、友達に{b}{ctr}あげました。"
                "{a} - {b} = {r}。答えは{r}です。"),
        "mul": ("{name}さんは{container}を{a}つ持っています。それぞれの{container}には{obj}が{b}{ctr}入っています。"
                "{obj}は全部で何{ctr}ありますか？",
                "{obj}が{b}{ctr}入った{container}が{a}つあります。{a} × {b} = {r}。答えは{r}です。"),
        "div": ("{name}さんは{obj}を{a}{ctr}持っています。それを{b}人の友達に同じ数ずつ分けました。"
                "友達は一人あたり{obj}を何{ctr}もらいましたか？",
                "{a}{ctr}の{obj}を{b}人で同じ数ずつ分けます。{a} ÷ {b} = {r}。答えは{r}です。"),
        "add_mul": ("{name}さんは{obj}を{a}{ctr}持っています。さらに{container}を{b}つ買いました。"
                    "それぞれの{container}には{obj}が{c}{ctr}入っています。{name}さんは今{obj}を何{ctr}持っていますか？",
                    "{name}さんは最初に{obj}を{a}{ctr}持っていました。{c}{ctr}入りの{container}が{b}つで、"
                    "{obj}は{b} × {c} = {bc}{ctr}です。{a} + {bc} = {r}。答えは{r}です。"),
        "add_sub": ("{name}さんは{obj}を{a}{ctr}持っています。さらに{b}{ctr}買って、それから友達に{c}{ctr}あげました。"
                    "{name}さんは今{obj}を何{ctr}持っていますか？",
                    "{name}さんは最初に{obj}を{a}{ctr}持っていました。{a} + {b} = {ab}。{ab} - {c} = {r}。答えは{r}です。"),
    },
)

# Bengali: counts take the classifier টি ("3টি আম", spelled out "তিনটি আম"), people জন; names carry
# their genitive (`gen`: রহিমের কাছে ... আছে = Rahim has ...); containers their locative and genitive.
BENGALI = ProblemLanguage(
    code="bn",
    names=tuple({"name": n, "gen": g} for n, g in (
        ("রহিম", "রহিমের"), ("সুমি", "সুমির"), ("রাজু", "রাজুর"), ("মিতা", "মিতার"), ("করিম", "করিমের"),
        ("রিনা", "রিনার"), ("আমিনা", "আমিনার"), ("তানিয়া", "তানিয়ার"))),
    objects=tuple({"obj": o} for o in ("আম", "কমলা", "ডিম", "বই", "কলম", "চকলেট", "কলা", "বল")),
    containers=({"container": "ঝুড়ি", "loc": "ঝুড়িতে", "cgen": "ঝুড়ির"},
                {"container": "বাক্স", "loc": "বাক্সে", "cgen": "বাক্সের"},
                {"container": "ব্যাগ", "loc": "ব্যাগে", "cgen": "ব্যাগের"}),
    count="{n}টি",
    number_words={2: "দুটি", 3: "তিনটি", 4: "চারটি", 5: "পাঁচটি", 6: "ছয়টি", 7: "সাতটি", 8: "আটটি",
                  9: "নয়টি", 10: "দশটি"},
    templates={
        "add": ("{gen} কাছে {A} {obj} আছে। সে আরও {B} {obj} কিনেছে। তার কাছে এখন কতগুলি {obj} আছে?",
                "{gen} প্রথমে {a}টি {obj} ছিল। সে আরও {b}টি {obj} কিনেছে। {a} + {b} = {r}। উত্তর হল {r}।"),
        "sub": ("{gen} কাছে {A} {obj} আছে। সে তার বন্ধুকে {B} {obj} দিয়েছে। তার কাছে এখন কতগুলি {obj} আছে?",
                "{gen} প্রথমে {a}টি {obj} ছিল। সে বন্ধুকে {b}টি {obj} দিয়েছে। {a} - {b} = {r}। উত্তর হল {r}।"),
        "mul": ("{gen} কাছে {A} {container} আছে। প্রতিটি {loc} {B} করে {obj} আছে। "
                "তার কাছে মোট কতগুলি {obj} আছে?",
                "{a}টি {cgen} প্রতিটিতে {b}টি করে {obj} আছে। {a} × {b} = {r}। উত্তর হল {r}।"),
        "div": ("{gen} কাছে {A} {obj} আছে। সে সেগুলি তার {b} জন বন্ধুর মধ্যে সমানভাবে ভাগ করে দিয়েছে। "
                "প্রত্যেক বন্ধু কতগুলি {obj} পেয়েছে?",
                "{a}টি {obj} {b} জন বন্ধুর মধ্যে সমানভাবে ভাগ করা হয়েছে। {a} ÷ {b} = {r}। উত্তর হল {r}।"),
        "add_mul": ("{gen} কাছে {A} {obj} আছে। সে আরও {B} {container} কিনেছে। প্রতিটি {loc} {C} করে {obj} আছে। "
                    "তার কাছে এখন কতগুলি {obj} আছে?",
                    "{gen} প্রথমে {a}টি {obj} ছিল। {b}টি {cgen} প্রতিটিতে {c}টি করে {obj} আছে। "
                    "{b} × {c} = {bc}। {a} + {bc} = {r}। উত্তর হল {r}।"),
        "add_sub": ("{gen} কাছে {A} {obj} আছে। সে আরও {B} {obj} কিনেছে এবং তারপর তার বন্ধুকে {C} {obj} দিয়েছে। "
                    "তার কাছে এখন কতগুলি {obj} আছে?",
                    "{gen} প্রথমে {a}টি {obj} ছিল। {a} + {b} = {ab}। {ab} - {c} = {r}। উত্তর হল {r}।"),
    },
)

# Telugu: past-tense verbs agree with the subject's gender (masculine -ాడు, feminine -ింది), so each name
# carries its verb forms; objects their plural and comitative (`with`: బంతులతో); containers their
# plural and locative. People are counted with మంది.
_TE_MASC = {"bought": "కొనుగోలు చేశాడు", "gave": "ఇచ్చాడు", "shared": "పంచాడు", "started": "ప్రారంభించాడు"}
_TE_FEM = {"bought": "కొనుగోలు చేసింది", "gave": "ఇచ్చింది", "shared": "పంచింది", "started": "ప్రారంభించింది"}
TELUGU = ProblemLanguage(
    code="te",
    names=tuple({"name": n, **forms} for n, forms in (
        ("రాము", _TE_MASC), ("సీత", _TE_FEM), ("రవి", _TE_MASC), ("లక్ష్మి", _TE_FEM), ("కిరణ్", _TE_MASC),
        ("ప్రియ", _TE_FEM), ("అర్జున్", _TE_MASC), ("అనిత", _TE_FEM))),
    objects=tuple({"obj": o, "with": w} for o, w in (
        ("మామిడి పండ్లు", "మామిడి పండ్లతో"), ("నారింజ పండ్లు", "నారింజ పండ్లతో"), ("గుడ్లు", "గుడ్లతో"),
        ("పుస్తకాలు", "పుస్తకాలతో"), ("పెన్నులు", "పెన్నులతో"), ("అరటి పండ్లు", "అరటి పండ్లతో"),
        ("బంతులు", "బంతులతో"), ("ఆపిల్ పండ్లు", "ఆపిల్ పండ్లతో"))),
    containers=({"containers": "బుట్టలు", "loc": "బుట్టలో"}, {"containers": "పెట్టెలు", "loc": "పెట్టెలో"},
                {"containers": "సంచులు", "loc": "సంచిలో"}),
    templates={
        "add": ("{name} వద్ద {a} {obj} ఉన్నాయి. {name} మరో {b} {obj} {bought}. "
                "ఇప్పుడు {name} వద్ద ఎన్ని {obj} ఉన్నాయి?",
                "{name} {a} {with} {started}. మరో {b} {obj} {bought}. {a} + {b} = {r}. సమాధానం {r}."),
        "sub": ("{name} వద్ద {a} {obj} ఉన్నాయి. {name} తన స్నేహితుడికి {b} {obj} {gave}. "
                "ఇప్పుడు {name} వద్ద ఎన్ని {obj} ఉన్నాయి?",
                "{name} {a} {with} {started}. స్నేహితుడికి {b} {obj} {gave}. {a} - {b} = {r}. సమాధానం {r}."),
        "mul": ("{name} వద్ద {a} {containers} ఉన్నాయి. ప్రతి {loc} {b} {obj} ఉన్నాయి. "
                "{name} వద్ద మొత్తం ఎన్ని {obj} ఉన్నాయి?",
                "{a} {containers} ఉన్నాయి, ప్రతి {loc} {b} {obj} ఉన్నాయి. {a} × {b} = {r}. సమాధానం {r}."),
        "div": ("{name} వద్ద {a} {obj} ఉన్నాయి. {name} వాటిని తన {b} మంది స్నేహితులకు సమానంగా {shared}. "
                "ప్రతి స్నేహితుడికి ఎన్ని {obj} వచ్చాయి?",
                "{name} {a} {obj} {b} మంది స్నేహితులకు సమానంగా {shared}. {a} ÷ {b} = {r}. సమాధానం {r}."),
        "add_mul": ("{name} వద్ద {a} {obj} ఉన్నాయి. {name} మరో {b} {containers} {bought}. ప్రతి {loc} {c} {obj} "
                    "ఉన్నాయి. ఇప్పుడు {name} వద్ద ఎన్ని {obj} ఉన్నాయి?",
                    "{name} {a} {with} {started}. {b} × {c} = {bc}. {a} + {bc} = {r}. సమాధానం {r}."),
        "add_sub": ("{name} వద్ద {a} {obj} ఉన్నాయి. {name} మరో {b} {obj} {bought}. తర్వాత తన స్నేహితుడికి {c} {obj} "
                    "{gave}. ఇప్పుడు {name} వద్ద ఎన్ని {obj} ఉన్నాయి?",
                    "{name} {a} {with} {started}. {a} + {b} = {ab}. {ab} - {c} = {r}. సమాధానం {r}."),
    },
)

LANGUAGES = {lang.code: lang for lang in (ENGLISH, SWAHILI, JAPANESE, BENGALI, TELUGU)}
