"""IBIM backbones behind one small interface (`base.MultiInterestEncoder`).

Every encoder maps item_ids [B, L] (0 = padding, right-aligned) to interests [B, K, d]
(`forward`) and knows its training loss (`loss`). `encode` additionally returns the
item-to-interest assignment weights [B, K, L] (attention or routing), which ESIM uses to match
semantic interests to behavioural ones. Backbones are chosen by name with
`registry.build_encoder`; one module per family: `comirec_sa`, `capsule` (ComiRec-DR, MIND),
`transformer` (SASRec, Transformer-SA).
Structure follows the official ComiRec code (Cen et al., KDD 2020).
"""
