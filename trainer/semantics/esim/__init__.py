"""ESIM: explicit semantic interests of typical users sharpen the behavioural ones (training only).

After a warm-up of IBIM alone: pick typical users (k-means over their mean interest vectors, m
nearest each centroid), have an LLM (or the category baseline) name their interests, embed each
"name: description" with all-MiniLM-L6-v2, cluster those embeddings into the interest
vocabulary, and from then on add to the recommendation loss

    alpha * L_pred  (multi-label: the user's vocabulary labels from its behavioural interests)
    beta  * L_align (InfoNCE: projection g of the matched behavioural interest vs the semantic
                     embedding, the batch's other semantics as negatives, temperature tau).

That is the individual level (`typical_users`, `individual`). The crowd level (`crowd`;
docs/architecture.md, "ESIM levels") supervises most training users through the synthesized
users of crowds of similar users; `esim_level` picks individual, crowd or dual (both). Either
way the supervision ends up in one `Supervision` (users, their semantic interests and where
those interests' items sit in their histories) and one EsimObjective (`objective`), which
samples `esim_batch_users` supervised users per step. Its heads (g, the label predictor) live
there, not in the encoder, so the exported inference graph is the same with or without ESIM.
"""
