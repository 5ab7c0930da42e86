#!/usr/bin/env python3
"""Build the embedded demo assets under examples/demo/ (a tiny random Qwen3-MoE model, its tokenizer, a dataset).

Why they exist: `make demo`, the docs and the tests need a MoE model that LLaMA-Factory can fine-tune end to end
on a CPU-only box in well under two minutes, with no access to a model hub.  Everything here is synthetic:

* examples/demo/data/kt_demo.json (train) and kt_demo_eval.json (held out, another seed): alpaca-format
  instruction data from a few patterned tasks (opposites, plurals, colours, small sums, reversing spelled-out
  letters, repeating a phrase; 3-4 phrasings each), so that even a random model's LoRA loss falls visibly
  within ~100 steps.  Train examples are distinct and no eval example occurs in train (the facts are shared,
  the phrasing/combination is new).  dataset_info.json registers them as `kt_demo` / `kt_demo_eval`.
* examples/demo/data/kt_demo_pref.json (pairwise: the right answer chosen, another train example's answer
  rejected; `kt_demo_pref`, for `stage: dpo`) and kt_demo_kto.json (the same prompts, each with the right or
  a wrong answer and a true/false label; `kt_demo_kto`, for `stage: kto`), from the first N_PREF train
  examples with their own seed: the tokenizer and model do not depend on them.
* examples/demo/model/: a byte-level BPE tokenizer trained on that text (every string is encodable; special
  tokens <|endoftext|> = pad, <|im_start|>, <|im_end|> = eos, a ChatML chat template), and a random qwen3_moe
  checkpoint (float32 safetensors, ~3 MB) written by transformers' save_pretrained.  Use LLaMA-Factory's
  `qwen3_nothink` template with it (ChatML, no default system prompt, no <think> block).

Weights use initializer_range = 1/sqrt(hidden_size) instead of the usual 0.02: with a frozen lm_head and final
RMSNorm, 0.02 caps the reachable logit margin at ~0.02*hidden (~2.6), i.e. LoRA could never push the loss far
below ln(vocab) - 2.6.

The output is deterministic (fixed seeds, sorted JSON, single-threaded tokenizer training): rerunning gives
byte-identical files.  Regenerate with:

    .venv/bin/python scripts/make_demo.py            # writes examples/demo/, replacing what is there
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"  # tokenizers' BPE trainer: one thread, one merge order
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3MoeConfig

REPO = Path(__file__).resolve().parents[1]
TRAIN_SEED, EVAL_SEED, WEIGHT_SEED, PREF_SEED = 1234, 4321, 0, 2468
N_TRAIN, N_EVAL, N_PREF = 320, 32, 96
VOCAB_SIZE = 1024  # the model's embedding rows; the BPE may use fewer
PAD, BOS_CHAT, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MODEL_CONFIG = {  # ~0.76M params, 3 MB in fp32; every layer is MoE (8 experts, top-2)
    "vocab_size": VOCAB_SIZE, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 2048,
    "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "norm_topk_prob": True, "tie_word_embeddings": False, "output_router_logits": False,
    "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "initializer_range": 1 / math.sqrt(128),
}

# ---- the synthetic tasks: small fixed tables, several phrasings each, one generator per task -----------
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
             "open": "closed", "early": "late", "full": "empty", "young": "old", "wet": "dry", "high": "low",
             "hard": "soft", "loud": "quiet", "rich": "poor", "strong": "weak"}
PLURALS = {"cat": "cats", "dog": "dogs", "box": "boxes", "child": "children", "mouse": "mice", "leaf": "leaves",
           "city": "cities", "foot": "feet", "tooth": "teeth", "bus": "buses", "baby": "babies", "wolf": "wolves",
           "man": "men", "tree": "trees", "glass": "glasses", "knife": "knives"}
COLOURS = {"banana": "yellow", "grass": "green", "sky": "blue", "snow": "white", "coal": "black",
           "tomato": "red", "orange": "orange", "plum": "purple", "chocolate": "brown", "lemon": "yellow",
           "cherry": "red", "leaf": "green", "cloud": "grey", "flamingo": "pink", "ocean": "blue", "milk": "white"}
WORDS = ["cat", "tree", "moon", "river", "apple", "stone", "cloud", "bird", "house", "lamp", "door", "fish",
         "road", "star", "book", "rain", "green", "sun", "table", "wind", "bread", "ship", "snow", "hill"]
PHRASES = ["good morning", "hello world", "thank you", "see you soon", "well done", "go team", "all good",
           "keep going"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five"]
# (instruction, input) phrasings per task; {x} is the word / thing / phrase, {a} {b} the numbers, {n} a count
PHRASINGS = {
    "opposite": [('What is the opposite of "{x}"?', ""), ('Give the opposite of the word "{x}".', ""),
                 ("Name the antonym of {x}.", ""), ("Which word means the opposite?", "{x}")],
    "plural": [("Give the plural of the word.", "{x}"), ("What is the plural of {x}?", ""),
               ("Write the plural form.", "{x}"), ("How do you say more than one {x}?", "")],
    "colour": [("What colour is {x}?", ""), ("Name the colour of {x}.", ""), ("Which colour is this?", "{x}"),
               ("Tell me the colour of {x}.", "")],
    "add": [("Add {a} and {b}.", ""), ("What is {a} plus {b}?", ""), ("Compute the sum.", "{a} + {b}")],
    "reverse": [("Reverse the letters.", "{x}"), ("Spell these letters backwards.", "{x}"),
                ("Write the letters in reverse order.", "{x}")],
    "repeat": [("Repeat the phrase {n} times.", "{x}"), ("Say this {n} times.", "{x}"),
               ("Write the phrase {n} times, separated by commas.", "{x}")],
}


def _example(rng: random.Random, task: str, output: str, **fields) -> dict:
    instruction, query = rng.choice(PHRASINGS[task])
    return {"instruction": instruction.format(**fields), "input": query.format(**fields), "output": output}


def _opposite(rng):
    word = rng.choice(sorted(OPPOSITES))
    return _example(rng, "opposite", f"The opposite of {word} is {OPPOSITES[word]}.", x=word)


def _plural(rng):
    word = rng.choice(sorted(PLURALS))
    return _example(rng, "plural", f"The plural of {word} is {PLURALS[word]}.", x=word)


def _colour(rng):
    thing = rng.choice(sorted(COLOURS))
    return _example(rng, "colour", f"The colour of {thing} is {COLOURS[thing]}.", x=thing)


def _add(rng):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return _example(rng, "add", f"{a} + {b} = {a + b}.", a=a, b=b)


def _reverse(rng):
    word = rng.choice(WORDS)
    return _example(rng, "reverse", " ".join(reversed(word)), x=" ".join(word))


def _repeat(rng):
    phrase, times = rng.choice(PHRASES), rng.randint(2, 4)
    return _example(rng, "repeat", ", ".join([phrase] * times) + ".", x=phrase, n=NUMBER_WORDS[times])


TASKS = (_opposite, _plural, _colour, _add, _reverse, _repeat)


def make_examples(n: int, seed: int, exclude: list[dict] = ()) -> list[dict]:
    """n distinct examples, none in `exclude`; tasks in a shuffled round robin, all draws from one seeded RNG."""
    rng = random.Random(seed)
    order = [TASKS[i % len(TASKS)] for i in range(n)]
    rng.shuffle(order)
    seen = {json.dumps(ex, sort_keys=True) for ex in exclude}
    examples = []
    for task in order:
        for _ in range(10_000):  # every task's pool is >= 64 distinct examples; this never runs out
            ex = task(rng)
            if (key := json.dumps(ex, sort_keys=True)) not in seen:
                break
        else:
            raise RuntimeError(f"{task.__name__}: no unseen example left")
        seen.add(key)
        examples.append(ex)
    return examples


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def preference_examples(train: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(pairwise, kto) examples from the first n train examples: the right answer against another example's
    (a different answer, drawn from one seeded RNG); KTO alternates a right answer (label true) and a wrong one."""
    rng = random.Random(seed)
    pairs, kto = [], []
    for i, ex in enumerate(train[:n]):
        wrong = rng.choice([other["output"] for other in train if other["output"] != ex["output"]])
        prompt = {"instruction": ex["instruction"], "input": ex["input"]}
        pairs.append({**prompt, "chosen": ex["output"], "rejected": wrong})
        kto.append({**prompt, "output": ex["output"] if i % 2 == 0 else wrong, "label": i % 2 == 0})
    return pairs, kto


