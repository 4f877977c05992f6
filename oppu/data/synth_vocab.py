"""Word lists for the synthetic LaMP worlds (oppu/data/synth.py): a small closed vocabulary.

Everything is plain lowercase English, a few hundred words per task, so that a byte-level BPE
trained on the corpus learns whole-word tokens and a ~1-4M parameter model can learn the
structure in minutes. Within a task, the keyword lists of different labels/topics/levels are
pairwise disjoint and disjoint from that task's filler phrases (tests/test_synth.py checks),
so every keyword points at exactly one label.
"""
from __future__ import annotations

# ---------------------------------------------------------------- LaMP_2M: movie tags
TAG_KEYWORDS: dict[str, tuple[str, ...]] = {
    "sci-fi": ("spaceship", "robot", "alien", "galaxy", "laser", "cyborg", "planet", "android", "starship", "asteroid"),
    "based on a book": ("novel", "author", "chapters", "bestseller", "manuscript", "library", "memoir", "pages", "adaptation", "writer"),
    "comedy": ("jokes", "laughs", "prank", "clown", "sitcom", "goofy", "punchline", "slapstick", "parody", "hilarious"),
    "action": ("explosion", "chase", "gunfight", "stunt", "heist", "rescue", "fistfight", "helicopter", "mission", "bomb"),
    "twist ending": ("secret", "reveal", "shocking", "mystery", "clue", "surprise", "unexpected", "hidden", "betrayal", "puzzle"),
    "dystopia": ("regime", "surveillance", "rebellion", "wasteland", "curfew", "propaganda", "uprising", "ration", "tyrant", "collapse"),
    "dark comedy": ("absurd", "morbid", "funeral", "cynical", "grim", "awkward", "satire", "deadpan", "macabre", "bleak"),
    "classic": ("vintage", "golden", "timeless", "legendary", "restored", "monochrome", "silent", "era", "masterpiece", "nostalgia"),
    "psychology": ("mind", "trauma", "therapist", "memory", "obsession", "paranoia", "dream", "anxiety", "identity", "madness"),
    "fantasy": ("dragon", "wizard", "magic", "kingdom", "elf", "sword", "spell", "quest", "castle", "prophecy"),
    "romance": ("love", "kiss", "wedding", "heartbreak", "couple", "date", "passion", "sweetheart", "flirt", "romantic"),
    "thought-provoking": ("philosophy", "meaning", "question", "existence", "morality", "reflection", "choice", "truth", "purpose", "ethics"),
    "social commentary": ("inequality", "poverty", "class", "racism", "protest", "injustice", "corruption", "media", "welfare", "labor"),
    "violence": ("blood", "brutal", "murder", "revenge", "massacre", "gang", "weapon", "torture", "savage", "killer"),
    "true story": ("biography", "historical", "real", "events", "survivor", "documented", "actual", "veteran", "witness", "diary"),
}
MOVIE_OPENERS = ("a film about", "this movie follows", "the story of", "a tale of", "an old picture about",
                 "a new release about", "a quiet drama about", "a long feature about")
MOVIE_CONNECTORS = ("and", "with", "featuring", "plus", "along with", "full of", "set around")
MOVIE_CLOSERS = ("in a small town", "over one summer", "told with care", "for the whole family",
                 "in the big city", "across three days", "on a cold night", "")

# ---------------------------------------------------------------- LaMP_2N: news categories
CATEGORY_KEYWORDS: dict[str, tuple[str, ...]] = {
    "travel": ("airport", "flight", "hotel", "beach", "passport", "tourist", "cruise", "luggage", "resort", "island"),
    "education": ("school", "teacher", "students", "classroom", "exam", "college", "tuition", "homework", "campus", "curriculum"),
    "parents": ("toddler", "baby", "parenting", "kids", "daycare", "mom", "dad", "diapers", "bedtime", "stroller"),
    "style & beauty": ("fashion", "makeup", "hairstyle", "dress", "lipstick", "runway", "skincare", "outfit", "designer", "jewelry"),
    "entertainment": ("celebrity", "album", "concert", "actor", "premiere", "singer", "series", "hollywood", "award", "comedian"),
    "food & drink": ("recipe", "cheese", "coffee", "wine", "bakery", "dinner", "chef", "pasta", "cocktail", "dessert"),
    "science & technology": ("software", "laptop", "smartphone", "research", "algorithm", "satellite", "robotics", "internet", "data", "chip"),
    "business": ("company", "market", "stocks", "profit", "startup", "merger", "investors", "revenue", "ceo", "economy"),
    "sports": ("football", "coach", "league", "stadium", "playoff", "soccer", "tennis", "match", "championship", "athlete"),
    "healthy living": ("exercise", "yoga", "diet", "sleep", "wellness", "meditation", "vitamins", "running", "stress", "nutrition"),
    "women": ("feminism", "equality", "sisterhood", "motherhood", "harassment", "empowerment", "gender", "girls", "leadership", "suffrage"),
    "politics": ("election", "senate", "congress", "president", "campaign", "vote", "policy", "governor", "democrats", "republicans"),
    "crime": ("police", "arrest", "robbery", "suspect", "shooting", "prison", "detective", "fraud", "trial", "theft"),
    "culture & arts": ("museum", "painting", "theater", "gallery", "poetry", "sculpture", "opera", "artist", "exhibit", "ballet"),
    "religion": ("church", "prayer", "faith", "pope", "mosque", "bible", "temple", "worship", "pastor", "spiritual"),
}
NEWS_OPENERS = ("a new report says", "officials said that", "this week", "according to sources",
                "in a recent story", "people are talking about", "local reporters covered")
NEWS_CONNECTORS = ("and", "as well as", "with", "near", "after", "amid", "alongside")
NEWS_CLOSERS = ("on monday", "this weekend", "across the country", "in the city", "for many families",
                "late on friday", "")
NEWS_TITLE_TAILS = ("what to know", "explained", "this week", "in focus", "the latest", "a closer look")

# ---------------------------------------------------------------- LaMP_3: product ratings
SENTIMENT_WORDS: dict[int, tuple[str, ...]] = {
    1: ("awful", "terrible", "useless", "broken", "horrible", "worthless", "disgusting", "dreadful"),
    2: ("disappointing", "flimsy", "mediocre", "weak", "poor", "cheap", "annoying", "lacking"),
    3: ("okay", "average", "decent", "fine", "acceptable", "ordinary", "passable", "fair"),
    4: ("good", "solid", "reliable", "nice", "pleasant", "sturdy", "handy", "useful"),
    5: ("excellent", "perfect", "amazing", "outstanding", "superb", "wonderful", "flawless", "brilliant"),
}
PRODUCTS = ("blender", "toaster", "kettle", "backpack", "headphones", "charger", "lamp", "blanket", "mug",
            "jacket", "shoes", "keyboard", "mouse", "speaker", "umbrella", "pillow", "watch", "wallet",
            "bottle", "knife")
REVIEW_OPENERS = ("i bought this", "we got this", "i ordered the", "my family uses this", "we tried this",
                  "i picked up this")
REVIEW_MIDDLES = ("and it was", "and it feels", "the quality is", "overall it seems", "honestly it is")
REVIEW_CLOSERS = ("after two weeks", "for the price", "so far", "for daily use", "as a gift", "")

# ---------------------------------------------------------------- LaMP_4: news headlines
NEWS_KEYWORDS = ("storm", "budget", "council", "mayor", "flood", "bridge", "hospital", "strike", "vaccine",
                 "wildfire", "museum", "tariff", "airport", "election", "court", "border", "festival",
                 "drought", "factory", "union", "pipeline", "railway", "harbor", "market", "school",
                 "stadium", "refinery", "pension", "embassy", "treaty", "protest", "housing", "subway",
                 "crop", "satellite", "earthquake", "lottery", "zoo", "carnival", "reservoir")
ARTICLE_OPENERS = ("local officials said the", "residents reported that the", "on tuesday the",
                   "a spokesperson confirmed the", "witnesses said the", "new figures show the")
ARTICLE_LINKS = ("would affect the", "was linked to the", "came after the", "raised questions about the",
                 "is tied to the", "put pressure on the")
ARTICLE_CLOSERS = ("before the weekend", "according to early reports", "late last night",
                   "as the week ended", "in the region", "")
HEADLINE_PREFIXES = ("", "BREAKING:", "Watch:", "Opinion:", "Update:", "Exclusive:")
HEADLINE_PICKS = ("first two", "all three", "last two")
HEADLINE_JOINERS = (" ", " and ", " vs ")
HEADLINE_SUFFIXES = ("", "- report", "- live", "in pictures")