def write_dataset(data_dir: Path) -> list[dict]:
    data_dir.mkdir(parents=True)
    train = make_examples(N_TRAIN, TRAIN_SEED)
    held_out = make_examples(N_EVAL, EVAL_SEED, exclude=train)  # no example is also in train
    pairs, kto = preference_examples(train, N_PREF, PREF_SEED)
    write_json(data_dir / "kt_demo.json", train)
    write_json(data_dir / "kt_demo_eval.json", held_out)
    write_json(data_dir / "kt_demo_pref.json", pairs)
    write_json(data_dir / "kt_demo_kto.json", kto)
    columns = {"prompt": "instruction", "query": "input", "response": "output"}
    write_json(data_dir / "dataset_info.json", {
        "kt_demo": {"file_name": "kt_demo.json", "columns": columns},
        "kt_demo_eval": {"file_name": "kt_demo_eval.json", "columns": columns},
        "kt_demo_pref": {"file_name": "kt_demo_pref.json", "ranking": True,
                         "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                                     "rejected": "rejected"}},
        "kt_demo_kto": {"file_name": "kt_demo_kto.json", "columns": {**columns, "kto_tag": "label"}},
    })
    return train


# ---- tokenizer -------------------------------------------------------------------------------------------
def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style pre-tokenisation, all 256 bytes in the alphabet) + the ChatML specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[PAD, BOS_CHAT, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=None,
                                   bos_token=None, model_max_length=MODEL_CONFIG["max_position_embeddings"],
                                   chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def tokenizer_corpus(train: list[dict]) -> list[str]:
    roles = ["system", "user", "assistant", "You are a helpful assistant."]
    return roles + [f"{ex['instruction']}\n{ex['input']}\n{ex['output']}" for ex in train]


# ---- model -----------------------------------------------------------------------------------------------
def build_model(tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    assert len(tokenizer) <= VOCAB_SIZE, (len(tokenizer), VOCAB_SIZE)
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    config = Qwen3MoeConfig(**MODEL_CONFIG, **ids)
    torch.manual_seed(WEIGHT_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = ids["pad_token_id"], ids["eos_token_id"]
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "examples" / "demo", help="default: examples/demo")
    out = parser.parse_args().out
    if out.exists():
        shutil.rmtree(out)
    train = write_dataset(out / "data")

    tokenizer = build_tokenizer(tokenizer_corpus(train))
    model = build_model(tokenizer)
    model_dir = out / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)

    n_params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}: {len(train)} train / {N_EVAL} eval examples, tokenizer {len(tokenizer)} tokens, "
          f"qwen3_moe {n_params / 1e6:.2f}M params, {size / 2**20:.2f} MiB on disk")


if __name__ == "__main__":
    main()