# ---------------------------------------------------------------- LaMP_5: paper titles
RESEARCH_TERMS = ("graph", "attention", "kernel", "transformer", "reinforcement", "bayesian", "clustering",
                  "diffusion", "contrastive", "sparse", "federated", "causal", "adversarial",
                  "quantization", "retrieval", "embedding", "pruning", "curriculum", "distillation",
                  "hashing", "spectral", "recurrent", "variational", "symbolic", "tensor", "manifold",
                  "ranking", "sampling", "gradient", "memory", "tokenizer", "ensemble", "dropout",
                  "boosting", "inference", "compression")
ABSTRACT_OPENERS = ("we study", "this paper explores", "we revisit", "we consider", "this work examines")
ABSTRACT_LINKS1 = ("in the setting of", "for", "together with", "under")
ABSTRACT_LINKS2 = ("and introduce a", "and propose a", "using a", "through a")
ABSTRACT_CLOSERS = ("method with strong results", "model that improves accuracy", "scheme on several benchmarks",
                    "method that is simple to use", "model with clear gains")
TITLE_TEMPLATES = ("Towards {a} {b}", "{a} {b}: a {c} approach", "On {a} for {b}", "Learning {a} {b}",
                   "{a} meets {b}", "Rethinking {a} with {c}", "{a} {b} {c}")
TITLE_TAILS = ("", "revisited", "at scale", "in practice")

# ---------------------------------------------------------------- LaMP_7: tweets
TWEET_VERBS = ("cooked", "visited", "cleaned", "watched", "painted", "fixed", "bought", "walked", "baked",
               "planted", "finished", "sold", "found", "washed", "repaired", "organized", "tried", "ordered")
TWEET_NOUNS = ("kitchen", "garden", "movie", "bike", "cake", "dog", "car", "book", "park", "sister", "brother",
               "neighbor", "coffee", "pizza", "beach", "laptop", "garage", "puppy", "concert", "train",
               "soup", "fence", "couch", "playlist")
TWEET_TIMES = ("today", "tonight", "yesterday", "morning", "weekend", "afternoon")
# Statement templates; slots: {t} time word, {v} verb, {n} noun (content words, kept in tweets).
STATEMENT_TEMPLATES = ("this {t} i {v} the {n} and then {v} my {n}", "earlier {t} i {v} a {n} with my {n}",
                       "i {v} the {n} {t} and it was a long day", "my {n} and i {v} the {n} {t}",
                       "{t} i finally {v} the {n} after a while", "during the {t} we {v} the old {n}")
TWEET_OPENERS = ("", "ugh", "omg", "honestly", "so", "lowkey", "yay")
TWEET_FORMS = ("all words", "first three", "last three")
TWEET_ENDERS = ("", "lol", "haha", "#blessed", "#mood", "smh", "so fun")

# ---------------------------------------------------------------- LaMP_1: citations
TOPIC_WORDS: dict[str, tuple[str, ...]] = {
    "vision": ("image", "pixel", "camera", "segmentation", "video", "depth", "scene", "detection", "lighting", "texture"),
    "language": ("sentence", "grammar", "translation", "dialogue", "lexicon", "parsing", "syntax", "summarization", "vocabulary", "corpus"),
    "robotics": ("robot", "gripper", "locomotion", "manipulation", "drone", "actuator", "navigation", "grasping", "legged", "motor"),
    "security": ("malware", "encryption", "password", "firewall", "intrusion", "phishing", "privacy", "attack", "cipher", "vulnerability"),
    "biology": ("protein", "gene", "cell", "genome", "enzyme", "molecule", "tissue", "bacteria", "dna", "neuron"),
    "databases": ("query", "index", "transaction", "table", "schema", "storage", "join", "sql", "cache", "ledger"),
    "networks": ("router", "packet", "wireless", "bandwidth", "latency", "protocol", "topology", "routing", "antenna", "spectrum"),
    "audio": ("sound", "music", "speaker", "acoustic", "melody", "pitch", "voice", "rhythm", "noise", "microphone"),
}
METHOD_WORDS = ("efficient", "robust", "scalable", "adaptive", "framework", "analysis", "method", "approach",
                "learning", "optimization", "evaluation", "model", "design", "system", "unified", "simple",
                "fast", "general", "structured", "probabilistic")
PAPER_OPENERS = ("we present", "in this work we study", "this paper proposes", "we describe", "we introduce")
PAPER_LINKS = ("for", "with", "using", "and", "across")
PAPER_CLOSERS = ("results show clear gains", "on real data", "with open code", "and discuss limits", "")
